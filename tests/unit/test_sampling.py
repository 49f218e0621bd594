"""trainer.sampling: the bounded, breed-stratified samples publishing measures agreement and
calibrates int8 on, and the error bounds it records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.sampling import breed_of, hoeffding_half_width, stratified_sample, wilson_interval

ROOT = Path(__file__).resolve().parents[2]
breed_names = st.sampled_from(["a", "b", "c", "d", "ä/é", "n02085620-Chihuahua", " "])
paths = st.lists(st.tuples(breed_names, st.text(min_size=1, max_size=6)), max_size=60).map(
    lambda pairs: [f"{breed}/{name}" for breed, name in pairs])


@settings(max_examples=200, deadline=None)
@given(paths, st.integers(0, 70), st.integers(0, 3))
def test_a_sample_is_bounded_in_order_and_keeps_every_breeds_share(items, limit, seed):
    chosen = stratified_sample(items, limit, seed=seed)
    assert len(chosen) == min(limit, len(items))
    assert chosen == stratified_sample(items, limit, seed=seed)  # deterministic
    indices = _indices_of(items, chosen)
    assert indices == sorted(indices)  # a sub-sequence: original order, each item at most once
    if len(items) > limit:
        have, got = Counter(map(breed_of, items)), Counter(map(breed_of, chosen))
        for breed, count in have.items():
            share = limit * count / len(items)
            assert got[breed] <= count
            if limit >= len(have):  # every breed is in the sample, within one photo of its share
                assert 1 <= got[breed] <= max(1, int(share) + 2) and got[breed] >= int(share) - 1, (breed, got, have)


def _indices_of(items: list[str], chosen: list[str]) -> list[int]:
    """Positions of ``chosen`` as a sub-sequence of ``items`` (fails if it is not one)."""
    out, start = [], 0
    for item in chosen:
        start = items.index(item, start)
        out.append(start)
        start += 1
    return out


def test_a_split_sorted_by_breed_is_not_cut_to_its_first_breeds():
    items = [f"breed{b:02d}/{i}.jpg" for b in range(11) for i in range(100)]
    assert {breed_of(p) for p in items[:300]} == {"breed00", "breed01", "breed02"}  # what [:300] did
    assert Counter(map(breed_of, stratified_sample(items, 300))) == Counter(
        {f"breed{b:02d}": 27 + (b < 3) for b in range(11)})


def test_the_bounds_hold_what_they_promise():
    rng = np.random.default_rng(0)
    n, p, trials = 400, 0.985, 2000
    successes = rng.binomial(n, p, trials)
    covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in successes)])
    assert covered >= 0.93  # a 95% interval (Wilson's is close to nominal near 1)
    assert np.mean(np.abs(successes / n - p) <= hoeffding_half_width(n)) >= 0.95
    assert hoeffding_half_width(2000) == pytest.approx(0.0304, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(1980, 2000)
    assert 0.984 < lo < 0.99 < hi < 0.994


def test_publish_decodes_only_its_stratified_sample(tmp_path):
    """The calibration photos are chosen before decoding, from every breed of the split."""
    from trainer.publish import _run_photos

    data = ROOT / "samples" / "photos"
    folders = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name.startswith("n0"))
    train = [f"{f}/{p.name}" for f in folders for p in sorted((data / f).glob("*.jpg"))]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "val": [], "test": []}))
    run = {"config": {"data": str(data), "image_fit": "crop"}, "classes": folders}
    pixels, labels, sample = _run_photos(tmp_path, run, ("train",), 32, limit=len(folders) * 2)
    assert pixels.shape == (len(folders) * 2, 32, 32, 3)
    assert sorted(Counter(labels.tolist()).values()) == [2] * len(folders)
    assert sample["photos"] == len(folders) * 2 and sample["of"] == len(train)
