"""What the served scores mean, fitted right after the breed model (``dogbreeds-train fit``):

1. the temperature of the breed scores (trainer.calibration), fitted on the validation split;
   expected calibration error before and after, a risk-coverage table and ``calibration.png``;
2. the dog check (trainer.dog_check): a logistic dog/not-dog head on the model's pooled
   features, trained on the train split's dogs and the ``fit`` part of the not-dog photos, its
   threshold chosen on the validation dogs and the ``val`` not-dogs, measured on the test dogs
   and the ``test`` not-dogs.

Everything lands in ``run.json`` (``calibration``, ``dog_check``), ``evaluation.json`` and
``dog_head.npz``; ``publish`` builds them into the served model (trainer.serving).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from trainer import calibration, dog_check, not_dogs
from trainer.serving import DogHead

log = logging.getLogger(__name__)

DOG_HEAD_FILE = "dog_head.npz"
DOG_CHECK_CHOICES = ("auto", "dog-head", "imagenet-dog-mass", "none")


def _predict(model, x: np.ndarray) -> np.ndarray:
    return model.predict(x, batch_size=256, verbose=0) if len(x) else np.zeros((0, model.output_shape[-1]))


CROSS_FIT_FOLDS = 3


def cross_fitted_probabilities(prepared, hp_values: dict, epochs: int, folds: int = CROSS_FIT_FOLDS) -> np.ndarray | None:
    """Held-out breed probabilities of the train split's photos: ``folds`` copies of the head,
    each trained (same hyper-parameters, ``epochs`` = the final model's best epoch, no early
    stopping) on the other folds' photos and their augmented copies, predicting its own fold's
    photos. None for families trained in two phases or on photos (the validation split alone
    then fits the temperature)."""
    import keras

    from trainer import models

    family, config = prepared.family, prepared.config
    n = len(prepared.train.labels)
    if family.inputs != "features" or family.fine_tune_layers or n < 2 * folds or epochs < 1:
        return None
    copies = len(prepared.x_train) // n
    fold_of = np.random.default_rng(config.seed).permutation(n) % folds
    classes = len(prepared.dataset.classes)
    out = np.zeros((n, classes), np.float32)
    for k in range(folds):
        rows = np.concatenate([np.flatnonzero(fold_of != k) + c * n for c in range(copies)])
        keras.utils.set_random_seed(config.seed + k + 1)
        model = models.build(config.model, models.fixed_hyperparameters(hp_values), prepared.context())
        model.fit(prepared.x_train[rows], keras.utils.to_categorical(prepared.y_train[rows], classes), epochs=epochs,
                  batch_size=config.batch_size, verbose=0)
        out[fold_of == k] = _predict(model, prepared.x_train[:n][fold_of == k])
    return out


def fit_calibration(prepared, model, run_dir: Path, *, hp_values: dict | None = None, epochs: int = 0) -> dict:
    """The temperature and its effect on the test split; writes calibration.png. Returns
    run.json's ``calibration``.

    T is fitted on held-out predictions: the validation split, plus (feature families) the
    train split's photos predicted by heads cross-fitted without them
    (:func:`cross_fitted_probabilities`). The validation split alone is too small: with 110
    photos all classified correctly, the likelihood keeps rising as T -> 0 (measured: T hit the
    search's lower bound, 0.05, and 98.8% of the test photos then scored >= 0.95)."""
    val_probs, test_probs = _predict(model, prepared.x_val), _predict(model, prepared.x_test)
    crossed = cross_fitted_probabilities(prepared, hp_values or {}, epochs) if hp_values is not None else None
    probs, labels = val_probs, prepared.val.labels
    fitted_on = f"validation split ({len(labels)} photos)"
    if crossed is not None:
        probs, labels = np.concatenate([val_probs, crossed]), np.concatenate([labels, prepared.train.labels])
        fitted_on += (f" + the train split's {len(crossed)} photos predicted by {CROSS_FIT_FOLDS} heads cross-fitted "
                      "without them")
    temperature = calibration.fit_temperature(probs, labels)
    test = calibration.report(test_probs, prepared.test.labels, temperature)
    val = calibration.report(val_probs, prepared.val.labels, temperature)
    held = calibration.report(probs, labels, temperature)
    calibration.plot_reliability({"test split": test, "held-out predictions T was fitted on": held},
                                 run_dir / "calibration.png")
    return {"method": "temperature scaling of the breed scores, softmax(log p / T)", "temperature": temperature,
            "fitted_on": fitted_on + ", minimum negative log-likelihood",
            "ece_bins": calibration.ECE_BINS, "test": test.to_dict(),
            "val": {k: v for k, v in val.to_dict().items() if not k.startswith("reliability")},
            "fit": {k: v for k, v in held.to_dict().items() if not k.startswith("reliability")}}


def _pool(x: np.ndarray) -> np.ndarray:
    """Cached features as vectors: maps (fine-tuned families) GeM-pooled as the served model does."""
    if x.ndim == 2:
        return np.asarray(x, np.float32)
    from trainer.pooling import global_pooling

    layer = global_pooling("gem")
    return np.concatenate([np.asarray(layer(np.asarray(x[i:i + 256], np.float32)))
                           for i in range(0, len(x), 256)]) if len(x) else np.zeros((0, x.shape[-1]), np.float32)


def find_not_dog_folder(config) -> Path | None:
    """``--not-dogs`` or, by default, ``DATA/not-dogs/`` (local data only)."""
    if getattr(config, "not_dogs", None):
        return Path(config.not_dogs)
    if str(config.data).startswith("s3://"):
        return None
    folder = Path(config.data) / not_dogs.FOLDER
    return folder if folder.is_dir() else None


def not_dog_features(prepared, folder: Path) -> dict:
    """Pooled features of the not-dog photos (all of the folder at once, through the run's own
    frozen backbone part and feature cache), by split part: ``{"split", "fit"|"val"|"test":
    (features, groups)}``."""
    from trainer import features as features_mod
    from trainer import models

    config, family, backbone = prepared.config, prepared.family, prepared.backbone
    size = config.image_size
    photos = not_dogs.find_not_dogs(folder)
    split = not_dogs.split_not_dogs(photos, str(folder))
    extractor = features_mod.build_extractor(backbone, family.cut_layer or backbone.layers[-1].name,
                                             config.preprocessing, family.backbone, (size, size, 3),
                                             pooling=family.feature_pooling)
    cache = features_mod.FeatureCache(Path(config.cache_dir) if config.cache_dir else features_mod.default_cache())
    pixels, kept = not_dogs.load_pixels(folder, [p.relative_path for p in photos], size, config.image_fit,
                                        progress=config.progress)
    features = _pool(features_mod.features_for(
        pixels, extractor=extractor, cache=cache, backbone=family.backbone, weights_sha256=prepared.weights["sha256"],
        preprocessing_choice=config.preprocessing, cut_layer=models.feature_name(family, backbone), seed=config.seed,
        progress=config.progress, desc="not-dog features")[0]) if len(pixels) else np.zeros((0, 1), np.float32)
    row = {rel: i for i, rel in enumerate(kept)}
    out = {"split": split}
    for part in not_dogs.PARTS:
        rels = [rel for rel in getattr(split, part) if rel in row]
        out[part] = (features[[row[r] for r in rels]] if rels else features[:0],
                     [not_dogs.NotDogPhoto(r).group for r in rels])
    return out


def fit_dog_check(prepared, run_dir: Path, method: str = "auto") -> dict:
    """Fit the dog check of a run (see the module doc). Returns run.json's ``dog_check``:
    ``{}`` when there is none (turned off, no pooled features, or no not-dog photos)."""
    if method == "none":
        return {}
    if prepared.family.inputs != "features":
        log.warning("dog check: %s has no frozen backbone features to put a dog head on; no dog check",
                    prepared.family.name)
        return {}
    if prepared.family.parts:
        log.warning("dog check: %s mixes several backbones' features; the dog head reads one backbone's pooled "
                    "features, so this model has NO dog check (serve a single-backbone model where photos without "
                    "a dog can arrive)", prepared.family.name)
        return {}
    if method == "imagenet-dog-mass":
        return _imagenet_dog_mass(prepared)
    folder = find_not_dog_folder(prepared.config)
    if folder is None:
        log.warning("dog check: no not-dog photos (DATA/%s/ or --not-dogs): the model has NO dog check",
                    not_dogs.FOLDER)
        return {}
    nd = not_dog_features(prepared, folder)
    if not len(nd["fit"][0]) or not len(nd["val"][0]):
        log.warning("dog check: too few not-dog photos in %s to fit and validate; no dog check", folder)
        return {}
    dogs_train, dogs_val, dogs_test = _pool(prepared.x_train), _pool(prepared.x_val), _pool(prepared.x_test)
    head, chosen = dog_check.fit_dog_head(dogs_train, nd["fit"][0], val_dogs=dogs_val, val_not_dogs=nd["val"][0])
    # The threshold's held-out dogs: the validation split (final head) and the train photos scored by
    # heads cross-fitted without them; 110 validation dogs alone cannot place a 0.5% tail.
    n = len(prepared.train.labels)
    crossed_dogs, crossed_not_dogs = dog_check.cross_fitted_scores(
        dogs_train, np.arange(len(dogs_train)) % n, nd["fit"][0], chosen["c"], seed=prepared.config.seed)
    threshold = dog_check.choose_threshold(np.concatenate([head.score(dogs_val), crossed_dogs]),
                                           np.concatenate([head.score(nd["val"][0]), crossed_not_dogs]))
    np.savez(run_dir / DOG_HEAD_FILE, weights=head.weights, bias=np.float32(head.bias))
    val = dog_check.measure(head.score(dogs_val), head.score(nd["val"][0]), nd["val"][1], threshold)
    test = dog_check.measure(head.score(dogs_test), head.score(nd["test"][0]), nd["test"][1], threshold)
    return {"method": "dog-head",
            "description": "logistic dog/not-dog head on the model's pooled backbone features (same forward pass)",
            "threshold": threshold,
            "threshold_rule": f"middle of the gap between the held-out dogs' {dog_check.MAX_DOG_LOSS:.1%} lower tail "
                              f"and the held-out not-dogs' {dog_check.MAX_NOT_DOG_PASS:.0%} upper tail (dogs: the "
                              f"validation split's {len(dogs_val)} and the train split's {n} scored by "
                              f"{dog_check.CROSS_FIT_FOLDS} heads cross-fitted without them; not-dogs: the val part "
                              "and the cross-fitted fit part)",
            "fit": {**chosen, "dogs": "train split (with its augmented copies)",
                    "not_dogs": f"{folder} fit part ({len(nd['split'].fit)} photos)"},
            "not_dog_split": {"source": str(folder), "rule": not_dogs.RULE, **nd["split"].counts()},
            "val": val.to_dict(), "test": test.to_dict()}


def _imagenet_dog_mass(prepared) -> dict:
    """EfficientNet-Lite0's own ImageNet head on its average-pooled features (Lite0 transfer
    models only: the features the run cached are exactly what that head reads)."""
    from trainer import imagenet

    if prepared.family.backbone != "efficientnet_lite0" or prepared.family.feature_pooling != "avg":
        raise ValueError("dog check imagenet-dog-mass needs EfficientNet-Lite0 average-pooled features")
    dogs_val, dogs_test = imagenet.dog_mass(prepared.x_val), imagenet.dog_mass(prepared.x_test)
    folder = find_not_dog_folder(prepared.config)
    nd = not_dog_features(prepared, folder) if folder else None
    nd_val = imagenet.dog_mass(nd["val"][0]) if nd and len(nd["val"][0]) else np.zeros(0)
    threshold = dog_check.choose_threshold(dogs_val, nd_val)
    out = {"method": "imagenet-dog-mass", "threshold": threshold,
           "description": "EfficientNet-Lite0's ImageNet 1000-way head: softmax mass on the 121 dog classes",
           "threshold_rule": f"validation photos: middle of the gap between the dogs' {dog_check.MAX_DOG_LOSS:.1%} "
                             f"lower tail and the not-dogs' {dog_check.MAX_NOT_DOG_PASS:.0%} upper tail",
           "val": dog_check.measure(dogs_val, nd_val, nd["val"][1] if nd else [], threshold).to_dict()}
    if nd:
        out["test"] = dog_check.measure(dogs_test, imagenet.dog_mass(nd["test"][0]), nd["test"][1], threshold).to_dict()
    return out


def load_dog_head(run_dir: Path) -> DogHead:
    with np.load(Path(run_dir) / DOG_HEAD_FILE) as z:
        return DogHead(weights=z["weights"], bias=float(z["bias"]))


def fit_scoring(prepared, model, run_dir: Path, *, hp_values: dict | None = None, epochs: int = 0) -> dict:
    """Calibration and dog check of a freshly fitted run (``hp_values``, ``epochs``: for the
    cross-fitted heads of the calibration); adds both to ``evaluation.json``. Returns
    ``{"calibration": ..., "dog_check": ...}`` for run.json."""
    import json

    out = {"calibration": fit_calibration(prepared, model, run_dir, hp_values=hp_values, epochs=epochs),
           "dog_check": fit_dog_check(prepared, run_dir, getattr(prepared.config, "dog_check", "auto"))}
    path = Path(run_dir) / "evaluation.json"
    evaluation = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**evaluation, **out}, indent=1))
    return out
