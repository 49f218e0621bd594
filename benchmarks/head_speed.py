"""How fast heads train once backbone features are cached: seconds per epoch of the
vgg16_transfer head over N cached features, and a Keras Tuner search of T trials.

    python benchmarks/head_speed.py --photos 12000 --trials 20
    python benchmarks/head_speed.py --feature-shape 7,7,512   # heads on un-pooled block5_pool maps

vgg16_transfer caches GeM-pooled block5_conv3 features (512 floats per photo, the default shape
here); ``--feature-shape 7,7,512`` measures a head that pools maps itself, as before.

Synthetic features of the real shape stand in for cached ones (the cost of a head epoch does
not depend on their values); prints the figures, ``--json`` one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FakePrepared:
    """What trainer.tuning.tune reads from a prepared run."""

    def __init__(self, x, y, xv, yv, classes):
        from trainer.experiment import RunConfig

        self.x, self.y, self.xv, self.yv, self.classes = x, y, xv, yv, classes
        self.config = RunConfig(data="-", model="vgg16_transfer")

    def context(self):
        from trainer.models import BuildContext

        return BuildContext(num_classes=self.classes, feature_shape=self.x.shape[1:])

    def training_data(self):
        from trainer.training import TrainingData

        return TrainingData(self.x, self.y, self.xv, self.yv, self.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=12000)
    parser.add_argument("--classes", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--trial-epochs", type=int, default=10)
    parser.add_argument("--feature-shape", default="512", help="Shape of one cached feature (comma-separated).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from trainer import models
    from trainer.training import TrainingData
    from trainer.tuning import tune

    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.photos)
    shape = tuple(int(v) for v in args.feature_shape.split(","))
    x = rng.gamma(1.0, 2.0, (args.photos, *shape)).astype(np.float16)
    yv = rng.integers(0, args.classes, args.photos // 10)
    xv = rng.gamma(1.0, 2.0, (len(yv), *shape)).astype(np.float16)
    model = models.build("vgg16_transfer", models.fixed_hyperparameters(),
                         models.BuildContext(num_classes=args.classes, feature_shape=shape))
    data = TrainingData(x, y, xv[:0], yv[:0], args.classes)
    train, _ = data.datasets(batch_size=64)  # what trainer.training.fit feeds
    model.fit(train.take(4), epochs=1, verbose=0)  # build and trace once
    epoch_seconds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        model.fit(train, epochs=1, verbose=0)
        epoch_seconds.append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = tune(FakePrepared(x[:3000], y[:3000], xv[:300], yv[:300], args.classes), Path(tmp),
                       kind="random", max_trials=args.trials, epochs=args.trial_epochs, patience=3, overwrite=True)
        tune_seconds = time.perf_counter() - started
    result = {"photos": args.photos, "feature_shape": list(shape), "head_epoch_s_median": round(float(np.median(epoch_seconds)), 3),
              "head_epoch_s": [round(s, 3) for s in epoch_seconds], "tune_trials": summary["trials"],
              "tune_photos": 3000, "tune_epochs_per_trial": args.trial_epochs, "tune_seconds": round(tune_seconds, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"head epoch over {args.photos} cached {'x'.join(map(str, shape))} features: median {result['head_epoch_s_median']} s "
              f"({result['head_epoch_s']})")
        print(f"Keras Tuner random search, {summary['trials']} trials x <= {args.trial_epochs} epochs on 3000 "
              f"photos: {result['tune_seconds']} s")


if __name__ == "__main__":
    main()
