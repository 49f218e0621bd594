"""The served model's output contract (trainer.serving -> artifact -> worker.runtimes ->
worker.classifier): calibrated breed scores and the dog score, the same from every runtime;
the dog threshold and --min-score decide the status; old artifacts keep working."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import COLOUR_BREEDS, DOG_CHECK_TEMPERATURE, FAST_SIZE, colour_data, colour_photo, grey_data
from trainer.calibration import apply_temperature
from worker import runtimes
from worker.artifact import ArtifactError, ArtifactManifest, read_manifest
from worker.classifier import NO_DOG, OK, UNCERTAIN, Classifier

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
C = len(COLOUR_BREEDS)
RUNTIMES = ("tf", "openvino-int8", "openvino-bf16")
TOLERANCE = {"tf": 1e-5, "openvino-int8": 0.06, "openvino-bf16": 0.03}  # breed scores
DOG_TOLERANCE = {"tf": 1e-5, "openvino-int8": 0.15, "openvino-bf16": 0.03}  # int8: a 2-convolution net's features


def between_breeds(seed0: int = 400) -> np.ndarray:
    """Photos coloured halfway between two breeds: the model hesitates, so the temperature
    visibly moves their scores (on the pure colours the tiny model is certain either way)."""
    from worker import images

    colours = list(COLOUR_BREEDS.values())
    mixes = [tuple((a + b) // 2 for a, b in zip(colours[i], colours[j])) for i in range(3) for j in range(i + 1, 3)]
    return np.stack([images.load_image(colour_photo(rgb, seed=seed), size=(FAST_SIZE, FAST_SIZE))
                     for rgb in mixes for seed in range(seed0, seed0 + 2)])


@pytest.fixture(scope="module")
def photos():
    dogs, labels = colour_data(6, seed0=300)
    return (np.concatenate([dogs, between_breeds(), grey_data(4, seed0=300)]),
            np.concatenate([labels, np.full(6, -2), np.full(12, -1)]))  # -2: between breeds, -1: no dog


@pytest.fixture(scope="module")
def reference(dog_check_artifact, photos):
    """What the served model must answer, from the unwrapped Keras parts and numpy."""
    x = photos[0].astype(np.float32)
    raw = np.asarray(dog_check_artifact["breed_model"](x))
    dog = dog_check_artifact["dog_head"].score(np.asarray(dog_check_artifact["frozen"](x)))
    return raw, apply_temperature(raw, DOG_CHECK_TEMPERATURE), dog


def test_reference_world_makes_the_checks_meaningful(reference, photos):
    raw, calibrated, dog = reference
    labels = photos[1]
    # the temperature moves the scores of the photos between breeds by more than any runtime's
    # tolerance, so a runtime that skipped it could not pass
    assert np.abs(raw - calibrated)[labels == -2].max() > 2 * max(TOLERANCE.values())
    assert (dog[labels >= 0] > 0.5).all() and (dog[labels == -1] < 0.5).all()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_serves_calibrated_breeds_and_the_dog_score(dog_check_artifact, photos, reference, runtime):
    raw, calibrated, dog = reference
    classifier = Classifier.load(str(dog_check_artifact["path"]), runtime=runtime)
    breeds, dog_scores = classifier.scores(photos[0])
    assert breeds.shape == (len(photos[0]), C)
    rows = slice(None) if runtime != "openvino-int8" else photos[1] != -1  # int8: not held to the greys' hints
    np.testing.assert_allclose(breeds[rows], calibrated[rows], atol=TOLERANCE[runtime])
    np.testing.assert_allclose(dog_scores, dog, atol=DOG_TOLERANCE[runtime])
    # the same decisions as the reference, on dogs and on photos without one
    statuses = np.array([p.status for p in classifier.predict(photos[0])])
    expected = np.where(dog < dog_check_artifact["threshold"], NO_DOG, OK)
    clear = np.abs(dog - dog_check_artifact["threshold"]) > DOG_TOLERANCE[runtime]
    assert (statuses[clear] == expected[clear]).all() and clear[photos[1] != -2].all()


def test_manifest_records_runtime_agreement_on_the_dog_decision(dog_check_artifact):
    manifest = read_manifest(dog_check_artifact["path"])
    assert manifest.output_width == C + 1 and manifest.temperature == DOG_CHECK_TEMPERATURE
    for key in ("openvino-int8", "openvino-bf16"):
        agreement = manifest.runtimes[key]["agreement"]
        assert agreement["dog_check_agreement"] == 1.0 and agreement["dog_check_photos"] == 45
        assert agreement["photos"] == 30  # top-1 agreement is measured on the dog photos only
    fallback = manifest.runtimes["openvino-int8"]["fallback"]
    assert fallback["dog_threshold"] == 0.5 and fallback["dog_below_margin"] >= 0


def _with_threshold(classifier: Classifier, threshold: float) -> Classifier:
    manifest = classifier.artifact.manifest
    manifest = dataclasses.replace(manifest, dog_check={**manifest.dog_check, "threshold": threshold})
    return dataclasses.replace(classifier, artifact=dataclasses.replace(classifier.artifact, manifest=manifest))


@pytest.fixture(scope="module")
def tf_classifier(dog_check_artifact):
    return Classifier.load(str(dog_check_artifact["path"]), runtime="tf")


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1.0))
def test_the_artifact_threshold_decides_no_dog(tf_classifier, photos, threshold):
    classifier = _with_threshold(tf_classifier, threshold)
    predictions = classifier.predict(photos[0])
    for p in predictions:
        assert (p.status == NO_DOG) == (p.dog_score < threshold)
        assert (p.breed is None) == (p.status != OK)
        assert len(p.top_k) == C  # the hint is kept whatever the status


def test_check_off_gives_a_photo_without_a_dog_a_breed(tf_classifier, photos):
    greys = photos[0][photos[1] == -1]
    assert {p.status for p in tf_classifier.predict(greys)} == {NO_DOG}
    off = dataclasses.replace(tf_classifier, dog_check=False)
    answered = off.predict(greys)
    assert {p.status for p in answered} == {OK}
    assert all(p.breed is not None and p.dog_score is not None for p in answered)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1.0))
def test_min_score_makes_low_scores_uncertain(tf_classifier, photos, min_score):
    classifier = dataclasses.replace(tf_classifier, min_score=min_score)
    for p in classifier.predict(photos[0]):
        if p.status != NO_DOG:
            assert (p.status == UNCERTAIN) == (p.top_k[0].score < min_score)


def test_a_model_without_dog_check_or_calibration_still_serves(fast_colour_artifact, tmp_path, caplog):
    """A schema-1 artifact (written before the dog check existed): every photo ok, dog_score
    None, temperature 1, and a logged note."""
    old = tmp_path / "old"
    shutil.copytree(fast_colour_artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest.pop("dog_check", None)
    manifest.pop("calibration", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="worker.classifier"):
        classifier = Classifier.load(str(old), runtime="tf")
    assert "no dog check" in caplog.text and "no calibration" in caplog.text
    predictions = classifier.predict(grey_data(2))
    assert all(p.status == OK and p.dog_score is None and p.breed for p in predictions)
    assert classifier.artifact.manifest.temperature == 1.0


def _manifest_dict(dog_check_artifact):
    return json.loads((dog_check_artifact["path"] / "manifest.json").read_text())


@pytest.mark.parametrize("bad", [
    {"threshold": 1.5}, {"threshold": "0.5"}, {"score_column": 0}, {"method": ""},
])
def test_malformed_dog_checks_are_refused(dog_check_artifact, bad):
    d = _manifest_dict(dog_check_artifact)
    d["dog_check"] = {**d["dog_check"], **bad}
    with pytest.raises(ArtifactError):
        ArtifactManifest.from_dict(d)


def test_newer_schema_and_bad_temperature_are_refused(dog_check_artifact):
    d = _manifest_dict(dog_check_artifact)
    with pytest.raises(ArtifactError, match="newer"):
        ArtifactManifest.from_dict({**d, "schema_version": 3})
    with pytest.raises(ArtifactError, match="temperature"):
        ArtifactManifest.from_dict({**d, "calibration": {"temperature": 0}})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=30), st.floats(0, 0.3),
       st.floats(0, 1), st.floats(0, 0.3))
def test_cascade_reruns_close_breed_calls_and_close_dog_calls(rows, margin, threshold, dog_margin):
    """Two breeds + the dog score: a photo is re-run iff its top-2 breed margin is below the
    margin or its dog score is within dog_margin of the threshold."""
    out = np.array([[a, 1 - a, d] for a, d in rows], np.float32)
    calls = []

    def primary(x):
        return out.copy()

    def secondary(x):
        calls.append(len(x))
        return np.full((len(x), 3), 7.0, np.float32)

    run = runtimes.with_fallback(primary, secondary, margin, breed_columns=2, dog_threshold=threshold,
                                 dog_margin=dog_margin)
    got = run(np.zeros((len(out), 1)))
    expected = (np.abs(out[:, 0] - out[:, 1]) < margin) | (np.abs(out[:, 2] - threshold) < dog_margin)
    assert np.array_equal(got[:, 0] == 7.0, expected)
    assert run.fallbacks == int(expected.sum())


def test_predict_cli_answers_no_dog_and_honours_the_flags(dog_check_artifact, tmp_path):
    from worker.cli import main as worker_cli

    grey, dog = tmp_path / "grey.jpg", tmp_path / "dog.jpg"
    grey.write_bytes(colour_photo((128, 128, 128), seed=500))
    dog.write_bytes(colour_photo(COLOUR_BREEDS["n02111889-Samoyed"], seed=500))
    model = str(dog_check_artifact["path"])

    def run(*flags):
        result = CliRunner().invoke(worker_cli, ["predict", "--model", model, "--json", "--runtime", "tf", *flags,
                                                 str(grey), str(dog)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    grey_row, dog_row = run()
    assert grey_row["status"] == "no_dog" and grey_row["breed"] is None and grey_row["dog_score"] < 0.5
    assert dog_row["status"] == "ok" and dog_row["breed"] == "Samoyed"
    assert [r["status"] for r in run("--no-dog-check")] == ["ok", "ok"]
    assert [r["status"] for r in run("--min-score", "1.0")] == ["no_dog", "uncertain"]
