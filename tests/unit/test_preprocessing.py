"""Tests for trainer/preprocessing.py (Equalize, backbone normalisation, augmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
PIL_Image = pytest.importorskip("PIL.Image")
exposure = pytest.importorskip("skimage.exposure")

from trainer.preprocessing import (  # noqa: E402
    PREPROCESSING_CHOICES,
    PREPROCESSING_DESCRIPTIONS,
    Equalize,
    VGGPreprocess,
    augment_batch,
    backbone_normalization,
    build_augmentation,
    build_preprocessing,
)

PHOTOS = Path(__file__).resolve().parents[2] / "samples" / "photos"
TOL = 1.0 / 255.0 + 1e-6


def _skimage_equalize(batch_uint8: np.ndarray) -> np.ndarray:
    """Reference: skimage.exposure.equalize_hist per image, per uint8 channel."""
    return np.stack(
        [
            np.stack([exposure.equalize_hist(img[..., c]) for c in range(img.shape[-1])], axis=-1)
            for img in batch_uint8
        ]
    )


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Real photos: one from each of several breed folders, 224x224 RGB uint8."""
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted(PHOTOS.iterdir()) if d.is_dir() and any(d.glob("*.jpg"))]
    files = files[:6]
    if len(files) < 5:
        pytest.skip(f"need >= 5 sample photos under {PHOTOS}")
    imgs = [
        np.asarray(PIL_Image.open(f).convert("RGB").resize((224, 224), PIL_Image.BILINEAR), dtype=np.uint8)
        for f in files
    ]
    return np.stack(imgs)


# --------------------------------------------------------------------------
# Equalize vs skimage
# --------------------------------------------------------------------------
def test_equalize_matches_skimage_on_real_photos(photos):
    # The whole batch at once: leaking histograms across images or channels
    # would show up as a mismatch.
    out = Equalize()(photos.astype(np.float32)).numpy()
    ref = _skimage_equalize(photos)
    assert out.shape == photos.shape
    assert out.dtype == np.float32
    diff = np.abs(out / 255.0 - ref)
    assert diff.max() <= TOL, f"max |Equalize/255 - skimage| = {diff.max()}"
    # and it actually changed the photos
    assert np.abs(out - photos).max() > 10


def test_equalize_accepts_uint8_and_rounds_float_input(photos):
    batch = photos[:2]
    ref = Equalize()(batch.astype(np.float32)).numpy()
    np.testing.assert_allclose(Equalize()(batch).numpy(), ref, atol=1e-4)
    # non-integer / out-of-range floats are rounded and clipped to uint8 first
    # Mixed +0.3 / +0.7 offsets: rounding (not flooring) moves some pixels up a
    # level, which changes the histogram (a uniform offset would not).
    offsets = np.where(np.random.default_rng(4).random(batch.shape) < 0.5, 0.3, 0.7)
    jittered = (batch.astype(np.float32) + offsets).astype(np.float32)
    jittered[0, 0, 0, 0] = -20.0
    jittered[0, 0, 1, 0] = 300.0
    expected_u8 = np.clip(np.round(jittered), 0, 255).astype(np.uint8)
    out = Equalize()(jittered).numpy()
    assert np.abs(out / 255.0 - _skimage_equalize(expected_u8)).max() <= TOL


def test_equalize_low_contrast_synthetic():
    rng = np.random.default_rng(0)
    img = rng.integers(100, 121, size=(2, 48, 40, 3)).astype(np.uint8)  # 100..120 only
    out = Equalize()(img.astype(np.float32)).numpy()
    ref = _skimage_equalize(img)
    assert np.abs(out / 255.0 - ref).max() <= TOL
    # equalisation stretches the narrow range to (almost) the full range
    assert out.max() == pytest.approx(255.0)
    assert out.max() - out.min() > 200


def test_equalize_constant_channel():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(1, 32, 32, 3)).astype(np.uint8)
    img[..., 1] = 77  # constant green channel
    out = Equalize()(img.astype(np.float32)).numpy()
    ref = _skimage_equalize(img)
    assert np.all(ref[..., 1] == 1.0)  # what skimage does for a constant channel
    np.testing.assert_allclose(out[..., 1], 255.0, atol=1e-4)
    assert np.abs(out / 255.0 - ref).max() <= TOL
    # fully constant image too
    const = np.full((2, 8, 8, 3), 200, np.uint8)
    np.testing.assert_allclose(Equalize()(const).numpy(), 255.0, atol=1e-4)


# --------------------------------------------------------------------------
# Serialisation / export
# --------------------------------------------------------------------------
def _model(size=64):
    inputs = keras.Input((size, size, 3), dtype="float32")
    x = Equalize(name="equalize")(inputs)
    outputs = VGGPreprocess(name="vgg")(x)
    return keras.Model(inputs, outputs)


def _graph_op_types(saved_model_dir: Path) -> set[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    ops = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


def test_equalize_exports_to_savedmodel(photos, tmp_path):
    x = tf.image.resize(photos[:3].astype(np.float32), (64, 64)).numpy().round()
    model = _model(64)
    expected = model(x).numpy()
    export_dir = tmp_path / "sm"
    model.export(str(export_dir), verbose=False)

    ops = _graph_op_types(export_dir)
    assert not ({"PyFunc", "EagerPyFunc", "PyFuncStateless"} & ops), "py_function in exported graph"
    assert "UnsortedSegmentSum" in ops or any("Bincount" in o for o in ops)

    loaded = tf.saved_model.load(str(export_dir))
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)
    # and it's really equalised + VGG-normalised
    ref = _skimage_equalize(x.astype(np.uint8)) * 255.0
    vgg_ref = keras.applications.vgg16.preprocess_input(ref.astype(np.float32))
    np.testing.assert_allclose(served, vgg_ref, atol=1.1)


def test_keras_save_load_roundtrip(photos, tmp_path):
    x = tf.image.resize(photos[:2].astype(np.float32), (64, 64)).numpy().round()
    model = _model(64)
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.get_layer("equalize"), Equalize)
    assert isinstance(reloaded.get_layer("vgg"), VGGPreprocess)
    np.testing.assert_allclose(reloaded(x).numpy(), model(x).numpy(), atol=1e-4)


def test_preprocessing_sequential_save_load_roundtrip(tmp_path):
    seq = build_preprocessing("equalize+vgg", "vgg16")
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, seq(inputs))
    path = tmp_path / "p.keras"
    model.save(path)
    x = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(keras.models.load_model(path)(x).numpy(), model(x).numpy(), atol=1e-4)


# --------------------------------------------------------------------------
# Backbone normalisation
# --------------------------------------------------------------------------
def test_vgg_preprocess_equals_keras_applications():
    x = np.random.default_rng(3).uniform(0, 255, (3, 20, 24, 3)).astype(np.float32)
    ref = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(VGGPreprocess()(x).numpy(), ref, atol=1e-4)
    layer = backbone_normalization("vgg16")
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=1e-4)
    # uint8 input is cast
    x8 = x.round().astype(np.uint8)
    np.testing.assert_allclose(
        VGGPreprocess()(x8).numpy(),
        keras.applications.vgg16.preprocess_input(x8.astype(np.float32)),
        atol=1e-4,
    )


def test_efficientnet_lite0_normalization():
    x = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    out = backbone_normalization("efficientnet_lite0")(x).numpy()
    np.testing.assert_allclose(out, (x - 127.0) / 128.0, atol=1e-6)


def test_unknown_backbone_and_choice_rejected():
    with pytest.raises(ValueError):
        backbone_normalization("resnet9000")
    with pytest.raises(ValueError):
        build_preprocessing("nope", "vgg16")


# --------------------------------------------------------------------------
# build_preprocessing
# --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["fit", "tune"])
def test_the_cli_offers_exactly_the_preprocessings_that_build(command):
    """dogbreeds-train keeps its own list of --preprocessing choices: a choice it offers that
    build_preprocessing refuses would fail only after the photos are decoded; one it forgets could
    never be trained. Each offered choice is explained in the option's help."""
    from trainer.cli import main as train_cli

    option = next(p for p in train_cli.commands[command].params if p.name == "preprocessing")
    assert set(option.type.choices) == set(PREPROCESSING_CHOICES) == set(PREPROCESSING_DESCRIPTIONS)
    for choice in option.type.choices:
        assert f"{choice}:" in option.help, choice
        assert isinstance(build_preprocessing(choice, "vgg16"), keras.Sequential)


def test_build_preprocessing_choices(photos):
    x = photos[:2].astype(np.float32)
    eq = _skimage_equalize(photos[:2]).astype(np.float32) * 255.0
    vgg = keras.applications.vgg16.preprocess_input

    seed_out = build_preprocessing("seed", "vgg16")(x).numpy()
    assert seed_out.min() >= 0.0 and seed_out.max() <= 1.0
    assert seed_out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(seed_out, eq / 255.0, atol=TOL)

    vgg_out = build_preprocessing("vgg", "vgg16")(x).numpy()
    np.testing.assert_allclose(vgg_out, vgg(x.copy()), atol=1e-4)
    # BGR, mean-subtracted: channel 0 is blue - 103.939
    np.testing.assert_allclose(vgg_out[..., 0], x[..., 2] - 103.939, atol=1e-4)
    assert vgg_out.min() < 0

    eqvgg_out = build_preprocessing("equalize+vgg", "vgg16")(x).numpy()
    np.testing.assert_allclose(eqvgg_out, vgg(eq.copy()), atol=1.01)

    eff = build_preprocessing("vgg", "efficientnet_lite0")(x).numpy()
    np.testing.assert_allclose(eff, (x - 127.0) / 128.0, atol=1e-5)
    eff_eq = build_preprocessing("equalize+vgg", "efficientnet_lite0")(x).numpy()
    np.testing.assert_allclose(eff_eq, (eq - 127.0) / 128.0, atol=1.01 / 128.0)


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_batch(photos) -> np.ndarray:
    return tf.image.resize(photos[:3].astype(np.float32), (64, 64)).numpy().round()


def test_augmentation_inactive_at_inference(small_batch):
    aug = build_augmentation(seed=0)
    out = aug(small_batch, training=False)
    np.testing.assert_array_equal(np.asarray(out), small_batch)


def test_augmentation_changes_image_in_training(small_batch):
    aug = build_augmentation(seed=0)
    out = np.asarray(aug(small_batch, training=True))
    assert out.shape == small_batch.shape
    assert np.abs(out - small_batch).mean() > 1.0
    assert out.min() >= 0.0 and out.max() <= 255.0


def test_augmentation_deterministic_per_seed(small_batch):
    a = np.asarray(build_augmentation(seed=42)(small_batch, training=True))
    b = np.asarray(build_augmentation(seed=42)(small_batch, training=True))
    c = np.asarray(build_augmentation(seed=43)(small_batch, training=True))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0


def test_augmentation_layers_have_distinct_seeds():
    aug = build_augmentation(seed=5)
    seeds = [layer.seed for layer in aug.layers]
    assert len(aug.layers) == 5
    assert None not in seeds and len(set(seeds)) == len(seeds)
    contrast = [layer for layer in aug.layers if isinstance(layer, keras.layers.RandomContrast)][0]
    assert tuple(contrast.value_range) == (0, 255)


def test_augment_batch(small_batch):
    imgs = small_batch.astype(np.uint8)
    out = augment_batch(imgs, seed=7)
    assert out.dtype == np.uint8 and out.shape == imgs.shape
    assert np.abs(out.astype(np.int16) - imgs).mean() > 1.0
    np.testing.assert_array_equal(out, augment_batch(imgs, seed=7))
    assert not np.array_equal(out, augment_batch(imgs, seed=8))
