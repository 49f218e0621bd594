"""Horizontal-flip test-time augmentation inside the served model (trainer.models.with_flip_tta):
the answer is the mean of the answers on the photo and on its mirror image, in Keras, in the
exported SavedModel and in the OpenVINO variants built from it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trainer import models
from trainer.pooling import global_pooling

SIZE = 12


def tiny_model(seed: int = 0, classes: int = 3) -> keras.Model:
    """A conv net whose answer depends on left/right: an asymmetric kernel, a dense head on a
    flattened (position-keeping) map."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="breed")(x)
    return keras.Model(inputs, outputs)


MODEL = tiny_model()
TTA = models.with_flip_tta(MODEL)
photos = arrays(np.uint8, st.tuples(st.integers(1, 4), st.just(SIZE), st.just(SIZE), st.just(3)))


@settings(max_examples=25, deadline=None)
@given(photos)
def test_flip_tta_is_the_mean_of_the_photo_and_its_mirror_image(batch):
    x = batch.astype(np.float32)
    expected = (np.asarray(MODEL(x)) + np.asarray(MODEL(x[:, :, ::-1]))) / 2  # width is axis 2
    np.testing.assert_allclose(np.asarray(TTA(x)), expected, atol=1e-6)
    # a mirror image gets the same answer as the photo: the property TTA buys
    np.testing.assert_allclose(np.asarray(TTA(x[:, :, ::-1])), np.asarray(TTA(x)), atol=1e-6)


def test_the_model_itself_is_not_mirror_symmetric():
    """Guard for the test above: with a symmetric model, any flip would pass it."""
    x = np.random.default_rng(0).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    assert np.abs(np.asarray(MODEL(x)) - np.asarray(MODEL(x[:, :, ::-1]))).max() > 1e-3
    assert np.abs(np.asarray(MODEL(x)) - np.asarray(MODEL(x[:, ::-1]))).max() > 1e-3


def test_assemble_inference_model_adds_flip_tta_only_when_asked(tmp_path):
    family = models.get_family("vgg16_scratch_0")  # an image family: the trained model is the whole model
    plain = models.assemble_inference_model(family, MODEL, preprocessing_choice="vgg", input_shape=(SIZE, SIZE, 3))
    assert plain is MODEL
    served = models.assemble_inference_model(family, MODEL, preprocessing_choice="vgg", input_shape=(SIZE, SIZE, 3),
                                             flip_tta=True)
    assert [layer.name for layer in served.layers][-1] == "flip_tta"
    x = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(served(x)), (np.asarray(MODEL(x)) + np.asarray(MODEL(x[:, :, ::-1]))) / 2,
                               atol=1e-6)
    served.save(tmp_path / "tta.keras")  # the flip layer is a registered Keras layer
    reloaded = keras.models.load_model(tmp_path / "tta.keras", compile=False)
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(served(x)), atol=1e-6)


def gem_model(seed: int = 0) -> keras.Model:
    """Like the VGG16 transfer model in miniature: convolutions, GeM pooling, dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = global_pooling("gem")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_flip_tta_is_exported_into_the_saved_model_and_the_openvino_variants(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import openvino as ov

    from trainer import artifact_writer, fast_runtimes
    from worker import runtimes

    single = gem_model()
    served = models.with_flip_tta(single)
    rng = np.random.default_rng(2)
    photos = rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    x = photos.astype(np.float32)
    expected = (np.asarray(single(x)) + np.asarray(single(x[:, :, ::-1]))) / 2
    assert np.abs(expected - np.asarray(single(x))).max() > 1e-4  # the mirror image changes the answer

    artifact_writer.export_saved_model(served, tmp_path / "model")
    saved = runtimes.load(tmp_path / "model", runtimes.RuntimeEntry("tf", "tf", ".", "fp32"),
                          input_size=[SIZE, SIZE], num_classes=0)
    np.testing.assert_allclose(saved(x), expected, atol=1e-5)

    files, entries = fast_runtimes.build_openvino_variants(tmp_path / "model", tmp_path / "variants",
                                                           calibration=photos, heldout=photos, threads=1)
    fp32 = runtimes.load_openvino_model(tmp_path / "variants" / "model-openvino-bf16" / "model.xml", "fp32", threads=1)
    np.testing.assert_allclose(fp32(x), expected, atol=1e-3)  # the bf16 IR's fp16 weights, computed in f32
    assert entries["openvino-bf16"]["agreement"]["top1_agreement"] == 1.0
    # int8: both branches' GeM pooling and dense head stay in float (GeM cubes its inputs)
    int8 = ov.Core().read_model(str(tmp_path / "variants" / "model-openvino-int8" / "model.xml"))
    tail = set(fast_runtimes.after_last_convolution(int8))
    tail_types = [op.get_type_name() for op in int8.get_ordered_ops() if op.get_friendly_name() in tail]
    assert tail_types.count("Power") >= 4 and tail_types.count("MatMul") == 2  # GeM: 2 powers per branch
    quantised_inputs = {op.get_friendly_name() for op in int8.get_ordered_ops()
                        if any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())}
    assert not quantised_inputs & tail
    assert sum(op.get_type_name() == "Convolution" and op.get_friendly_name() in quantised_inputs
               for op in int8.get_ordered_ops()) == 6  # three convolutions per branch run int8
