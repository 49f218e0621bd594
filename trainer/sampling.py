"""Bounded samples of a run's photos, and how far a rate measured on one can be off.

Publishing measures each serving variant's top-1 agreement with the fp32 model and calibrates
int8 on training photos. On a large split (120 breeds: ~8,600 test photos) doing that on every
photo costs minutes per variant and decodes gigabytes; a sample of a few thousand measures the
agreement to within a stated bound. The sample is stratified by breed (every breed keeps its
share, at least one photo each while the budget allows), so a split sorted by folder is not cut
to its first breeds.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

#: held-out photos (validation + test) on which publishing measures agreement at most
MAX_AGREEMENT_PHOTOS = 2000


def breed_of(relative_path: str) -> str:
    """The breed folder of a run's photo path (``<folder>/<file>``)."""
    return relative_path.split("/", 1)[0]


def stratified_sample(items: Sequence[T], limit: int, key: Callable[[T], str] = breed_of, seed: int = 0) -> list[T]:
    """At most ``limit`` of ``items``, each group (``key``) keeping its share of them (largest
    remainders; every group at least one while ``limit`` allows), chosen with a seeded shuffle;
    returned in their original order. All of them (in order) when ``limit`` covers them."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if len(items) <= limit:
        return list(items)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item)].append(index)
    names = sorted(groups)
    quota = {name: limit * len(groups[name]) / len(items) for name in names}
    counts = {name: int(quota[name]) for name in names}
    if limit >= len(names):  # every breed seen at least once
        for name in names:
            counts[name] = max(1, counts[name])
    left = limit - sum(counts.values())
    by_remainder = sorted(names, key=lambda n: (-(quota[n] - int(quota[n])), n))
    while left > 0:  # hand out what rounding left, largest remainder first
        for name in by_remainder:
            if left and counts[name] < len(groups[name]):
                counts[name] += 1
                left -= 1
    while left < 0:  # the at-least-one rule overshot: take back from the largest groups
        for name in sorted(names, key=lambda n: (-counts[n], n)):
            if left and counts[name] > 1:
                counts[name] -= 1
                left += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for name in names:
        members = list(groups[name])
        rng.shuffle(members)
        chosen += members[:counts[name]]
    return [items[i] for i in sorted(chosen)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a rate (95% by default): tight near 0 and 1, where an
    agreement rate lives."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def hoeffding_half_width(n: int, confidence: float = 0.95) -> float:
    """A rate measured on ``n`` photos drawn from a split is within this of the whole split's
    rate with probability ``confidence``, whatever the rate (Hoeffding: sqrt(ln(2/delta)/2n))."""
    if n <= 0:
        return 1.0
    return math.sqrt(math.log(2 / (1 - confidence)) / (2 * n))


def sample_description(chosen: int, of: int) -> dict:
    """What the manifest records about a measurement's sample of held-out photos."""
    return {"photos": chosen, "of": of, "stratified_by": "breed", "seed": 0,
            "hoeffding_95_half_width": round(hoeffding_half_width(chosen), 4)}
