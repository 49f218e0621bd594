""""Is there a dog?" benchmark: the candidates for the dog check, measured on photos not used
for fitting or choosing, and the calibration of the breed scores.

For each model (``--configs``: the accuracy benchmark's EfficientNet-Lite0 transfer at 320 px and
VGG16 transfer at 224 px, the ``fit`` default), trained on the 11-breed official split of
``../shared/data/stanford-dogs-subset`` exactly as ``dogbreeds-train fit --not-dogs
../shared/data/not-dogs`` does it (so with its temperature and its dog head):

- (b) the dog head on the model's own pooled features (trainer.dog_check; what fit ships);
- (a) EfficientNet-Lite0's genuine ImageNet head: its softmax mass on the 121 dog classes
  (free on a Lite0 model; a second, Lite0 320 px, pass for VGG16);
- (c) the breed softmax's maximum (calibrated) and the energy score ``logsumexp(logits)``.

``../shared/data/not-dogs`` is split by trainer.not_dogs (per folder, sha256 order: 40% fit the
dog head, 20% choose every candidate's threshold with the Stanford validation dogs, 40% test).
Reported on the test part (objects, cats), the Stanford test split and ``dogs-outside-stanford``
(never fitted on, never used to choose anything): photos answered no_dog. Also: the dog head
refitted without each object class in turn, on that class's test photos (object kinds it never
saw); ECE (15 bins) before / after temperature scaling and the risk-coverage table on the
Stanford test split and on dogs-outside-stanford. ``--cost`` times the served model (OpenVINO
int8, batch 16) without a check, with (b) and with (a).

Features are cached (trainer.features; ``--cache-dir``, shared with benchmarks/accuracy.py)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")

import numpy as np  # noqa: E402

# Augmented copies of the training photos: 1 as benchmarks/accuracy.py, 0 for VGG16 at 224 (its
# features cost 20x Lite0's on these shared cores; the copy matters for breed accuracy, not here).
COPIES = {"vgg16-320": 1, "lite0-320": 1, "vgg16-224": 0, "lite0-224": 1}
CONFIGS = {  # name -> (family, image size): the accuracy benchmark's models
    "vgg16-320": ("vgg16_transfer", 320),
    "lite0-320": ("efficientnet_lite0_transfer", 320),
    "vgg16-224": ("vgg16_transfer", 224),
    "lite0-224": ("efficientnet_lite0_transfer", 224),
}


def extractor_for(name: str, cache_dir: str, progress: bool = True) -> dict:
    """The frozen part of the configuration's backbone (with its pooling) and the feature
    cache arguments of ``trainer.features.features_for``."""
    from trainer import features as features_mod
    from trainer import models
    from trainer.backbones import build_backbone

    family, size = CONFIGS[name]
    fam = models.get_family(family)
    backbone, source = build_backbone(fam.backbone, weights="auto", input_shape=(size, size, 3))
    extractor = features_mod.build_extractor(backbone, fam.cut_layer or backbone.layers[-1].name, "vgg",
                                             fam.backbone, (size, size, 3), pooling=fam.feature_pooling)
    return dict(extractor=extractor, cache=features_mod.FeatureCache(Path(cache_dir)), backbone=fam.backbone,
                weights_sha256=source.sha256, preprocessing_choice="vgg",
                cut_layer=models.feature_name(fam, backbone), progress=progress)


def not_dog_features(name: str, data_root: Path, common: dict) -> tuple[np.ndarray, list[str]]:
    from trainer import features as features_mod
    from trainer import not_dogs

    size = CONFIGS[name][1]
    root = data_root / "not-dogs"
    photos = not_dogs.find_not_dogs(root)
    pixels, kept = not_dogs.load_pixels(root, [p.relative_path for p in photos], size)
    return features_mod.features_for(pixels, desc="not-dog features", **common)[0], kept


def outside_features(name: str, data_root: Path, common: dict):
    from trainer import features as features_mod
    from trainer.data import find_dataset, load_photos

    size = CONFIGS[name][1]
    outside = find_dataset(data_root / "dogs-outside-stanford")
    loaded = load_photos(outside, outside.photos, (size, size), desc="decode outside")
    return features_mod.features_for(loaded.pixels, desc="outside features", **common)[0], loaded, outside


@functools.lru_cache(maxsize=4)
def stanford(name: str, data_root: Path, cache_dir: str, progress: bool = True):
    """The accuracy benchmark's 11-breed official split, prepared (features of train (+ its
    augmented copies), val, test; cached)."""
    from trainer.experiment import RunConfig, prepare

    family, size = CONFIGS[name]
    subset = data_root / "stanford-dogs-subset"
    config = RunConfig(data=str(subset), model=family, split_file=str(subset / "MANIFEST.tsv"), min_photos=150,
                       val_fraction=0.1, image_size=size, augment_copies=COPIES[name], cache_dir=cache_dir,
                       progress=progress)
    return prepare(config)


def _pool(x):
    from trainer.scoring import _pool as pool

    return pool(x)


def breed_logits(head_model, x: np.ndarray) -> np.ndarray:
    """The breed head's logits (its last Dense layer, before the softmax)."""
    import keras

    last = head_model.get_layer("breed")
    trunk = keras.Model(head_model.input, last.input)
    hidden = trunk.predict(x, batch_size=256, verbose=0)
    kernel, bias = last.get_weights()
    return hidden @ kernel + bias


def first_rule(dog_scores, not_dog_scores, max_dog_loss: float) -> float:
    """The threshold rule tried first: the highest threshold losing at most ``max_dog_loss`` of
    the dogs, lowered midway to the highest-scoring not-dog below the lowest dog kept."""
    dogs = np.sort(np.asarray(dog_scores, np.float64))
    lowest_kept = dogs[int(np.floor(max_dog_loss * len(dogs)))]
    below = np.asarray(not_dog_scores, np.float64)
    below = below[below < lowest_kept]
    t = (lowest_kept + below.max()) / 2 if len(below) else lowest_kept / 2
    return float(np.floor(t * 1e4) / 1e4)


def energy(logits: np.ndarray) -> np.ndarray:
    """The negative free energy, logsumexp(logits): higher for in-distribution photos."""
    m = logits.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]


def candidate_row(name: str, cost: str, scores: dict, nd_groups: dict, threshold: float | None = None) -> dict:
    """Threshold on the validation photos (trainer.dog_check.choose_threshold) unless given;
    measured on the held-out ones."""
    from trainer import dog_check

    if threshold is None:
        threshold = dog_check.choose_threshold(scores["val_dogs"], scores["nd_val"])
    test = dog_check.measure(scores["test_dogs"], scores["nd_test"], nd_groups["test"], threshold)
    return {"candidate": name, "threshold": threshold,
            "objects_no_dog": test.not_dogs.get("imagenet-objects", {}).get("no_dog"),
            "cats_no_dog": test.not_dogs.get("cats", {}).get("no_dog"),
            "stanford_test_dogs_lost": round(test.dogs_lost, 4),
            "outside_dogs_lost": round(float((np.asarray(scores["outside"]) < threshold).mean()), 4),
            "photos": {"objects": test.not_dogs.get("imagenet-objects", {}).get("photos"),
                       "cats": test.not_dogs.get("cats", {}).get("photos"), "stanford_test": test.dogs,
                       "outside": int(len(scores["outside"]))},
            "cost": cost}


def held_out_object_classes(dogs_train, nd_fit, nd_fit_classes, nd_test, nd_test_classes, val_dogs, nd_val,
                            threshold_rule=True) -> dict:
    """Objects answered no_dog when their class is left out of the dog head's fit (one fit per
    object class): how the head does on object kinds it never saw."""
    from trainer import dog_check

    out = {}
    for klass in sorted({c for c in nd_test_classes if c.startswith("imagenet-objects/")}):
        keep = np.array([c != klass for c in nd_fit_classes])
        head, _ = dog_check.fit_dog_head(dogs_train, nd_fit[keep], c=0.1)
        t = dog_check.choose_threshold(head.score(val_dogs), head.score(nd_val))
        mask = np.array([c == klass for c in nd_test_classes])
        out[klass.split("/", 1)[1]] = round(float((head.score(nd_test[mask]) < t).mean()), 4)
    return out


def evaluate_config(name: str, args, lite0: dict | None) -> dict:
    """Fit the configuration's model as `dogbreeds-train fit` does (with the shared not-dog
    photos: calibration and dog head included), then measure every candidate."""
    import keras

    from trainer import calibration, imagenet, not_dogs
    from trainer.experiment import fit_run
    from trainer.scoring import load_dog_head, not_dog_features

    data_root = Path(args.data_root)
    started = time.perf_counter()
    prepared = stanford(name, data_root, args.cache_dir, progress=not args.json)
    prepared.config.not_dogs = str(data_root / "not-dogs")
    prepared.config.epochs, prepared.config.patience = 80, 8  # as benchmarks/accuracy.py
    run_dir = Path(args.runs) / name
    run = fit_run(prepared.config, run_dir, prepared=prepared, verbose=0)
    head_model = keras.models.load_model(run_dir / "model.keras", compile=False)
    common = extractor_for(name, args.cache_dir, progress=not args.json)
    out_x, out_loaded, outside = outside_features(name, data_root, common)
    assert outside.classes == prepared.dataset.classes, "outside breeds differ from the trained ones"
    nd = not_dog_features(prepared, data_root / "not-dogs")
    split = nd["split"]
    temperature = run["calibration"]["temperature"]

    sets = {"val_dogs": prepared.x_val, "test_dogs": prepared.x_test, "outside": out_x,
            "nd_val": nd["val"][0], "nd_test": nd["test"][0]}
    groups = {part: nd[part][1] for part in ("val", "test")}
    raw = {k: head_model.predict(v, batch_size=256, verbose=0) for k, v in sets.items()}
    calibrated = {k: calibration.apply_temperature(v, temperature) for k, v in raw.items()}
    logits = {k: breed_logits(head_model, v) for k, v in sets.items()}

    from trainer import dog_check

    head = load_dog_head(run_dir)
    head_scores = {k: head.score(_pool(v)) for k, v in sets.items()}
    x_train, n = _pool(prepared.x_train), len(prepared.train.labels)
    crossed, crossed_nd = dog_check.cross_fitted_scores(x_train, np.arange(len(x_train)) % n, nd["fit"][0],
                                                        run["dog_check"]["fit"]["c"], seed=prepared.config.seed)
    rule_2 = first_rule(np.concatenate([head_scores["val_dogs"], crossed]),
                        np.concatenate([head_scores["nd_val"], crossed_nd]), 0.005)
    rows = [candidate_row("(b) dog head on own pooled features (fit's threshold)", "a dot product", head_scores, groups,
                          threshold=run["dog_check"]["threshold"]),
            # the threshold rules tried before (README): 1. the validation photos only, the highest threshold
            # losing <= 1% of its 110 dogs, midway to the highest not-dog below; 2. the same on val + cross-fitted
            # train dogs, <= 0.5%
            candidate_row("(b) same head, rule 1 (val only, <=1% of dogs)", "a dot product", head_scores, groups,
                          threshold=first_rule(head_scores["val_dogs"], head_scores["nd_val"], 0.01)),
            candidate_row("(b) same head, rule 2 (val + cross-fit, <=0.5%)", "a dot product", head_scores, groups,
                          threshold=rule_2)]
    if lite0 is not None:
        second = name.startswith("vgg16")
        rows.append(candidate_row("(a) ImageNet head, mass on dog classes" + (" (Lite0 2nd pass, 320 px)" if second else ""),
                                  "second backbone pass (Lite0)" if second else "one 1280x1000 matmul",
                                  {k: imagenet.dog_mass(v) for k, v in lite0.items()}, groups))
    rows.append(candidate_row("(c) max calibrated breed score", "none", {k: v.max(1) for k, v in calibrated.items()},
                              groups))
    rows.append(candidate_row("(c) energy, logsumexp(logits)", "none", {k: energy(v) for k, v in logits.items()}, groups))

    fit_classes = [str(Path(r).parent) for r in split.fit]
    test_classes = [str(Path(r).parent) for r in split.test]
    unseen = held_out_object_classes(_pool(prepared.x_train), nd["fit"][0], fit_classes, nd["test"][0], test_classes,
                                     _pool(prepared.x_val), nd["val"][0])
    labels = {"test_dogs": prepared.test.labels, "outside": out_loaded.labels}
    cal = {}
    for key, title in (("test_dogs", "stanford test"), ("outside", "dogs-outside-stanford")):
        rep = calibration.report(raw[key], labels[key], temperature)
        cal[title] = {"photos": rep.photos, "top1": round(float((raw[key].argmax(1) == labels[key]).mean()), 4),
                      "ece_before": round(rep.ece_before, 4), "ece_after": round(rep.ece_after, 4),
                      "risk_coverage": rep.risk_coverage}
    return {"config": name, "family": CONFIGS[name][0], "image_size": CONFIGS[name][1], "temperature": temperature,
            "candidates": rows, "dog_head_unseen_object_classes": unseen, "calibration": cal,
            "not_dog_split": {"rule": not_dogs.RULE, **split.counts()},
            "trainer_dog_check": {k: run["dog_check"][k] for k in ("threshold", "fit", "val", "test")},
            "seconds": round(time.perf_counter() - started, 1)}


def lite0_scores_features(args) -> dict:
    """Lite0 (320 px) average-pooled features of every evaluated set, for candidate (a)."""
    from trainer.scoring import not_dog_features

    data_root = Path(args.data_root)
    prepared = stanford("lite0-320", data_root, args.cache_dir, progress=not args.json)
    nd = not_dog_features(prepared, data_root / "not-dogs")
    out_x, _, _ = outside_features("lite0-320", data_root, extractor_for("lite0-320", args.cache_dir, not args.json))
    return {"val_dogs": prepared.x_val, "test_dogs": prepared.x_test, "outside": out_x, "nd_val": nd["val"][0],
            "nd_test": nd["test"][0]}


def dog_mass_threshold(args) -> dict:
    """Candidate (a)'s threshold, chosen as in the full run (trainer.dog_check.choose_threshold on
    the Stanford validation dogs and the val part of the not-dogs), and what it does on them."""
    from trainer import dog_check, imagenet

    lite0 = lite0_scores_features(args)
    dogs, others = imagenet.dog_mass(lite0["val_dogs"]), imagenet.dog_mass(lite0["nd_val"])
    threshold = dog_check.choose_threshold(dogs, others)
    return {"threshold": threshold, "image_size": CONFIGS["lite0-320"][1], "val_dogs": len(dogs),
            "val_dogs_lost": round(float((dogs < threshold).mean()), 4), "val_not_dogs": len(others),
            "val_not_dogs_no_dog": round(float((others < threshold).mean()), 4)}


def serving_cost(name: str, args, seconds: float = 15.0, rounds: int = 3) -> dict:
    """Images/s of the served model (OpenVINO int8, as the worker serves it, batch 16) without a
    dog check, with the dog head, and with the ImageNet dog mass (for VGG16: a second, Lite0,
    pass): each exported, converted and quantised as publish does it (int8 calibrated on 64
    photos), then timed in interleaved rounds (the machine is shared: interleaving spreads the
    noise over all three)."""
    import tempfile

    import openvino as ov

    from trainer import artifact_writer, fast_runtimes, models, serving
    from trainer.backbones import build_backbone
    from worker import runtimes

    family_name, size = CONFIGS[name]
    family = models.get_family(family_name)
    backbone, _ = build_backbone(family.backbone, weights="auto", input_shape=(size, size, 3))
    dim = 512 if family.backbone == "vgg16" else 1280
    hp = models.fixed_hyperparameters({})
    head = models.build(family_name, hp, models.BuildContext(num_classes=11, input_shape=(size, size, 3),
                                                             feature_shape=(dim,)))
    inference = models.assemble_inference_model(family, head, backbone=backbone, preprocessing_choice="vgg",
                                                 input_shape=(size, size, 3))
    rng = np.random.default_rng(0)
    dog_head = serving.DogHead(rng.normal(0, 0.01, dim).astype(np.float32), 0.0)
    variants = {"no dog check": serving.served_model(inference, temperature=1.5),
                "dog head (b)": serving.served_model(inference, temperature=1.5, dog_method="dog-head",
                                                     dog_head=dog_head),
                "ImageNet dog mass (a)": serving.served_model(inference, temperature=1.5,
                                                              dog_method="imagenet-dog-mass",
                                                              backbone=family.backbone)}
    photos = rng.integers(0, 256, (64, size, size, 3)).astype(np.uint8)
    from trainer import not_dogs

    root = Path(args.data_root) / "not-dogs"
    real, _ = not_dogs.load_pixels(root, [p.relative_path for p in not_dogs.find_not_dogs(root)][::25][:64], size,
                                   progress=False)
    photos = real if len(real) else photos
    compiled = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in variants.items():
            saved = Path(tmp) / key.replace(" ", "_")
            artifact_writer.export_saved_model(model, saved)
            int8 = fast_runtimes.quantize_int8(ov.convert_model(str(saved)), photos)
            xml = saved / "int8.xml"
            ov.save_model(int8, str(xml), compress_to_fp16=False)
            compiled[key] = runtimes.load_openvino_model(xml, "int8")
    batch = photos[:16].astype(np.float32)
    done = {k: 0 for k in compiled}
    spent = {k: 0.0 for k in compiled}
    for predict in compiled.values():
        predict(batch)  # warm-up
    for _ in range(rounds):
        for key, predict in compiled.items():
            started = time.perf_counter()
            while time.perf_counter() - started < seconds / rounds:
                predict(batch)
                done[key] += len(batch)
            spent[key] += time.perf_counter() - started
    rate = {k: done[k] / spent[k] for k in compiled}
    base = rate["no dog check"]
    return {k: {"images_per_s": round(v, 2), "vs_without": round(v / base, 3)} for k, v in rate.items()}


def print_table(results: list[dict]) -> None:
    print(f"\n{'model':<10} {'candidate':<52} {'thresh':>7} {'objects':>8} {'cats':>6} {'lost st.':>8} "
          f"{'lost out':>8}  cost")
    for r in results:
        for c in r["candidates"]:
            print(f"{r['config']:<10} {c['candidate']:<52} {c['threshold']:>7.4f} {c['objects_no_dog']:>8.1%} "
                  f"{c['cats_no_dog']:>6.1%} {c['stanford_test_dogs_lost']:>8.1%} {c['outside_dogs_lost']:>8.1%}  "
                  f"{c['cost']}")
    print(f"\nphotos: objects {results[0]['candidates'][0]['photos']['objects']}, cats "
          f"{results[0]['candidates'][0]['photos']['cats']} (test part of not-dogs), Stanford test "
          f"{results[0]['candidates'][0]['photos']['stanford_test']}, outside {results[0]['candidates'][0]['photos']['outside']}")
    for r in results:
        print(f"\n{r['config']}: dog head, objects answered no_dog when their class was left out of its fit: " +
              ", ".join(f"{k} {v:.0%}" for k, v in r["dog_head_unseen_object_classes"].items()))
        print(f"{r['config']}: T = {r['temperature']}; " + "; ".join(
            f"{k}: top-1 {v['top1']:.1%}, ECE {v['ece_before']:.1%} -> {v['ece_after']:.1%}"
            for k, v in r["calibration"].items()))
        for k, v in r["calibration"].items():
            print(f"  risk-coverage {k}: " + ", ".join(
                f"t={x['min_score']}: kept {x['kept']:.1%} top-1 {x['top1_of_kept']:.1%}" for x in v["risk_coverage"]
                if x["top1_of_kept"] is not None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="lite0-320,vgg16-224", help=f"Models to measure: {', '.join(CONFIGS)}.")
    parser.add_argument("--data-root", default=str(SHARED), help="Folder holding the shared datasets.")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dogbreeds" / "features"),
                        help="Feature cache (shared with benchmarks/accuracy.py when given the same folder).")
    parser.add_argument("--runs", default=str(ROOT / ".cache" / "no-dog-runs"), help="Where run folders go.")
    parser.add_argument("--features-only", action="store_true", help="Only compute (cache) the features.")
    parser.add_argument("--cost", action="store_true",
                        help="Only measure the serving cost of each candidate (OpenVINO int8 images/s, batch 16).")
    parser.add_argument("--dog-mass-threshold", action="store_true",
                        help="Only choose candidate (a)'s threshold (Lite0 320 px ImageNet dog mass) on the validation "
                             "photos, as the full run does: the value trainer/baseline.py ships.")
    parser.add_argument("--json", action="store_true", help="Print the results as one JSON list.")
    parser.add_argument("--out", help="Also write the JSON results to this file.")
    args = parser.parse_args()
    names = args.configs.split(",")
    if args.features_only:
        for name in names:
            common = extractor_for(name, args.cache_dir)
            print(name, not_dog_features(name, Path(args.data_root), common)[0].shape, flush=True)
            print(name, outside_features(name, Path(args.data_root), common)[0].shape, flush=True)
            print(name, stanford(name, Path(args.data_root), args.cache_dir).x_test.shape, flush=True)
        return
    if args.dog_mass_threshold:
        print(json.dumps(dog_mass_threshold(args), indent=1))
        return
    if args.cost:
        costs = {name: serving_cost(name, args) for name in names}
        if args.out:
            Path(args.out).write_text(json.dumps(costs, indent=1))
        print(json.dumps(costs, indent=1))
        return
    lite0 = lite0_scores_features(args)
    results = []
    for name in names:
        results.append(evaluate_config(name, args, lite0))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
