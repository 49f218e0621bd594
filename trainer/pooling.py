"""Global pooling of a backbone's last feature map, applied once in the frozen part so that the
cached features of a photo are a vector (512 floats for VGG16) instead of a map: heads then
train and tune on small arrays in memory.

VGG16 caches GeM (p=3, ``mean(x**3)**(1/3)``) features: between average and max pooling, it
weighs the strongest activations (the dog) more than the background without keeping only the
single strongest one. EfficientNet-Lite0 keeps the average pooling it was trained with."""

from __future__ import annotations

import keras
from keras import layers, ops

POOLINGS = ("gem", "avg", "avgmax")


@keras.saving.register_keras_serializable(package="dogbreeds")
class GeneralizedMeanPooling2D(keras.layers.Layer):
    """GeM pooling (Radenović et al., 2018): ``mean(max(x, eps) ** p) ** (1 / p)`` over height and
    width; p=1 is average pooling, p -> infinity max pooling. Channels-last maps in, vectors out."""

    def __init__(self, p: float = 3.0, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p, self.epsilon = float(p), float(epsilon)

    def call(self, inputs):
        x = ops.power(ops.maximum(ops.cast(inputs, "float32"), self.epsilon), self.p)
        return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


def global_pooling(name: str, *, layer_name: str | None = None) -> keras.layers.Layer:
    """A feature map -> vector layer: ``gem`` (p=3), ``avg`` or ``avgmax`` (both concatenated)."""
    if name == "gem":
        return GeneralizedMeanPooling2D(3.0, name=layer_name or "gem_pool")
    if name == "avg":
        return layers.GlobalAveragePooling2D(name=layer_name or "avg_pool")
    if name == "avgmax":
        return _AvgMax(name=layer_name or "avgmax_pool")
    raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")


@keras.saving.register_keras_serializable(package="dogbreeds")
class _AvgMax(keras.layers.Layer):
    """Average and max pooling, concatenated (2 x channels)."""

    def call(self, inputs):
        return ops.concatenate([ops.mean(inputs, axis=(1, 2)), ops.max(inputs, axis=(1, 2))], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])
