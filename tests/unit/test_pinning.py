"""benchmarks/common.py pin_plan: the local S3/SQS server and the worker on CPUs of their own,
never an SMT sibling of each other when the machine has another physical core to give."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.common import format_cpus, parse_cpus, pin_plan


@st.composite
def machines(draw):
    """(allowed CPUs, CPU -> physical core): 1-4 SMT threads per core, CPUs numbered any way."""
    cores = draw(st.integers(1, 8))
    threads = draw(st.integers(1, 4))
    numbers = draw(st.permutations(range(cores * threads)))
    core_of = {cpu: i // threads for i, cpu in enumerate(numbers)}
    allowed = draw(st.sets(st.sampled_from(sorted(core_of)), min_size=1))
    return allowed, core_of


@given(machines(), st.integers(1, 4))
def test_the_plan_splits_allowed_cpus_and_avoids_sharing_a_core_when_it_can(machine, worker_cpus):
    allowed, core_of = machine
    if len(allowed) < worker_cpus + 1:
        with pytest.raises(ValueError):
            pin_plan(allowed, core_of, worker_cpus)
        return
    plan = pin_plan(allowed, core_of, worker_cpus)
    assert len(plan.server) == 1 and len(plan.worker) == worker_cpus
    assert plan.server | plan.worker <= allowed and not plan.server & plan.worker
    (server,) = plan.server
    off_server_core = [c for c in allowed if core_of[c] != core_of[server]]
    # a sibling of the server's core only when the other cores have too few CPUs
    assert plan.shared_core == any(core_of[c] == core_of[server] for c in plan.worker)
    assert plan.shared_core == (len(off_server_core) < worker_cpus)
    # one worker CPU per other core first: as many distinct cores as there are, up to worker_cpus
    worker_cores = {core_of[c] for c in plan.worker} - {core_of[server]}
    assert len(worker_cores) == min(worker_cpus, len({core_of[c] for c in off_server_core}))
    assert pin_plan(allowed, core_of, worker_cpus) == plan  # deterministic


def test_two_logical_cpus_of_one_core_still_pin_but_say_so():
    plan = pin_plan({0, 1}, {0: "core0", 1: "core0"})
    assert plan.server == {0} and plan.worker == {1} and plan.shared_core
    assert "SMT" in plan.describe()


def test_siblings_are_skipped_for_another_core():
    # 4 logical CPUs: 0/2 share core A, 1/3 share core B (the usual Linux numbering)
    plan = pin_plan({0, 1, 2, 3}, {0: "A", 2: "A", 1: "B", 3: "B"})
    assert plan.server == {0} and plan.worker == {1} and not plan.shared_core
    plan = pin_plan({0, 1, 2, 3}, {0: "A", 1: "A", 2: "B", 3: "B"})
    assert plan.worker == {2}


def test_without_topology_every_cpu_is_its_own_core():
    assert pin_plan({3, 5, 9}).server == {3} and pin_plan({3, 5, 9}, worker_cpus=2).worker == {5, 9}
    with pytest.raises(ValueError):
        pin_plan({0})
    with pytest.raises(ValueError):
        pin_plan({0, 1}, worker_cpus=0)


@given(st.sets(st.integers(0, 300)))
def test_cpu_lists_round_trip(cpus):
    assert parse_cpus(format_cpus(cpus)) == cpus


def test_cpu_list_ranges():
    assert parse_cpus("0-2,5,7-8") == {0, 1, 2, 5, 7, 8} and parse_cpus("") == set()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_a_pinned_child_and_its_threads_stay_on_their_cpu():
    """The mask a child sets on itself before it starts threads holds for the threads it starts."""
    import subprocess
    import sys

    cpu = max(os.sched_getaffinity(0))
    code = ("import os, threading; from benchmarks.common import _pin_self_from_environment as pin; pin(); "
            "seen = []; t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0))); t.start(); t.join(); "
            "print(sorted(os.sched_getaffinity(0)), sorted(seen[0]))")
    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_CPUS": str(cpu), "PYTHONPATH": str(ROOT)}).stdout
    assert out.split() == [f"[{cpu}]", f"[{cpu}]"]
