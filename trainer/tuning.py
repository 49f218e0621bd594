"""Keras Tuner search over a model family's hyper-parameters, on cached features (feature
families: a trial takes seconds) or on photos (scratch families)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import keras_tuner as kt

from trainer import models
from trainer.experiment import Prepared

TUNERS = ("random", "hyperband", "bayesian")


def make_tuner(kind: str, hypermodel, directory: Path, max_trials: int, max_epochs: int, seed: int,
               overwrite: bool) -> kt.Tuner:
    common = dict(objective="val_accuracy", directory=str(directory), project_name="search", seed=seed,
                  overwrite=overwrite)
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        return kt.Hyperband(hypermodel, max_epochs=max_epochs, factor=3, hyperband_iterations=1,
                            max_consecutive_failed_trials=3, **common)
    raise ValueError(f"unknown tuner {kind!r}; choose from {', '.join(TUNERS)}")


def tune(prepared: Prepared, out_dir: Path, *, kind: str = "random", max_trials: int = 20, epochs: int = 30,
         patience: int = 4, batch_size: int = 64, overwrite: bool = False, verbose: int = 0) -> dict:
    """Search; write ``trials.jsonl`` (one line per trial), ``best_hyperparameters.json``.
    ``overwrite=False`` resumes an interrupted search in the same directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = prepared.context()
    family_name = prepared.config.model

    def hypermodel(hp):
        return models.build(family_name, hp, ctx)

    tuner = make_tuner(kind, hypermodel, out_dir, max_trials, epochs, prepared.config.seed, overwrite)
    train, val = prepared.training_data().datasets(batch_size, prepared.config.seed)
    started = time.perf_counter()
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
               "best_val_accuracy": trials[0]["score"] if trials else None, "best_hyperparameters": best}
    (out_dir / "best_hyperparameters.json").write_text(json.dumps(summary, indent=1))
    return summary
