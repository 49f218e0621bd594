"""Keras Tuner search over a model family's hyper-parameters, on cached features (feature
families: a trial takes seconds) or on photos (scratch families), and k-fold cross-validation
on the training photos (``cross_validate``) to choose between configurations without the test
split.

With ``cv_folds``, a trial's score is its cross-validated top-1 on the training photos (each
held-out fold scored on its photos' un-augmented features, trained on every copy of the other
folds), not the accuracy on the small validation split: 990 held-out answers instead of 110."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np

from trainer import calibration, models, training
from trainer.experiment import Prepared

TUNERS = ("random", "hyperband", "bayesian")


def cross_validate(prepared: Prepared, hp_values: dict | kt.HyperParameters, *, folds: int = 5, epochs: int = 80,
                   patience: int = 8, batch_size: int = 64, flip_tta: bool | None = None, seed: int | None = None,
                   fine_tune_epochs: int | None = None, verbose: int = 0) -> dict:
    """Stratified k-fold cross-validation of a feature family's head on the run's training
    photos: for each fold, a head built from ``hp_values`` trains on every copy (the photo and
    its augmented copies) of the other folds' photos as ``training.fit`` trains it (both phases
    of a fine-tuning family), stops early on the held-out fold's loss, and answers for the
    held-out photos (averaged with its answer on their mirror images when
    ``flip_tta``; default: the run's). Returns pooled top-1 and loss over all held-out photos,
    and per-fold top-1."""
    from sklearn.model_selection import StratifiedKFold

    seed = prepared.config.seed if seed is None else seed
    fine_tune_epochs = prepared.config.fine_tune_epochs if fine_tune_epochs is None else fine_tune_epochs
    flip_tta = prepared.config.flip_tta if flip_tta is None else flip_tta
    labels = prepared.train.labels
    n = len(labels)
    copies = len(prepared.x_train) // n
    if prepared.family.inputs != "features" or copies * n != len(prepared.x_train):
        raise ValueError("cross_validate needs a feature family's cached training features")
    mirrored = prepared.features_of.flipped(prepared.train.pixels, desc="train features") if flip_tta else None
    hp = hp_values if isinstance(hp_values, kt.HyperParameters) else models.fixed_hyperparameters(hp_values)
    probs = np.zeros((n, len(prepared.dataset.classes)), np.float32)
    per_fold = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (train_idx, held_idx) in enumerate(splitter.split(np.zeros(n), labels)):
        keras.utils.set_random_seed(seed * 100 + fold)
        rows = np.concatenate([train_idx + k * n for k in range(copies)])
        data = training.TrainingData(prepared.x_train[rows], prepared.y_train[rows], prepared.x_train[held_idx],
                                     labels[held_idx], len(prepared.dataset.classes))
        model = models.build(prepared.config.model, hp, prepared.context())
        with tempfile.TemporaryDirectory(prefix="cv-") as tmp:  # the same fit as `fit`: both phases, best epoch
            model = training.fit(prepared.family, model, data, hp.values, Path(tmp), epochs=epochs,
                                 fine_tune_epochs=fine_tune_epochs, patience=patience, batch_size=batch_size,
                                 seed=seed * 100 + fold, verbose=verbose).model
        fold_probs = model.predict(prepared.x_train[held_idx], batch_size=256, verbose=0)
        if mirrored is not None:
            fold_probs = (fold_probs + model.predict(mirrored[held_idx], batch_size=256, verbose=0)) / 2
        probs[held_idx] = fold_probs
        per_fold.append(float((fold_probs.argmax(1) == labels[held_idx]).mean()))
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), labels], 1e-7, 1.0))))
    # fit publishes temperature-scaled models, so configurations are compared on the held-out loss after
    # the best single temperature too: the raw loss also scores how over- or under-confident a head is
    # (label smoothing makes every head underconfident), which that temperature removes
    temperature = calibration.fit_temperature(probs, labels)
    calibrated = calibration.nll(calibration.apply_temperature(probs, temperature), labels)
    return {"top1": float((probs.argmax(1) == labels).mean()), "loss": loss, "loss_calibrated": calibrated,
            "temperature": temperature, "folds": per_fold, "photos": n, "copies": copies, "flip_tta": bool(flip_tta)}


def _cross_validated(base: type) -> type:
    """A Keras Tuner class whose trials are scored by ``cross_validate`` (``val_accuracy`` =
    cross-validated top-1) instead of one fit on the validation split."""

    class CrossValidated(base):
        def run_trial(self, trial, prepared: Prepared, folds: int, epochs: int, patience: int, batch_size: int):
            result = cross_validate(prepared, trial.hyperparameters, folds=folds, epochs=epochs, patience=patience,
                                    batch_size=batch_size)
            return {"val_accuracy": result["top1"], "val_loss": result["loss"]}

    CrossValidated.__name__ = f"CrossValidated{base.__name__}"
    return CrossValidated


def make_tuner(kind: str, hypermodel, directory: Path, max_trials: int, max_epochs: int, seed: int,
               overwrite: bool, cross_validated: bool = False) -> kt.Tuner:
    common = dict(objective="val_accuracy", directory=str(directory), project_name="search", seed=seed,
                  overwrite=overwrite)
    if cross_validated:
        if kind == "hyperband":
            raise ValueError("hyperband allocates epochs per trial; cross-validated tuning needs random or bayesian")
        base = kt.RandomSearch if kind == "random" else kt.BayesianOptimization
        return _cross_validated(base)(hypermodel, max_trials=max_trials, **common)
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        return kt.Hyperband(hypermodel, max_epochs=max_epochs, factor=3, hyperband_iterations=1,
                            max_consecutive_failed_trials=3, **common)
    raise ValueError(f"unknown tuner {kind!r}; choose from {', '.join(TUNERS)}")


def tune(prepared: Prepared, out_dir: Path, *, kind: str = "random", max_trials: int = 20, epochs: int = 30,
         patience: int = 4, batch_size: int = 64, overwrite: bool = False, verbose: int = 0,
         cv_folds: int = 0) -> dict:
    """Search; write ``trials.jsonl`` (one line per trial), ``best_hyperparameters.json``.
    ``overwrite=False`` resumes an interrupted search in the same directory. ``cv_folds`` >= 2:
    score each trial by k-fold cross-validation on the training photos (``cross_validate``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = prepared.context()
    family_name = prepared.config.model
    # before any trial's model is built: its initial weights (and dropout) then follow the run's seed,
    # not whatever used the global RNGs earlier in this process (as fit does; a trial's first epochs
    # are scored too, so its initial weights move the search's scores)
    keras.utils.set_random_seed(prepared.config.seed)

    def hypermodel(hp):
        return models.build(family_name, hp, ctx)

    tuner = make_tuner(kind, hypermodel, out_dir, max_trials, epochs, prepared.config.seed, overwrite,
                       cross_validated=cv_folds >= 2)
    started = time.perf_counter()
    if cv_folds >= 2:
        tuner.search(prepared=prepared, folds=cv_folds, epochs=epochs, patience=patience, batch_size=batch_size)
    else:
        train, val = prepared.training_data().datasets(batch_size, prepared.config.seed)
        tuner.search(
            train, validation_data=val, epochs=epochs, verbose=verbose,
            callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)],
        )
    seconds = time.perf_counter() - started
    trials = []
    for trial in tuner.oracle.trials.values():
        trials.append({"trial_id": trial.trial_id, "status": str(trial.status), "score": trial.score,
                       "hyperparameters": trial.hyperparameters.values})
    trials.sort(key=lambda t: -(t["score"] or 0.0))
    with open(out_dir / "trials.jsonl", "w") as f:
        for t in trials:
            f.write(json.dumps(t) + "\n")
    best = tuner.get_best_hyperparameters(1)[0].values
    summary = {"family": family_name, "tuner": kind, "trials": len(trials), "seconds": round(seconds, 1),
               "objective": f"{cv_folds}-fold cross-validated top-1 on the training photos" if cv_folds >= 2
               else "top-1 on the validation split",
               "best_val_accuracy": trials[0]["score"] if trials else None, "best_hyperparameters": best}
    (out_dir / "best_hyperparameters.json").write_text(json.dumps(summary, indent=1))
    return summary
