""""Is there a dog?": the dog score, its threshold, and how well it does.

The dog score of a photo is a number in [0, 1] computed inside the served model from the same
forward pass as the breeds (trainer.serving); a photo scoring below the artifact's threshold is
answered ``no_dog``. This module fits the dog/not-dog head, chooses the threshold on
validation photos and measures the decision:

- :func:`fit_dog_head`: logistic regression (scikit-learn, balanced classes, standardised
  features folded back into one weight vector) on pooled features: dog photos of the train
  split against the ``fit`` part of the not-dog photos (trainer.not_dogs);
- :func:`choose_threshold`: on the validation dogs and the ``val`` part of the not-dogs;
- :func:`measure`: dogs lost and not-dogs answered ``no_dog``, per group (cats, objects).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from trainer.serving import DogHead

METHODS = ("dog-head", "imagenet-dog-mass")
MAX_DOG_LOSS = 0.005  # the dogs' tail: half the 1% target
MAX_NOT_DOG_PASS = 0.01  # the not-dogs' tail: half the tighter (objects, 2%) target
CROSS_FIT_FOLDS = 5
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def _standardised_logistic(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit((x - mean) / std, y)
    w = model.coef_[0] / std
    return DogHead(weights=w.astype(np.float32), bias=float(model.intercept_[0] - (mean / std) @ model.coef_[0]))


def fit_dog_head(dogs: np.ndarray, not_dogs: np.ndarray, *, val_dogs: np.ndarray | None = None,
                 val_not_dogs: np.ndarray | None = None, c: float | None = None) -> tuple[DogHead, dict]:
    """A logistic dog (1) / not-dog (0) head on pooled features. The regularisation ``c`` is
    chosen on the validation photos (lowest balanced log-loss) when they are given, else 0.1.
    Returns the head and what was chosen."""
    x = np.concatenate([dogs, not_dogs]).astype(np.float32)
    y = np.concatenate([np.ones(len(dogs)), np.zeros(len(not_dogs))])
    chosen = {"fit_dogs": int(len(dogs)), "fit_not_dogs": int(len(not_dogs))}
    if c is None and val_dogs is not None and val_not_dogs is not None and len(val_dogs) and len(val_not_dogs):
        losses = {}
        for candidate in C_GRID:
            head = _standardised_logistic(x, y, candidate)
            losses[candidate] = _balanced_log_loss(head.score(val_dogs), head.score(val_not_dogs))
        c = min(losses, key=losses.get)
        chosen["c_val_log_loss"] = {str(k): round(v, 4) for k, v in losses.items()}
    c = 0.1 if c is None else c
    chosen["c"] = c
    return _standardised_logistic(x, y, c), chosen


def cross_fitted_scores(dogs: np.ndarray, dog_groups: np.ndarray, not_dogs: np.ndarray, c: float,
                        folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out dog scores of the fit photos themselves: ``folds`` heads, each fitted without one
    fold, score that fold. ``dog_groups[i]`` is the photo a dog row comes from (its augmented
    copies share it and stay in the same fold). Returns (scores of one row per dog photo, in
    ``np.unique(dog_groups)`` order, scores of the not-dogs)."""
    rng = np.random.default_rng(seed)
    photos = np.unique(dog_groups)
    dog_fold = dict(zip(photos, rng.permutation(len(photos)) % folds))
    row_fold = np.array([dog_fold[g] for g in dog_groups])
    nd_fold = rng.permutation(len(not_dogs)) % folds
    first_row = {g: i for i, g in reversed(list(enumerate(dog_groups)))}
    dog_scores, nd_scores = np.zeros(len(photos)), np.zeros(len(not_dogs))
    for k in range(folds):
        head = _standardised_logistic(np.concatenate([dogs[row_fold != k], not_dogs[nd_fold != k]]).astype(np.float32),
                                      np.concatenate([np.ones((row_fold != k).sum()), np.zeros((nd_fold != k).sum())]),
                                      c)
        held = [i for i, g in enumerate(photos) if dog_fold[g] == k]
        dog_scores[held] = head.score(dogs[[first_row[photos[i]] for i in held]])
        nd_scores[nd_fold == k] = head.score(not_dogs[nd_fold == k])
    return dog_scores, nd_scores


def _balanced_log_loss(dog_scores: np.ndarray, not_dog_scores: np.ndarray) -> float:
    eps = 1e-7
    return float(-0.5 * (np.mean(np.log(np.clip(dog_scores, eps, 1))) + np.mean(np.log(np.clip(1 - not_dog_scores, eps, 1)))))


def choose_threshold(dog_scores: np.ndarray, not_dog_scores: np.ndarray, max_dog_loss: float = MAX_DOG_LOSS,
                     max_not_dog_pass: float = MAX_NOT_DOG_PASS) -> float:
    """The threshold (photos scoring below it are answered no_dog), from held-out photos: the
    middle of the gap between the dogs' lower tail (the lowest dog kept when at most
    ``max_dog_loss`` of them are lost) and the not-dogs' upper tail (the highest not-dog
    answered no_dog when ``max_not_dog_pass`` of them may pass), each tail set at half its
    target (1% of dogs lost, 2-5% of not-dogs passed). When the tails overlap, dogs win: the
    threshold sits just below that lowest kept dog. Rounded down to 4 decimals."""
    dogs = np.sort(np.asarray(dog_scores, np.float64))
    if len(dogs) == 0:
        return 0.5
    lowest_kept = dogs[int(np.floor(max_dog_loss * len(dogs)))]
    others = np.sort(np.asarray(not_dog_scores, np.float64))
    if len(others) == 0:
        t = lowest_kept / 2
    else:
        upper_tail = others[min(len(others) - 1, int(np.ceil((1 - max_not_dog_pass) * len(others))) - 1)]
        t = (lowest_kept + upper_tail) / 2 if upper_tail < lowest_kept else lowest_kept - 1e-4
    return float(max(0.0, np.floor(t * 1e4) / 1e4))


@dataclass
class DogCheckMeasure:
    threshold: float
    dogs: int
    dogs_lost: float  # share of dog photos answered no_dog
    not_dogs: dict  # group -> {"photos", "no_dog"} (share answered no_dog)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dogs_lost"] = round(d["dogs_lost"], 4)
        return d


def measure(dog_scores: np.ndarray, not_dog_scores: np.ndarray, not_dog_groups: list[str],
            threshold: float) -> DogCheckMeasure:
    """How the decision ``score < threshold -> no_dog`` does on dogs and on not-dogs by group."""
    dog_scores, not_dog_scores = np.asarray(dog_scores), np.asarray(not_dog_scores)
    groups: dict[str, dict] = {}
    for group in sorted(set(not_dog_groups)):
        mask = np.array([g == group for g in not_dog_groups])
        groups[group] = {"photos": int(mask.sum()), "no_dog": round(float((not_dog_scores[mask] < threshold).mean()), 4)}
    return DogCheckMeasure(threshold, int(len(dog_scores)),
                           float((dog_scores < threshold).mean()) if len(dog_scores) else 0.0, groups)
