"""trainer.tuning.cross_validate and the cross-validated Keras Tuner search: configurations are
chosen on the training photos, never on the test split, and a held-out photo's augmented copies
never train the head that scores it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from trainer import models
from trainer.tuning import cross_validate, tune

CLASSES = 4
FAST = {"units": 0, "dropout": 0.0, "lr": 0.01, "label_smoothing": 0.0}


def fake_prepared(features: np.ndarray, labels: np.ndarray, copies: np.ndarray | None = None):
    """What cross_validate reads of a prepared run: the training photos' labels, their cached
    features stacked copy by copy (copy 0 = the photos), the family and its build context."""
    x = features if copies is None else np.concatenate([features, *copies])
    n_copies = len(x) // len(labels)
    feature_shape = tuple(x.shape[1:])
    return SimpleNamespace(
        train=SimpleNamespace(labels=labels, pixels=None), x_train=x.astype(np.float32),
        y_train=np.tile(labels, n_copies), family=models.get_family("efficientnet_lite0_transfer"),
        dataset=SimpleNamespace(classes=[f"n0000000{i}-breed{i}" for i in range(CLASSES)]),
        config=SimpleNamespace(model="efficientnet_lite0_transfer", seed=0, flip_tta=False, fine_tune_epochs=0), features_of=None,
        context=lambda: models.BuildContext(num_classes=CLASSES, feature_shape=feature_shape),
        training_data=None)


def test_held_out_photos_augmented_copies_never_train_their_fold():
    """Features that identify the photo but say nothing of its (random) breed: a head can only
    beat chance by having seen the held-out photo itself, e.g. through one of its copies."""
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    identity = rng.normal(0, 1, (n, 64)).astype(np.float32)
    copies = [identity + rng.normal(0, 0.01, identity.shape).astype(np.float32) for _ in range(2)]
    result = cross_validate(fake_prepared(identity, labels, copies), {**FAST, "lr": 0.05}, folds=3, epochs=12,
                            patience=12, batch_size=8)
    assert result["photos"] == n and result["copies"] == 3 and len(result["folds"]) == 3
    assert result["top1"] < 0.5  # chance is 0.25; a leak of the copies gives ~1.0


def test_cross_validation_measures_a_learnable_signal():
    rng = np.random.default_rng(1)
    n = 60
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    centres = rng.normal(0, 3, (CLASSES, 16))
    features = (centres[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32)
    result = cross_validate(fake_prepared(features, labels), FAST, folds=3, epochs=12, patience=12, batch_size=8)
    assert result["top1"] > 0.9 and all(0.0 <= f <= 1.0 for f in result["folds"])
    assert result["top1"] == pytest.approx(np.mean(result["folds"]), abs=0.05)  # equal folds: pooled ~ mean


def test_cross_validated_tuner_scores_trials_by_cross_validation(tmp_path):
    rng = np.random.default_rng(2)
    n = 45
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    centres = rng.normal(0, 3, (CLASSES, 16))
    prepared = fake_prepared((centres[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32), labels)
    summary = tune(prepared, tmp_path, kind="random", max_trials=2, epochs=6, patience=6, batch_size=8, cv_folds=3)
    assert summary["trials"] == 2 and summary["objective"].startswith("3-fold cross-validated")
    trials = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    best = trials[0]
    rerun = cross_validate(prepared, best["hyperparameters"], folds=3, epochs=6, patience=6, batch_size=8)
    assert best["score"] == pytest.approx(rerun["top1"], abs=0.1)  # the score is a cross-validated top-1
    assert summary["best_hyperparameters"] == best["hyperparameters"]


def test_cross_validation_scores_the_loss_after_temperature_scaling_too():
    """A head trained with heavy label smoothing is underconfident: the held-out loss after the
    fitted temperature (T < 1 sharpens) is below the raw loss, which also scores that underconfidence."""
    rng = np.random.default_rng(1)
    n = 60
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    centres = rng.normal(0, 3, (CLASSES, 16))
    features = (centres[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32)
    result = cross_validate(fake_prepared(features, labels), {**FAST, "label_smoothing": 0.4}, folds=3, epochs=12,
                            patience=12, batch_size=8)
    assert result["top1"] > 0.9 and result["temperature"] < 0.8
    assert result["loss_calibrated"] < result["loss"] - 0.05
