"""The artifact's ``input_fit`` (worker.images: ``crop`` or ``squash``) travels from the manifest
to every place the worker resizes a photo: the CLI's predict and the S3/local pipeline. A striped
photo tells the two apart: red borders, a green centre; cropped it is all green (the colour model
says Samoyed), squashed it is two-thirds red (Chihuahua)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import COLOUR_BREEDS
from worker.artifact import ArtifactError, ArtifactManifest, verify_artifact

RED, GREEN = COLOUR_BREEDS["n02085620-Chihuahua"], COLOUR_BREEDS["n02111889-Samoyed"]


def striped_photo(path: Path) -> Path:
    from PIL import Image

    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100], pixels[:, 100:200], pixels[:, 200:] = RED, GREEN, RED
    Image.fromarray(pixels).save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def artifacts(colour_artifact, tmp_path_factory) -> dict[str, Path]:
    """The colour model as written (input_fit crop, the default) and as a legacy artifact whose
    manifest predates input_fit (read as squash)."""
    root = tmp_path_factory.mktemp("fits")
    crop = shutil.copytree(colour_artifact, root / "crop" / "colours")
    legacy = shutil.copytree(colour_artifact, root / "legacy" / "colours")
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["input_fit"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    return {"crop": crop, "squash": legacy}


def test_manifest_records_the_fit_and_reads_legacy_as_squash(artifacts):
    assert json.loads((artifacts["crop"] / "manifest.json").read_text())["input_fit"] == "crop"
    assert verify_artifact(artifacts["crop"]).input_fit == "crop"
    assert verify_artifact(artifacts["squash"]).input_fit == "squash"
    document = json.loads((artifacts["crop"] / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="input_fit"):
        ArtifactManifest.from_dict({**document, "input_fit": "letterbox"})


def test_cli_predict_resizes_with_the_artifact_fit(artifacts, tmp_path):
    from click.testing import CliRunner

    from worker.cli import main

    photo = striped_photo(tmp_path / "striped.png")
    breeds = {}
    for fit, path in artifacts.items():
        result = CliRunner().invoke(main, ["predict", "--model", str(path), "--json", str(photo)])
        assert result.exit_code == 0, result.output
        breeds[fit] = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))["breed"]
    assert breeds == {"crop": "Samoyed", "squash": "Chihuahua"}


def test_pipeline_resizes_with_the_artifact_fit(artifacts, tmp_path):
    from worker.classifier import Classifier
    from worker.messages import ImageRef
    from worker.pipeline import LocalReader, Pipeline

    striped_photo(tmp_path / "striped.png")
    breeds = {}
    for fit, path in artifacts.items():
        pipeline = Pipeline(Classifier.load(str(path)), s3=None, reader=LocalReader())
        try:
            [result] = pipeline.classify([ImageRef(str(tmp_path), "striped.png")])
        finally:
            pipeline.close()
        assert result.status == "ok", result
        breeds[fit] = result.breed
    assert breeds == {"crop": "Samoyed", "squash": "Chihuahua"}
