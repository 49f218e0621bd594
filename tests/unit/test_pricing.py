"""benchmarks/pricing.py: Lambda memory -> vCPU share, the memory to use, and what a million photos
cost on Lambda and Fargate, stated as properties over generated throughputs, memories and RSS."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from benchmarks import pricing

rates = st.floats(min_value=0.05, max_value=5000, allow_nan=False)
memories = st.integers(min_value=pricing.LAMBDA_MIN_MB, max_value=pricing.LAMBDA_MAX_MB)
rss = st.floats(min_value=0, max_value=8000, allow_nan=False)


def test_one_vcpu_at_1769_mb_and_the_documented_bounds():
    assert pricing.vcpu_share(1769) == 1.0
    assert pricing.memory_for_vcpus(1) == 1769
    assert pricing.vcpu_share(10240) == pytest.approx(5.79, abs=0.01)  # below 6: the credits, not the cores seen
    for bad in (127, 10241, 0, -1):
        with pytest.raises(ValueError):
            pricing.vcpu_share(bad)


@given(memories, memories)
def test_the_vcpu_share_is_proportional_to_memory(a, b):
    assert pricing.vcpu_share(a) * b == pytest.approx(pricing.vcpu_share(b) * a)
    assert (a < b) == (pricing.vcpu_share(a) < pricing.vcpu_share(b))


@given(st.floats(min_value=0.08, max_value=5.78, allow_nan=False))
def test_memory_for_vcpus_is_the_smallest_whole_mb_that_gives_them(vcpus):
    memory = pricing.memory_for_vcpus(vcpus)
    assert pricing.vcpu_share(memory) >= vcpus - 1e-9
    if memory > pricing.LAMBDA_MIN_MB:
        assert pricing.vcpu_share(memory - 1) < vcpus


@given(rss, st.floats(min_value=1, max_value=2, allow_nan=False))
def test_lambda_memory_holds_the_worker_and_one_full_vcpu(peak, headroom):
    try:
        memory = pricing.lambda_memory_mb(peak, headroom=headroom)
    except ValueError:
        assert peak * headroom > pricing.LAMBDA_MAX_MB
        return
    assert memory >= peak * headroom and pricing.vcpu_share(memory) >= 1
    # and nothing smaller would do both
    assert memory == pricing.MB_PER_VCPU or memory - 1 < peak * headroom


small = st.integers(min_value=pricing.LAMBDA_MIN_MB, max_value=pricing.MB_PER_VCPU)
large = st.integers(min_value=pricing.MB_PER_VCPU, max_value=pricing.LAMBDA_MAX_MB)


@given(rates, small, small)
def test_below_one_vcpu_gb_seconds_per_photo_do_not_depend_on_memory(rate, a, b):
    assert pricing.lambda_gb_seconds_per_million(rate, a) == pytest.approx(pricing.lambda_gb_seconds_per_million(rate, b))


@given(rates, large, large)
def test_above_one_vcpu_more_memory_only_costs_more_when_the_worker_uses_one_vcpu(rate, a, b):
    assume(a != b)
    a, b = min(a, b), max(a, b)
    assert pricing.lambda_gb_seconds_per_million(rate, a) < pricing.lambda_gb_seconds_per_million(rate, b)
    # a worker that scales with every vCPU it gets costs the same at any memory
    assert pricing.lambda_gb_seconds_per_million(rate, a, vcpus_used=6) == pytest.approx(
        pricing.lambda_gb_seconds_per_million(rate, b, vcpus_used=6))


@given(rates, st.floats(min_value=1.01, max_value=100, allow_nan=False), memories)
def test_cost_is_inversely_proportional_to_throughput(rate, factor, memory):
    slow = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_X86)
    fast = pricing.lambda_cost_per_million(rate * factor, memory, pricing.LAMBDA_X86)
    assert slow.compute_usd == pytest.approx(fast.compute_usd * factor)
    assert slow.requests_usd == fast.requests_usd  # invocations do not depend on speed


@given(rates, memories)
def test_arm_and_x86_differ_by_their_price_per_gb_second_only(rate, memory):
    x86 = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_X86)
    arm = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_ARM)
    assert x86.gb_seconds == arm.gb_seconds
    assert arm.compute_usd / x86.compute_usd == pytest.approx(0.0000133334 / 0.0000166667)


def test_a_worked_example():
    # 10 photos/s on one vCPU at 1,769 MB: 0.1 s per photo x 1.7275 GB = 0.17275 GB-s per photo
    cost = pricing.lambda_cost_per_million(10, 1769, pricing.LAMBDA_X86, photos_per_invocation=10)
    assert cost.gb_seconds == pytest.approx(1e6 * 1769 / 1024 * 0.1)
    assert cost.compute_usd == pytest.approx(172_753.9 * 0.0000166667, rel=1e-6)
    assert cost.requests_usd == pytest.approx(0.02)  # 100,000 invocations at $0.20 per million
    # the same worker on a busy 1 vCPU / 2 GB x86 Fargate task: 27.8 h at $0.04937 an hour
    fargate = pricing.fargate_usd_per_million(10, 1, 2, pricing.FARGATE_X86)
    assert fargate == pytest.approx(1e6 / 10 / 3600 * (0.04048 + 2 * 0.004445))
    assert pricing.break_even_utilisation(cost.usd, fargate) == pytest.approx(fargate / cost.usd)


@given(st.floats(min_value=0, max_value=30000, allow_nan=False), st.sampled_from(sorted(pricing.FARGATE_SIZES)))
def test_a_fargate_task_is_the_smallest_valid_size_that_holds_the_worker(peak, vcpus):
    try:
        cpu, memory = pricing.fargate_task(peak, vcpus=vcpus)
    except ValueError:
        assert peak * 1.25 / 1024 > max(pricing.FARGATE_SIZES[vcpus])
        return
    assert cpu == vcpus and memory in pricing.FARGATE_SIZES[vcpus]
    assert memory * 1024 >= peak * 1.25
    assert all(smaller * 1024 < peak * 1.25 for smaller in pricing.FARGATE_SIZES[vcpus] if smaller < memory)


@given(rates, st.floats(min_value=0.01, max_value=1, allow_nan=False), memories)
def test_fargate_costs_the_same_as_lambda_at_the_break_even_utilisation(rate, utilisation, memory):
    lam = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_X86).usd
    busy = pricing.fargate_usd_per_million(rate, 1, 2, pricing.FARGATE_X86)
    assert pricing.fargate_usd_per_million(rate, 1, 2, pricing.FARGATE_X86, utilisation=utilisation) == \
        pytest.approx(busy / utilisation)
    even = pricing.break_even_utilisation(lam, busy)
    if even <= 1:
        assert pricing.fargate_usd_per_million(rate, 1, 2, pricing.FARGATE_X86, utilisation=even) == pytest.approx(lam)


def test_request_charges_per_million_photos():
    # one S3 event per photo: GET the photo, PUT its manifest, a tenth of a receive and of a batch delete
    usd = pricing.requests_usd_per_million({"GetObject": 1, "PutObject": 1, "ReceiveMessage": 0.1,
                                            "DeleteMessageBatch": 0.1, "DeleteObject": 3})
    assert usd == pytest.approx(0.4 + 5.0 + 0.04 + 0.04)
    assert pricing.requests_usd_per_million({}) == 0


@pytest.mark.parametrize("bad", [
    lambda: pricing.lambda_seconds_per_photo(0, 1769),
    lambda: pricing.lambda_memory_mb(9000),  # 9000 x 1.25 > 10,240 MB
    lambda: pricing.lambda_cost_per_million(1, 1769, pricing.LAMBDA_X86, photos_per_invocation=0),
    lambda: pricing.fargate_task(100, vcpus=3),
    lambda: pricing.fargate_usd_per_million(1, 1, 2, pricing.FARGATE_X86, utilisation=0),
    lambda: pricing.break_even_utilisation(0, 1),
])
def test_impossible_inputs_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_rates_state_their_date_and_source():
    assert pricing.RATES_AS_OF and pricing.RATES_SOURCE and pricing.REGION == "us-east-1"
    assert math.isclose(pricing.LAMBDA_ARM.usd_per_gb_second / pricing.LAMBDA_X86.usd_per_gb_second, 0.8, rel_tol=1e-4)
