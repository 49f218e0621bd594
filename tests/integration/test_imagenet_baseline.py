"""`dogbreeds-train imagenet-baseline`: the untrained ImageNet baseline published as a 120-breed
artifact (no photos needed) and served by the worker like any other model, with its dog check
(the ImageNet softmax's dog mass) and its threshold recorded in the artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import SAMPLES
from trainer.cli import main as train_cli
from trainer.not_dogs import FOLDER, find_not_dogs
from worker import images
from worker.classifier import NO_DOG, OK, Classifier

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BREEDS_FILE = SAMPLES.parent / "breeds.txt"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("keys") / "signing"
    assert CliRunner().invoke(train_cli, ["keygen", str(prefix)], catch_exceptions=False).exit_code == 0
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


@pytest.fixture(scope="module")
def published(tmp_path_factory, keys):
    registry = tmp_path_factory.mktemp("registry")
    result = CliRunner().invoke(train_cli, ["imagenet-baseline", "--breeds", str(BREEDS_FILE), "--to", str(registry),
                                            "--version", "v1", "--tf-only", "--sign-key", str(keys[0])],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "signed by sha256:" in result.output and "DOGBREEDS_ALLOW_SAVEDMODEL=1" in result.output
    return registry / "imagenet-baseline" / "v1"


def photos(paths, classifier: Classifier) -> np.ndarray:
    return np.stack([images.load_image(p.read_bytes(), size=classifier.input_size, fit=classifier.input_fit)
                     for p in paths])


def test_the_artifact_records_the_validated_threshold_and_serves_120_breeds(published):
    manifest = json.loads((published / "manifest.json").read_text())
    check = manifest["dog_check"]
    assert (check["method"], check["threshold"], check["score_column"]) == ("imagenet-dog-mass", 0.2749, 120)
    assert "validation" in check["threshold_rule"] and "NOT validated" not in check["threshold_rule"]
    assert manifest["calibration"]["temperature"] == 1.0 and manifest["num_classes"] == 120
    assert "0.2749" in (published / "README.md").read_text()


def test_the_worker_names_sample_dogs_and_answers_no_dog_for_sample_objects(published):
    classifier = Classifier.load(str(published), runtime="tf")
    dogs = [next(iter(sorted(folder.glob("*.jpg")))) for folder in sorted(SAMPLES.iterdir())
            if folder.is_dir() and folder.name != FOLDER]
    answered = classifier.predict(photos(dogs, classifier))
    named = [p.status == OK and p.breed.synset == path.parent.name.split("-")[0] for p, path in zip(answered, dogs)]
    assert sum(named) >= len(dogs) - 1, list(zip([d.name for d in dogs], answered))  # 11 breeds, ImageNet's own head
    objects = [SAMPLES / FOLDER / p.relative_path for p in find_not_dogs(SAMPLES / FOLDER)
               if p.relative_path.startswith("imagenet-objects/")]
    verdicts = classifier.predict(photos(objects, classifier))
    assert sum(v.status == NO_DOG for v in verdicts) >= 0.9 * len(objects)
    assert all(v.dog_score is not None and v.breed is None for v in verdicts if v.status == NO_DOG)
    off = Classifier.load(str(published), runtime="tf", dog_check=False)
    off = off.predict(photos(objects[:3], off))
    assert {v.status for v in off} == {OK}  # --no-dog-check: every photo gets a breed


def test_the_signed_baseline_is_verified_and_its_dog_check_is_covered_by_the_signature(published, keys, tmp_path, monkeypatch):
    """The signature covers manifest.json, so the dog check's threshold too: lowering it in a
    copy is refused by a worker that trusts the key; the default (data-only) worker refuses the
    TF-only artifact with a message that says how to serve it."""
    import shutil

    from worker.artifact import ArtifactError
    from worker.runtimes import RuntimeSelectionError
    from worker.signature import TrustPolicy

    trust = TrustPolicy.from_config(str(keys[1]))
    served = Classifier.load(str(published), runtime="tf", trust=trust)
    assert served.artifact.provenance.verified and served.dog_threshold == 0.2749
    monkeypatch.delenv("DOGBREEDS_ALLOW_SAVEDMODEL", raising=False)
    with pytest.raises(RuntimeSelectionError, match="DOGBREEDS_ALLOW_SAVEDMODEL"):
        Classifier.load(str(published), runtime="auto", trust=trust)

    tampered = tmp_path / "tampered"
    shutil.copytree(published, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["dog_check"]["threshold"] = 0.0  # every photo a dog
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        Classifier.load(str(tampered), runtime="tf", trust=trust)
