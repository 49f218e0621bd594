"""`dogbreeds-train fit`'s default family starts from Lite0's ImageNet classifier, so it needs breed
folders named after ImageNet-1k synsets: other breeds get a usage error that names the way out,
before any photo is decoded (not after minutes of feature extraction)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import colour_photo
from trainer import cli, data, models


def _dataset(root, folders, per_breed=6):
    for b, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_breed):
            (root / folder / f"{i}.jpg").write_bytes(colour_photo((40 * b, 90, 200 - 40 * b), seed=i))
    return root


def test_fit_defaults_are_the_cross_validated_choice():
    fit = {p.name: p for p in cli.fit.params}
    assert fit["model"].default == "efficientnet_lite0_imagenet_head" == cli.DEFAULT_MODEL
    assert fit["image_size"].default == 320 == cli.DEFAULT_IMAGE_SIZE
    assert cli.DEFAULT_MODEL in cli.MODEL_CHOICES


def test_default_family_on_breeds_outside_imagenet_is_a_usage_error_before_decoding(tmp_path, monkeypatch):
    photos = _dataset(tmp_path / "photos", ["n99999991-Moonhound", "n02088364-beagle"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("photos decoded before the breeds were checked")

    monkeypatch.setattr(data, "load_photos", no_decoding)
    result = CliRunner().invoke(cli.main, ["fit", str(photos), "--run-dir", str(tmp_path / "run"),
                                           "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "n99999991" in result.output and "efficientnet_lite0_transfer" in result.output
    assert "n02088364" not in result.output.split("ImageNet-1k classes:")[-1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["n02088364-beagle", "n02111889-Samoyed", "n02115641-dingo", "n99999991-Moonhound",
                                 "n04254680-soccer_ball", "moonhound", "n0-x", ""]), min_size=0, max_size=5))
def test_imagenet_head_accepts_exactly_the_imagenet_1k_classes(folders):
    # every ImageNet-1k synset (a dog or not) has a column in Lite0's classifier; anything else does not
    known = {"n02088364", "n02111889", "n02115641", "n04254680"}
    if folders and all(f.split("-", 1)[0] in known for f in folders):
        kernel, bias = models.imagenet_breed_classifier(folders)
        assert kernel.shape == (models.LITE0_FEATURES, len(folders)) and bias.shape == (len(folders),)
    else:
        with pytest.raises(models.NotImageNetBreeds):
            models.imagenet_breed_classifier(folders)
