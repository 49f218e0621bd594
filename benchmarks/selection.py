"""Choose a feature family's head configuration on the training photos only: 5-fold
cross-validated top-1 (``trainer.tuning.cross_validate``) of the defaults and of variants
(hyper-parameter overrides, flip test-time augmentation, longer training), on the official
train split of the 11 breeds. The test split and dogs-outside-stanford are never looked at here;
``benchmarks/accuracy.py`` reports the chosen configurations on them.

    python benchmarks/selection.py --model efficientnet_lite0_transfer --size 320 --copies 1
    python benchmarks/selection.py --model vgg16_transfer --variants defaults,ls0,ls0.2 --json

Prints one line per variant: cross-validated top-1, loss, per-fold top-1 and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("DOGBREEDS_DATA", ROOT.parent / "shared" / "data"))

# name -> (hyper-parameter overrides, flip TTA, epochs, patience)
VARIANTS = {
    "defaults": ({}, False, 80, 8),
    "flip": ({}, True, 80, 8),
    "ls0": ({"label_smoothing": 0.0}, False, 80, 8),
    "ls0.2": ({"label_smoothing": 0.2}, False, 80, 8),
    "linear": ({"units": 0}, False, 80, 8),
    "units1024": ({"units": 1024}, False, 80, 8),
    "dropout0.3": ({"dropout": 0.3, "dropout_hidden": 0.3}, False, 80, 8),
    "dropout0.7": ({"dropout": 0.7, "dropout_hidden": 0.7}, False, 80, 8),
    "lr1e-5": ({"lr": 1e-5}, False, 80, 8),
    "lr3e-5": ({"lr": 3e-5}, False, 80, 8),
    "lr1e-4": ({"lr": 1e-4}, False, 80, 8),
    "lr3e-4": ({"lr": 3e-4}, False, 80, 8),
    "lr1e-3": ({"lr": 1e-3}, False, 80, 8),
    "lr3e-3": ({"lr": 3e-3}, False, 80, 8),
    "tanh": ({"activation": "tanh"}, False, 80, 8),
    "long": ({}, False, 300, 25),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0_transfer", help="A feature family.")
    parser.add_argument("--size", type=int, default=320, help="Input size (centre crops).")
    parser.add_argument("--copies", type=int, default=1, help="Augmented copies of each training photo.")
    parser.add_argument("--augmentation", default="default", help="How the copies are made: default or strong.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated variants: {', '.join(VARIANTS)}; or NAME=VALUE[;NAME=VALUE] "
                             "hyper-parameter overrides.")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--data-root", default=str(SHARED), help="Folder holding the shared datasets.")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dogbreeds" / "features"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print one JSON list of results.")
    parser.add_argument("--out", help="Also write the JSON results to this file (updated after every variant).")
    args = parser.parse_args()

    from trainer.experiment import RunConfig, prepare
    from trainer.tuning import cross_validate

    root = Path(args.data_root) / "stanford-dogs-subset"
    config = RunConfig(data=str(root), model=args.model, split_file=str(root / "MANIFEST.tsv"), min_photos=150,
                       val_fraction=0.1, image_size=args.size, augment_copies=args.copies, augmentation=args.augmentation,
                       cache_dir=args.cache_dir,
                       seed=args.seed, progress=not args.json)
    prepared = prepare(config)
    results = []
    for name in args.variants.split(","):
        if name in VARIANTS:
            overrides, flip, epochs, patience = VARIANTS[name]
        else:
            items = name.split(";")
            overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in items if item != "flip")}
            flip, epochs, patience = "flip" in items, 80, 8
        started = time.perf_counter()
        cv = cross_validate(prepared, overrides, folds=args.folds, epochs=epochs, patience=patience, flip_tta=flip)
        results.append({"variant": name, "model": args.model, "size": args.size, "copies": args.copies,
                        "augmentation": args.augmentation,
                        "overrides": overrides, "epochs": epochs, "patience": patience, **cv,
                        "seconds": round(time.perf_counter() - started, 1)})
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        if not args.json:
            r = results[-1]
            print(f"{name:<28} cv top-1 {r['top1']:.2%}  loss {r['loss']:.4f}  calibrated loss "
                  f"{r['loss_calibrated']:.4f} (T {r['temperature']:.2f})  folds "
                  f"{' '.join(f'{f:.3f}' for f in r['folds'])}  ({r['seconds']:.0f}s)", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
