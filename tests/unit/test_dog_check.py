"""The dog check's pure parts: the not-dog split (trainer.not_dogs), the threshold rule and the
logistic head (trainer.dog_check), the verdict rule (worker.classifier) and the manifest items
it produces (worker.manifests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import dog_check, not_dogs
from worker.classifier import NO_DOG, OK, UNCERTAIN, verdict
from worker.manifests import ItemResult, TopK, build_manifest

names = st.text("abcdefghij0123456789_", min_size=1, max_size=8)
folders = st.lists(st.tuples(st.sampled_from(["cats", "objects/n01", "objects/n02", "."]), names),
                   min_size=0, max_size=60, unique=True)


def _photos(pairs):
    return [not_dogs.NotDogPhoto(f"{folder}/{name}.jpg" if folder != "." else f"{name}.jpg") for folder, name in pairs]


@settings(max_examples=80, deadline=None)
@given(folders, st.randoms())
def test_split_is_a_partition_independent_of_listing_order(pairs, rnd):
    photos = _photos(pairs)
    split = not_dogs.split_not_dogs(photos)
    parts = [split.fit, split.val, split.test]
    assert sorted(p for part in parts for p in part) == sorted(p.relative_path for p in photos)
    assert sum(map(len, parts)) == len(set(p for part in parts for p in part))
    shuffled = list(photos)
    rnd.shuffle(shuffled)
    assert not_dogs.split_not_dogs(shuffled).to_dict() == split.to_dict()


@settings(max_examples=60, deadline=None)
@given(folders, names)
def test_a_photo_added_to_one_class_never_moves_photos_of_another(pairs, extra):
    photos = _photos(pairs)
    before = not_dogs.split_not_dogs(photos)
    after = not_dogs.split_not_dogs(photos + [not_dogs.NotDogPhoto(f"brand-new-class/{extra}.jpg")])
    for part in not_dogs.PARTS:
        assert [p for p in getattr(after, part) if not p.startswith("brand-new-class/")] == getattr(before, part)


def test_split_proportions_per_class():
    photos = [not_dogs.NotDogPhoto(f"cats/cat.{i}.jpg") for i in range(100)] + \
        [not_dogs.NotDogPhoto(f"objects/n1-tench/{i}.jpg") for i in range(50)]
    split = not_dogs.split_not_dogs(photos)
    assert split.counts() == {"fit": 60, "val": 30, "test": 60}
    assert sum(p.startswith("cats/") for p in split.test) == 40
    assert not_dogs.NotDogPhoto("objects/n1-tench/3.jpg").group == "objects"
    assert not_dogs.NotDogPhoto("cat.jpg").group == "."


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=300), st.lists(st.floats(0, 1), max_size=300),
       st.sampled_from([0.0, 0.01, 0.05]))
def test_threshold_loses_at_most_the_allowed_share_of_validation_dogs(dogs, not_dogs_scores, max_loss):
    t = dog_check.choose_threshold(np.array(dogs), np.array(not_dogs_scores), max_loss)
    assert 0.0 <= t <= 1.0
    lost = int((np.array(dogs) < t).sum())
    assert lost <= int(np.floor(max_loss * len(dogs)))


def test_threshold_sits_between_dogs_and_not_dogs():
    t = dog_check.choose_threshold(np.array([0.9, 0.95, 0.99]), np.array([0.01, 0.2, 0.6]), max_loss_share := 0.0)
    assert max_loss_share == 0.0 and t == pytest.approx(0.75, abs=1e-4)
    m = dog_check.measure(np.array([0.9, 0.95, 0.99]), np.array([0.01, 0.2, 0.6, 0.8]), ["cats", "cats", "obj", "obj"], t)
    assert m.dogs_lost == 0.0 and m.not_dogs == {"cats": {"photos": 2, "no_dog": 1.0}, "obj": {"photos": 2, "no_dog": 0.5}}


def test_logistic_head_separates_and_its_folded_weights_match_sklearn():
    rng = np.random.default_rng(0)
    dogs = rng.normal(2.0, 1.0, (200, 8)) * np.arange(1, 9)  # uneven scales: standardisation is folded in
    others = rng.normal(-2.0, 1.0, (150, 8)) * np.arange(1, 9)
    head, chosen = dog_check.fit_dog_head(dogs, others, val_dogs=dogs[:20], val_not_dogs=others[:20])
    assert chosen["c"] in dog_check.C_GRID
    assert (head.score(dogs) > 0.5).mean() > 0.97 and (head.score(others) < 0.5).mean() > 0.97
    layer = head.layer()
    np.testing.assert_allclose(np.asarray(layer(dogs[:5].astype(np.float32)))[:, 0], head.score(dogs[:5]), atol=1e-5)


scores = st.floats(0, 1)


@settings(max_examples=200, deadline=None)
@given(scores, st.one_of(st.none(), scores), st.one_of(st.none(), scores), st.one_of(st.none(), scores))
def test_verdict_rule(best, dog, threshold, min_score):
    status = verdict(best, dog, dog_threshold=threshold, min_score=min_score)
    no_dog = threshold is not None and dog is not None and dog < threshold
    assert (status == NO_DOG) == no_dog
    if not no_dog:
        assert status == (UNCERTAIN if min_score is not None and best < min_score else OK)
    # without a threshold (check off, or an old model) a photo is never no_dog
    assert verdict(best, dog, dog_threshold=None, min_score=min_score) != NO_DOG


def test_classified_items_name_a_breed_only_when_ok():
    top = [TopK("n02088364", "beagle", 0.7), TopK("n02085620", "Chihuahua", 0.2)]
    ok = ItemResult.classified("b", "ok.jpg", status="ok", top_k=top, dog_score=0.99)
    cat = ItemResult.classified("b", "cat.jpg", status="no_dog", top_k=top, dog_score=0.02)
    unsure = ItemResult.classified("b", "maybe.jpg", status="uncertain", top_k=top, dog_score=0.9)
    assert (ok.breed, ok.synset, ok.score) == ("beagle", "n02088364", 0.7)
    for item in (cat, unsure):
        assert (item.breed, item.synset, item.score) == (None, None, None) and item.top_k == top
    with pytest.raises(ValueError):
        ItemResult.classified("b", "x.jpg", status="error", top_k=top)
    with pytest.raises(ValueError):
        ItemResult.classified("b", "x.jpg", status="ok", top_k=[])
    doc = json.loads(build_manifest("job", "job", {"name": "m"}, [ok, cat, unsure]).to_json())
    assert doc["schema_version"] == 3
    assert doc["counts"] == {"ok": 1, "error": 0, "no_dog": 1, "uncertain": 1}
    by_key = {i["key"]: i for i in doc["items"]}
    assert by_key["cat.jpg"]["status"] == "no_dog" and by_key["cat.jpg"]["dog_score"] == 0.02
    assert by_key["cat.jpg"]["breed"] is None and by_key["cat.jpg"]["top_k"][0]["breed"] == "beagle"


def test_a_model_without_a_dog_check_says_why_on_its_card():
    from trainer.publish import no_dog_check_caveat

    scratch, transfer = no_dog_check_caveat({"family": "vgg16_scratch_1"}), no_dog_check_caveat({"family": "vgg16_transfer"})
    assert "NO dog check" in scratch and "from scratch" in scratch and "transfer model" in scratch
    assert "NO dog check" in transfer and "from scratch" not in transfer and "--dog-check none" in transfer
