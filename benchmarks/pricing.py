"""What a photo costs on AWS, from a measured throughput: pure arithmetic, no AWS call.

Rates: on-demand, US East (N. Virginia), as published on the AWS pricing pages
(aws.amazon.com/lambda/pricing, /fargate/pricing, /s3/pricing, /sqs/pricing) and quoted by dated
secondary sources (see ``RATES_SOURCE``). Change them here, in one place, when AWS does.

The Lambda model: "At 1,769 MB, a function has the equivalent of one vCPU (one vCPU-second of
credits per second)" and CPU is allocated "in proportion to the amount of memory configured"
(AWS Lambda Developer Guide, *Configure Lambda function memory*). So a function of ``M`` MB gets
``M / 1769`` vCPU-seconds per second. Below one vCPU the duration of a CPU-bound photo grows as the
share shrinks, and the GB-seconds per photo stay the same whatever the memory: memory then only
has to hold the worker (peak RSS) and buys latency. Above one vCPU we assume no speed-up (the
throughput was measured on one core; the worker may or may not use a second one well), so GB-s
per photo grow with memory: the cheapest setting is the smallest memory giving one full vCPU
that also holds the worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Where the rates come from and when they were read.
RATES_AS_OF = "2026-03"
RATES_SOURCE = ("AWS pricing pages for Lambda, Fargate, S3 and SQS, us-east-1, on-demand; the same figures are quoted "
                "by wring.co (Lambda, 2026-03-08; Fargate, 2026-03-10), cloudburn.io (Fargate, as of 2026-03) and "
                "c3x.dev (S3 requests)")
REGION = "us-east-1"

MB_PER_VCPU = 1769  # Lambda: one vCPU-second of credits per second at 1,769 MB
LAMBDA_MIN_MB, LAMBDA_MAX_MB = 128, 10240


@dataclass(frozen=True)
class LambdaPrice:
    architecture: str
    usd_per_gb_second: float  # first pricing tier (6 billion GB-s a month on x86, 7.5 billion on Arm)
    usd_per_million_requests: float


@dataclass(frozen=True)
class FargatePrice:
    architecture: str
    usd_per_vcpu_hour: float
    usd_per_gb_hour: float


LAMBDA_X86 = LambdaPrice("x86_64", 0.0000166667, 0.20)
LAMBDA_ARM = LambdaPrice("arm64", 0.0000133334, 0.20)
FARGATE_X86 = FargatePrice("x86_64", 0.04048, 0.004445)
FARGATE_ARM = FargatePrice("arm64", 0.03238, 0.00356)
S3_USD_PER_1000_PUT = 0.005  # PUT, COPY, POST, LIST (S3 Standard)
S3_USD_PER_1000_GET = 0.0004  # GET, HEAD
SQS_USD_PER_MILLION_REQUESTS = 0.40  # standard queue, after the first free million; a 64 KB chunk is one request

#: Fargate task sizes: vCPU -> the memory (GB) it may have.
FARGATE_SIZES: dict[float, tuple[float, ...]] = {
    0.25: (0.5, 1.0, 2.0),
    0.5: (1.0, 2.0, 3.0, 4.0),
    1.0: tuple(float(g) for g in range(2, 9)),
    2.0: tuple(float(g) for g in range(4, 17)),
    4.0: tuple(float(g) for g in range(8, 31)),
    8.0: tuple(float(g) for g in range(16, 61, 4)),
    16.0: tuple(float(g) for g in range(32, 121, 8)),
}


def _check_memory(memory_mb: float) -> None:
    if not LAMBDA_MIN_MB <= memory_mb <= LAMBDA_MAX_MB:
        raise ValueError(f"Lambda memory must be {LAMBDA_MIN_MB}..{LAMBDA_MAX_MB} MB, not {memory_mb}")


def vcpu_share(memory_mb: float) -> float:
    """vCPU-seconds per second a Lambda function of ``memory_mb`` gets (1.0 at 1,769 MB)."""
    _check_memory(memory_mb)
    return memory_mb / MB_PER_VCPU


def memory_for_vcpus(vcpus: float) -> int:
    """The smallest whole-MB Lambda memory whose vCPU share is at least ``vcpus``."""
    memory = max(LAMBDA_MIN_MB, math.ceil(vcpus * MB_PER_VCPU - 1e-9))
    _check_memory(memory)
    return memory


def lambda_memory_mb(peak_rss_mb: float, *, headroom: float = 1.25, vcpus: float = 1.0) -> int:
    """The Lambda memory to use: one full vCPU (``vcpus``) and ``headroom`` x the worker's peak RSS,
    whichever is larger. Raises ``ValueError`` if that exceeds Lambda's 10,240 MB."""
    if peak_rss_mb < 0 or headroom < 1:
        raise ValueError("peak RSS must be >= 0 and headroom >= 1")
    memory = max(memory_for_vcpus(vcpus), math.ceil(peak_rss_mb * headroom))
    _check_memory(memory)
    return memory


def lambda_seconds_per_photo(img_s_per_vcpu: float, memory_mb: float, *, vcpus_used: float = 1.0) -> float:
    """Billed seconds per photo: the measured rate on one vCPU, scaled by the function's vCPU share
    up to ``vcpus_used`` (what the worker can use; 1 = no speed-up above one vCPU)."""
    if img_s_per_vcpu <= 0:
        raise ValueError("throughput must be > 0")
    return 1.0 / (img_s_per_vcpu * min(vcpu_share(memory_mb), vcpus_used))


def lambda_gb_seconds_per_million(img_s_per_vcpu: float, memory_mb: float, *, vcpus_used: float = 1.0) -> float:
    return 1e6 * (memory_mb / 1024) * lambda_seconds_per_photo(img_s_per_vcpu, memory_mb, vcpus_used=vcpus_used)


@dataclass(frozen=True)
class LambdaCost:
    memory_mb: int
    gb_seconds: float  # per million photos
    compute_usd: float
    requests_usd: float

    @property
    def usd(self) -> float:
        return self.compute_usd + self.requests_usd


def lambda_cost_per_million(img_s_per_vcpu: float, memory_mb: int, price: LambdaPrice, *,
                            photos_per_invocation: float = 10.0, vcpus_used: float = 1.0) -> LambdaCost:
    """Duration and invocation charges for a million photos (``photos_per_invocation``: an SQS batch
    of 10 one-photo S3 event messages by default). Cold starts are not counted."""
    if photos_per_invocation <= 0:
        raise ValueError("photos per invocation must be > 0")
    gb_s = lambda_gb_seconds_per_million(img_s_per_vcpu, memory_mb, vcpus_used=vcpus_used)
    invocations = 1e6 / photos_per_invocation
    return LambdaCost(memory_mb, gb_s, gb_s * price.usd_per_gb_second,
                      invocations / 1e6 * price.usd_per_million_requests)


def fargate_task(peak_rss_mb: float, *, vcpus: float = 1.0, headroom: float = 1.25) -> tuple[float, float]:
    """(vCPU, GB) of the smallest valid Fargate task of ``vcpus`` holding ``headroom`` x peak RSS."""
    if vcpus not in FARGATE_SIZES:
        raise ValueError(f"Fargate has no {vcpus} vCPU task; sizes: {sorted(FARGATE_SIZES)}")
    need_gb = peak_rss_mb * headroom / 1024
    for memory_gb in FARGATE_SIZES[vcpus]:
        if memory_gb >= need_gb:
            return vcpus, memory_gb
    raise ValueError(f"{peak_rss_mb} MB x {headroom} does not fit a {vcpus} vCPU Fargate task")


def fargate_usd_per_hour(vcpus: float, memory_gb: float, price: FargatePrice) -> float:
    return vcpus * price.usd_per_vcpu_hour + memory_gb * price.usd_per_gb_hour


def fargate_usd_per_million(img_s_per_vcpu: float, vcpus: float, memory_gb: float, price: FargatePrice, *,
                            utilisation: float = 1.0) -> float:
    """A million photos on tasks busy ``utilisation`` of the time they run (1.0: a sustained
    backlog), at the measured rate per vCPU times the task's vCPUs."""
    if img_s_per_vcpu <= 0 or not 0 < utilisation <= 1:
        raise ValueError("throughput must be > 0 and utilisation in (0, 1]")
    hours = 1e6 / (img_s_per_vcpu * vcpus * utilisation) / 3600
    return hours * fargate_usd_per_hour(vcpus, memory_gb, price)


def break_even_utilisation(lambda_usd: float, fargate_busy_usd: float) -> float:
    """The utilisation above which a Fargate task costs less per photo than Lambda: Fargate's cost
    at utilisation u is ``fargate_busy_usd / u``. Above 1.0: Lambda is cheaper even at full load."""
    if lambda_usd <= 0 or fargate_busy_usd <= 0:
        raise ValueError("costs must be > 0")
    return fargate_busy_usd / lambda_usd


def requests_usd_per_million(per_photo: dict[str, float]) -> float:
    """S3 and SQS request charges for a million photos, from request counts per photo by
    operation name (e.g. measured ``{"GetObject": 1, "PutObject": 1, "ReceiveMessage": 0.1, ...}``).
    Deletes of S3 objects are free; every SQS API call is one request."""
    s3_put = {"PutObject", "CopyObject", "ListObjectsV2", "ListObjects"}
    s3_get = {"GetObject", "HeadObject"}
    usd = 0.0
    for operation, count in per_photo.items():
        if operation in s3_put:
            usd += 1e6 * count / 1000 * S3_USD_PER_1000_PUT
        elif operation in s3_get:
            usd += 1e6 * count / 1000 * S3_USD_PER_1000_GET
        elif operation in SQS_OPERATIONS:
            usd += count * SQS_USD_PER_MILLION_REQUESTS
    return usd


SQS_OPERATIONS = frozenset({"ReceiveMessage", "DeleteMessage", "DeleteMessageBatch", "ChangeMessageVisibility",
                            "ChangeMessageVisibilityBatch", "SendMessage", "SendMessageBatch", "GetQueueAttributes"})
