"""Image preprocessing and augmentation layers (Keras 3, TensorFlow backend).

Everything here is written in TensorFlow ops only (no ``tf.py_function``, no
numpy inside ``call``) so that it traces into a SavedModel produced by
``model.export()`` and can be served without Python-side preprocessing.

Inputs are RGB images with values in 0..255, shape ``(batch, H, W, 3)``,
float32 (uint8 is accepted and cast).

Pipeline order: augmentation (training only, on 0..255 RGB) -> preprocessing
(one of :data:`PREPROCESSING_CHOICES`) -> backbone.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "Equalize",
    "VGGPreprocess",
    "VGG_BGR_MEAN",
    "BACKBONE_NORMALIZATIONS",
    "backbone_normalization",
    "PREPROCESSING_CHOICES",
    "PREPROCESSING_DESCRIPTIONS",
    "build_preprocessing",
    "build_augmentation",
    "augment_batch",
]

# ImageNet per-channel mean in BGR order, as used by
# keras.applications.vgg16.preprocess_input ("caffe" mode).
VGG_BGR_MEAN = (103.939, 116.779, 123.68)


# --------------------------------------------------------------------------
# Histogram equalisation
# --------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="dogbreeds")
class Equalize(keras.layers.Layer):
    """Per-image, per-channel histogram equalisation.

    Equivalent to ``255 * skimage.exposure.equalize_hist(channel)`` applied
    independently to each uint8 channel of each image.

    For an integer image skimage builds one histogram bin per integer value
    between the channel's min and max, takes the normalised cumulative sum
    and maps every pixel through ``np.interp`` on the bin centres. As every
    pixel value *is* a bin centre, the interpolation is an exact lookup, so
    the result is simply ``count(pixels <= v) / n_pixels`` (bins below the
    min are empty, so using the full 0..255 range gives the same CDF). A
    constant channel therefore maps to 1.0 (here 255.0), like skimage.

    Input values are rounded (half to even, like ``np.round``) and clipped
    to 0..255 before the histogram is computed. Output is float32 in
    (0, 255].
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = False

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        unbatched = x.shape.rank == 3
        if unbatched:
            x = x[tf.newaxis]
        if x.dtype.is_floating:
            x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
        else:
            x = tf.clip_by_value(x, 0, 255)
        levels = tf.cast(x, tf.int32)  # (B, H, W, C), values 0..255

        shape = tf.shape(levels)
        b, h, w, c = shape[0], shape[1], shape[2], shape[3]
        n_pixels = h * w

        # (B, C, H*W): one row per (image, channel).
        per_channel = tf.reshape(tf.transpose(levels, [0, 3, 1, 2]), [b * c, n_pixels])
        row_offset = tf.range(b * c, dtype=tf.int32)[:, tf.newaxis] * 256
        segment_ids = per_channel + row_offset  # unique bin per (row, level)

        hist = tf.math.unsorted_segment_sum(
            tf.ones_like(segment_ids), segment_ids, num_segments=b * c * 256
        )
        hist = tf.reshape(hist, [b * c, 256])
        cdf = tf.math.cumsum(hist, axis=-1)  # int32, exact
        cdf = tf.cast(cdf, tf.float32) / tf.cast(n_pixels, tf.float32)

        mapped = tf.gather(cdf, per_channel, batch_dims=1)  # (B*C, H*W)
        out = tf.transpose(tf.reshape(mapped, [b, c, h, w]), [0, 2, 3, 1]) * 255.0
        if unbatched:
            out = out[0]
        return tf.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config()


# --------------------------------------------------------------------------
# Backbone normalisations
# --------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="dogbreeds")
class VGGPreprocess(keras.layers.Layer):
    """``keras.applications.vgg16.preprocess_input`` as a layer.

    RGB 0..255 -> BGR with the ImageNet mean subtracted (no scaling).
    """

    def __init__(self, mean=VGG_BGR_MEAN, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        bgr = tf.reverse(x, axis=[-1])
        return bgr - tf.constant(self.mean, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean)})
        return config


def _vgg16_normalization(name=None):
    return VGGPreprocess(name=name or "vgg16_normalization")


def _efficientnet_lite0_normalization(name=None):
    # EfficientNet-Lite: mean 127, std 128 on RGB 0..255 -> (x - 127) / 128.
    return keras.layers.Rescaling(
        scale=1.0 / 128.0,
        offset=-127.0 / 128.0,
        name=name or "efficientnet_lite0_normalization",
    )


BACKBONE_NORMALIZATIONS = {
    "vgg16": _vgg16_normalization,
    "efficientnet_lite0": _efficientnet_lite0_normalization,
}


def _canonical_backbone(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in BACKBONE_NORMALIZATIONS:
        raise ValueError(
            f"Unknown backbone {name!r}; expected one of {sorted(BACKBONE_NORMALIZATIONS)}"
        )
    return key


def backbone_normalization(name: str, *, layer_name: str | None = None) -> keras.layers.Layer:
    """The backbone's own input normalisation, as a serialisable layer.

    ``"vgg16"`` -> :class:`VGGPreprocess` (RGB->BGR, minus ImageNet mean);
    ``"efficientnet_lite0"`` -> ``Rescaling(1/128, offset=-127/128)``.
    """
    return BACKBONE_NORMALIZATIONS[_canonical_backbone(name)](layer_name)


# --------------------------------------------------------------------------
# Preprocessing choices
# --------------------------------------------------------------------------
PREPROCESSING_CHOICES = ("vgg", "equalize+vgg", "seed")

PREPROCESSING_DESCRIPTIONS = {
    "vgg": "The backbone's own normalisation only (VGG16: RGB->BGR minus ImageNet mean; "
    "EfficientNet-Lite0: (x-127)/128).",
    "equalize+vgg": "Per-channel histogram equalisation (skimage equalize_hist), "
    "then the backbone's own normalisation.",
    "seed": "Original student design: per-channel histogram equalisation then /255 to [0,1] "
    "(a known mismatch for ImageNet backbones, kept to measure it).",
}


def build_preprocessing(choice: str, backbone: str = "vgg16", *, name: str | None = None) -> keras.Sequential:
    """Preprocessing pipeline (0..255 RGB in) for one of :data:`PREPROCESSING_CHOICES`."""
    if choice not in PREPROCESSING_CHOICES:
        raise ValueError(
            f"Unknown preprocessing {choice!r}; expected one of {PREPROCESSING_CHOICES}"
        )
    backbone_key = _canonical_backbone(backbone)
    if choice == "vgg":
        layers = [backbone_normalization(backbone_key)]
    elif choice == "equalize+vgg":
        layers = [Equalize(name="equalize"), backbone_normalization(backbone_key)]
    else:  # "seed"
        layers = [Equalize(name="equalize"), keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")]
    safe = choice.replace("+", "_")
    return keras.Sequential(layers, name=name or f"preprocessing_{safe}_{backbone_key}")


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------
_SEED_STRIDE = 7919  # distinct per-layer seeds derived from the user seed


def build_augmentation(
    seed: int | None = None,
    *,
    rotation: float = 0.1,
    translation: float = 0.1,
    zoom: float = 0.1,
    contrast: float = 0.2,
    flip: str | None = "horizontal",
    name: str = "augmentation",
) -> keras.Sequential:
    """Random augmentation on 0..255 RGB images (identity when ``training=False``).

    Each Keras random layer gets its own seed derived from ``seed`` (or none
    when ``seed`` is None). A factor of 0/None (or ``flip=None``) drops the
    corresponding layer.
    """

    counter = iter(range(1, 100))

    def next_seed():
        i = next(counter)
        return None if seed is None else int(seed) * _SEED_STRIDE + i

    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=next_seed(), name="random_flip"))
    if rotation:
        layers.append(
            keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=next_seed(), name="random_rotation")
        )
    if translation:
        layers.append(
            keras.layers.RandomTranslation(
                translation, translation, fill_mode="reflect", seed=next_seed(), name="random_translation"
            )
        )
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, zoom, fill_mode="reflect", seed=next_seed(), name="random_zoom"))
    if contrast:
        layers.append(
            keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=next_seed(), name="random_contrast")
        )
    return keras.Sequential(layers, name=name)


def augment_batch(images_uint8: np.ndarray, seed: int, **kwargs) -> np.ndarray:
    """Augmented copy of a uint8 batch ``(N, H, W, 3)`` (training=True), as uint8.

    Deterministic for a given ``seed``. Extra keyword arguments go to
    :func:`build_augmentation`.
    """
    images = np.asarray(images_uint8)
    unbatched = images.ndim == 3
    if unbatched:
        images = images[np.newaxis]
    augmentation = build_augmentation(seed, **kwargs)
    out = augmentation(tf.convert_to_tensor(images, dtype=tf.float32), training=True)
    out = np.clip(np.round(keras.ops.convert_to_numpy(out)), 0, 255).astype(np.uint8)
    return out[0] if unbatched else out
