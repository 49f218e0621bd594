"""A training run from data to evaluated model, shared by the CLI commands and the benchmarks.

A run directory holds everything about one run::

    run.json          the configuration, classes, weights source, hyper-parameters, metrics
    split.json        which photos trained, validated and tested
    model.keras       the trained part (head, or the whole model for scratch families)
    history.json, history-*.csv, curves.png, checkpoints/
    evaluation.json, confusion.png, mistakes.png
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer import data as datasets
from trainer import evaluation as evaluation_mod
from trainer import features as features_mod
from trainer import models, training


@dataclass
class RunConfig:
    data: str
    model: str = "vgg16_transfer"
    preprocessing: str = "vgg"
    weights: str = "auto"
    split_file: str | None = None  # TSV/CSV with relative_path + split column, or a split.json
    split_column: str = "stanford_split"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    breeds: list[str] | None = None
    min_photos: int = 0  # keep only breeds with at least this many photos
    image_size: int = 224
    image_fit: str = "crop"  # worker.images fit: crop (aspect kept, centre) or squash
    augment_copies: int = 2
    augmentation: str = "default"  # trainer.features.AUGMENTATIONS: how the augmented copies are made
    flip_tta: bool = False  # serve (and evaluate) the mean prediction on the photo and its mirror image
    seed: int = 0
    epochs: int = 60
    fine_tune_epochs: int = 20
    patience: int = 6
    batch_size: int = 64
    hyperparameters: dict = field(default_factory=dict)
    cache_dir: str | None = None
    progress: bool = True
    not_dogs: str | None = None  # photos without a dog for the dog check (None: DATA/not-dogs/ if there)
    dog_check: str = "auto"  # trainer.scoring.DOG_CHECK_CHOICES

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        known.setdefault("image_fit", "squash")  # runs saved before image_fit existed squashed their photos
        return cls(**known)


@dataclass
class Prepared:
    """Everything a family trains and evaluates on."""

    config: RunConfig
    family: models.ModelFamily
    dataset: datasets.DatasetIndex
    split: datasets.Split
    train: datasets.LoadedPhotos
    val: datasets.LoadedPhotos
    test: datasets.LoadedPhotos
    backbone: object | None
    weights: dict
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray
    seconds: dict
    features_of: "FeatureSource | None" = None  # feature families: cached features of any photos

    def context(self) -> models.BuildContext:
        size = self.config.image_size
        return models.BuildContext(
            num_classes=len(self.dataset.classes), input_shape=(size, size, 3),
            feature_shape=tuple(self.x_train.shape[1:]) if self.family.inputs == "features" else None,
            backbone=self.backbone, preprocessing=self.config.preprocessing, augmentation_seed=self.config.seed,
            classes=tuple(self.dataset.classes),
        )

    def training_data(self) -> training.TrainingData:
        return training.TrainingData(self.x_train, self.y_train, self.x_val, self.val.labels, len(self.dataset.classes))


def _log(config: RunConfig, message: str) -> None:
    if config.progress:
        print(message, flush=True)


def prepare(config: RunConfig) -> Prepared:
    """Index and split the data, decode the photos, and (feature families) compute or load the
    cached backbone features of train (with augmented copies), val and test."""
    family = models.get_family(config.model)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    dataset = datasets.find_dataset(config.data, config.breeds)
    if config.min_photos:
        dataset = datasets.keep_breeds_with(dataset, config.min_photos)
    if config.split_file:
        split = datasets.split_from_file(dataset, config.split_file, column=config.split_column,
                                         val=config.val_fraction, seed=config.seed)
    else:
        split = datasets.stratified_split(dataset, config.val_fraction, config.test_fraction, config.seed)
    dataset = datasets.restrict_to_classes(dataset, split)
    split = datasets.Split(split.method, *[[r for r in getattr(split, part) if r.split("/", 1)[0] in dataset.classes]
                                           for part in datasets.SPLITS])
    _log(config, f"data: {len(dataset.classes)} breeds, split {split.counts()} ({split.method})")
    if family.build is models.build_imagenet_head:
        models.imagenet_breed_classifier(dataset.classes)  # NotImageNetBreeds now, not after the features
    size = (config.image_size, config.image_size)
    loaded = {part: datasets.load_photos(dataset, split.photos(dataset, part), size, fit=config.image_fit,
                                         desc=f"decode {part}",
                                         progress=config.progress) for part in datasets.SPLITS}
    for part, photos in loaded.items():
        for path, code in photos.failures:
            _log(config, f"  skipped unreadable {part} photo {path}: {code}")
    seconds["decode"] = time.perf_counter() - started

    backbone, weights = None, {"kind": "random", "imagenet": False, "note": "trained from scratch"}
    x = {part: loaded[part].pixels for part in datasets.SPLITS}
    y_train = loaded["train"].labels
    features_of = None
    if family.inputs == "features":
        started = time.perf_counter()
        backbone, weights = models.build_feature_backbones(family, config.weights, (*size, 3))
        _log(config, f"backbone: {family.backbone}, weights: {weights['kind']} ({weights.get('note', '')})")
        features_of = FeatureSource(family, backbone, weights, config)
        train_copies = features_of(loaded["train"].pixels, copies=config.augment_copies, desc="train features")
        x["train"] = np.concatenate(train_copies)
        y_train = np.tile(loaded["train"].labels, len(train_copies))
        x["val"] = features_of(loaded["val"].pixels, desc="val features")[0]
        x["test"] = features_of(loaded["test"].pixels, desc="test features")[0]
        seconds["features"] = time.perf_counter() - started
    return Prepared(config, family, dataset, split, loaded["train"], loaded["val"], loaded["test"], backbone,
                    weights, x["train"], y_train, x["val"], x["test"], seconds, features_of)


class FeatureSource:
    """The cached frozen features of a feature family for any photos: ``source(pixels,
    copies=k)`` -> one array per copy (copy 0: the photos themselves). A mixed family
    concatenates its parts' features, each cached under its own backbone's key (so they are
    shared with the single-backbone families); VGG16's block5 features are computed from cached
    block4_pool maps (shared with vgg16_finetune)."""

    def __init__(self, family: models.ModelFamily, backbone, weights: dict, config: RunConfig):
        self.family, self.config = family, config
        size = (config.image_size, config.image_size, 3)
        cache = features_mod.FeatureCache(Path(config.cache_dir) if config.cache_dir else features_mod.default_cache())
        self._sources = []
        part_weights = {p["backbone"]: p for p in weights.get("parts", [])} or {family.backbone: weights}
        for part in [models.get_family(p) for p in family.parts] or [family]:
            part_backbone = backbone[part.backbone] if isinstance(backbone, dict) else backbone
            cut = part.cut_layer or part_backbone.layers[-1].name
            extractor = features_mod.build_extractor(part_backbone, cut, config.preprocessing, part.backbone, size,
                                                     pooling=part.feature_pooling)
            stem = None
            if part.stem:
                stem = features_mod.Stem(
                    part.stem,
                    features_mod.build_extractor(part_backbone, part.stem, config.preprocessing, part.backbone, size),
                    models.stem_tail(part_backbone, part.stem, cut, part.feature_pooling))
            self._sources.append(dict(
                extractor=extractor, cache=cache, backbone=part.backbone, weights_sha256=part_weights[part.backbone].get("sha256", ""),
                preprocessing_choice=config.preprocessing, cut_layer=models.feature_name(part, part_backbone),
                seed=config.seed, progress=config.progress, stem=stem))
        self.augmentation = config.augmentation

    def __call__(self, pixels: np.ndarray, *, copies: int = 0, desc: str = "features") -> list[np.ndarray]:
        per_source = [features_mod.features_for(pixels, copies=copies, desc=desc, augmentation=self.augmentation,
                                                **common) for common in self._sources]
        return [np.concatenate(arrays, axis=-1) for arrays in zip(*per_source)]

    def flipped(self, pixels: np.ndarray, desc: str = "features") -> np.ndarray:
        """Features of the mirror images (horizontal flip), for flip test-time augmentation."""
        return self(np.ascontiguousarray(pixels[:, :, ::-1]), desc=f"{desc} (mirrored)")[0]


def predict_test(prepared: Prepared, model) -> np.ndarray:
    return predict_photos(prepared, model, prepared.test.pixels, prepared.x_test, desc="test features")


def predict_photos(prepared: Prepared, model, pixels: np.ndarray, inputs: np.ndarray | None = None,
                   desc: str = "features") -> np.ndarray:
    """What the served model answers for ``pixels`` (uint8 photos): the trained part on their
    cached features (feature families) or on the photos, averaged with its answer on the mirror
    images when the run serves with ``flip_tta``. ``inputs``: the features, when already at hand."""
    if not len(pixels):
        return np.zeros((0, len(prepared.dataset.classes)))
    features = prepared.features_of is not None
    if inputs is None:
        inputs = prepared.features_of(pixels, desc=desc)[0] if features else pixels
    probs = model.predict(inputs, batch_size=256, verbose=0)
    if prepared.config.flip_tta:
        mirrored = prepared.features_of.flipped(pixels, desc=desc) if features else pixels[:, :, ::-1]
        probs = (probs + model.predict(mirrored, batch_size=256, verbose=0)) / 2
    return probs


def fit_run(config: RunConfig, run_dir: Path, prepared: Prepared | None = None, verbose: int | str = 2) -> dict:
    """Prepare, build from fixed hyper-parameters, fit, evaluate on the test split, and save the
    run directory. Returns run.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepared or prepare(config)
    hp = models.fixed_hyperparameters(config.hyperparameters)
    # the initial weights and the dropout layers' seeds are drawn when the model is built: seed
    # here too, or they follow whatever used Python's random generator earlier in the process
    training.keras.utils.set_random_seed(config.seed)
    model = models.build(config.model, hp, prepared.context())
    started = time.perf_counter()
    result = training.fit(prepared.family, model, prepared.training_data(), hp.values, run_dir,
                          epochs=config.epochs, fine_tune_epochs=config.fine_tune_epochs, patience=config.patience,
                          batch_size=config.batch_size, seed=config.seed, verbose=verbose)
    fit_seconds = time.perf_counter() - started
    result.model.save(run_dir / "model.keras")
    prepared.split.save(run_dir / "split.json")
    training.plot_curves(result.history, run_dir / "curves.png", f"{config.model} / {config.preprocessing}")
    evaluation = evaluate_run(prepared, result.model, run_dir)
    from trainer import scoring

    scores = scoring.fit_scoring(prepared, result.model, run_dir, hp_values=hp.values,
                                 epochs=max((p["best_epoch"] for p in result.phases if p["phase"] == "head"), default=0))
    run = {
        "config": asdict(config),
        "family": config.model,
        "backbone": prepared.family.backbone,
        "weights": prepared.weights,
        "classes": prepared.dataset.classes,
        "hyperparameters": hp.values,
        "split": {"method": prepared.split.method, **prepared.split.counts()},
        "phases": result.phases,
        "metrics": {"test": evaluation.summary(),
                    "val_accuracy_best": max(result.history.get("val_accuracy", [0.0]) or [0.0])},
        "seconds": {**{k: round(v, 1) for k, v in prepared.seconds.items()}, "fit": round(fit_seconds, 1)},
        **scores,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=1))
    return run


def evaluate_run(prepared: Prepared, model, out_dir: Path) -> evaluation_mod.Evaluation:
    probs = predict_test(prepared, model)
    paths = [p.relative_path for p in prepared.test.photos]
    result = evaluation_mod.evaluate_probabilities(probs, prepared.test.labels, prepared.dataset.classes, paths)
    pixels = dict(zip(paths, prepared.test.pixels))
    evaluation_mod.write_evaluation(result, out_dir, pixels)
    return result


def load_run(run_dir: Path) -> tuple[dict, RunConfig]:
    run = json.loads((Path(run_dir) / "run.json").read_text())
    return run, RunConfig.from_dict(run["config"])
