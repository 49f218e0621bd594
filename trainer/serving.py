"""The served model: the breed model wrapped so that it answers the artifact's output contract.

    photos (float32 RGB 0..255) -> [breed model] -> breed probabilities p (n, C)
                                      `-> pooled features f (the same forward pass)
    output_0 = concat(softmax(log p / T), dog_score(f))      (n, C + 1)

Column ``j < C`` is breed ``j``'s calibrated probability (temperature ``T``, fitted on the
validation split, see trainer.calibration); column ``C`` is the dog score in [0, 1], present
when the artifact manifest has a ``dog_check`` (``dog_check.score_column == C``). One output
tensor: every runtime (TensorFlow, the OpenVINO int8 and bf16 conversions, the int8 -> bf16
cascade) runs the same graph, so none can serve uncalibrated scores or forget the dog score.

Dog scores (``dog_check.method``):

- ``dog-head``: a logistic dog/not-dog head on the served model's own pooled features
  (trained with not-dog photos, trainer.dog_check): one dot product, no second pass.
- ``imagenet-dog-mass``: EfficientNet-Lite0's genuine 1000-way ImageNet head; the score is its
  softmax mass on the 121 dog classes (trainer.imagenet). Free on a Lite0 model (the head reads
  the same average-pooled features); a second, Lite0, pass for a VGG16 model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

EPS = 1e-12


@keras.saving.register_keras_serializable(package="dogbreeds")
class TemperatureSoftmax(layers.Layer):
    """``softmax(log(p) / T)``: temperature scaling of probabilities (p from a softmax)."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, probs):
        return ops.softmax(ops.log(ops.clip(probs, EPS, 1.0)) / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@dataclass(frozen=True)
class DogHead:
    """A logistic dog/not-dog head on pooled features: ``sigmoid(f . w + b)``."""

    weights: np.ndarray  # (d,)
    bias: float

    def layer(self, name: str = "dog_score") -> layers.Dense:
        dense = layers.Dense(1, activation="sigmoid", name=name)
        dense.build((None, len(self.weights)))
        dense.set_weights([np.asarray(self.weights, np.float32).reshape(-1, 1), np.array([self.bias], np.float32)])
        dense.trainable = False
        return dense

    def score(self, features: np.ndarray) -> np.ndarray:
        z = np.asarray(features, np.float64) @ np.asarray(self.weights, np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-z))


def imagenet_dog_mass_layers(name: str = "dog_score"):
    """Pooled Lite0 features -> ImageNet 1000-way softmax -> sum over the dog classes."""
    from trainer import imagenet

    kernel, bias = imagenet.lite0_classifier_weights()
    head = layers.Dense(1000, activation="softmax", name="imagenet_classes")
    head.build((None, kernel.shape[0]))
    head.set_weights([kernel, bias])
    mask = np.zeros((1000, 1), np.float32)
    mask[imagenet.dog_indices()] = 1.0
    mass = layers.Dense(1, use_bias=False, name=name)
    mass.build((None, 1000))
    mass.set_weights([mask])
    head.trainable = mass.trainable = False
    return lambda features: mass(head(features))


def pooled_features(inference: keras.Model):
    """The pooled backbone features inside an inference model: the output of (the first call
    of) its frozen part, a nested model named ``<backbone>_to_<layer>[_<pooling>]``, GeM-pooled
    when it is a map (fine-tuned families cache a map). Symbolic, so the dog head shares the
    breed model's forward pass. None for models without a frozen part (from-scratch ones)."""
    from trainer.pooling import global_pooling

    for layer in inference.layers:
        if isinstance(layer, keras.Model) and "_to_" in layer.name:
            # the tensor of its call in THIS graph: a functional model's own ``output`` is the one
            # inside it, not connected to the inference model's input
            out = layer._inbound_nodes[0].output_tensors[0]
            return out if len(out.shape) == 2 else global_pooling("gem", layer_name="dog_features_gem")(out)
    return None


def lite0_second_pass(inputs, input_shape):
    """Average-pooled EfficientNet-Lite0 features of the same photos (a second backbone, for
    a served model whose own backbone has no ImageNet head)."""
    from trainer import models, preprocessing
    from trainer.backbones import build_backbone

    backbone, _ = build_backbone("efficientnet_lite0", weights="imagenet", input_shape=input_shape)
    x = preprocessing.build_preprocessing("vgg", "efficientnet_lite0")(inputs)
    return models.frozen_part(backbone, None, "avg")(x, training=False)


def served_model(inference: keras.Model, *, temperature: float = 1.0, dog_method: str | None = None,
                 dog_head: DogHead | None = None, backbone: str | None = None) -> keras.Model:
    """Wrap an inference model (photos -> breed probabilities) into the served model (see the
    module doc). ``dog_method``: None (no dog score: output (n, C)), ``dog-head`` (needs
    ``dog_head``) or ``imagenet-dog-mass``."""
    inputs = inference.input
    calibrated = TemperatureSoftmax(temperature, name="calibrated_breeds")(inference.output)
    if dog_method is None:
        return keras.Model(inputs, calibrated, name="served")
    if dog_method == "dog-head":
        if dog_head is None:
            raise ValueError("dog_method 'dog-head' needs the fitted dog head")
        features = pooled_features(inference)
        if features is None:
            raise ValueError("this model has no pooled features for a dog head")
        score = dog_head.layer()(features)
    elif dog_method == "imagenet-dog-mass":
        features = pooled_features(inference) if backbone == "efficientnet_lite0" else None
        if features is None or features.shape[-1] != 1280:
            features = lite0_second_pass(inputs, tuple(inference.input_shape[1:]))
        score = imagenet_dog_mass_layers()(features)
    else:
        raise ValueError(f"unknown dog check method {dog_method!r}")
    outputs = layers.Concatenate(name="breeds_and_dog_score")([calibrated, score])
    return keras.Model(inputs, outputs, name="served")
