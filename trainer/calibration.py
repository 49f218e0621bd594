"""Scores that are probabilities: temperature scaling, expected calibration error, the
reliability diagram and the risk-coverage table.

Temperature scaling (Guo et al., 2017) divides the breed logits by one number ``T`` fitted on
the validation split (minimum negative log-likelihood); the ranking, so top-1, is unchanged.
It is applied to log-probabilities, ``softmax(log p / T)``, which equals ``softmax(logits / T)``
for a softmax model and also works when the breed model averages probabilities (e.g. over a
flipped copy of the photo). The served model applies it inside its graph
(``trainer.serving``), so every runtime serves calibrated scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ECE_BINS = 15
RISK_COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TEMPERATURE_BOUNDS = (0.05, 20.0)
EPS = 1e-12


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``, row-wise, in float64."""
    z = log_probabilities(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return 0.0
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of ``labels`` under ``softmax(log p / T)``
    (bounded search over log T); 1.0 when there is nothing to fit on."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    if len(labels) < 2:
        return 1.0
    z = log_probabilities(probs)

    def loss(log_t: float) -> float:
        s = z / np.exp(log_t)
        s -= s.max(axis=1, keepdims=True)
        return float(-np.mean(s[np.arange(len(labels)), labels] - np.log(np.exp(s).sum(axis=1))))

    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return round(float(np.exp(result.x)), 4)


def _bins(probs: np.ndarray, labels: np.ndarray, bins: int):
    """(edges, [(photos, mean confidence, accuracy)] per bin) of the top-1 score; bin i holds
    (edge i, edge i+1], the first also 0."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == np.asarray(labels)) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        inside = index == i
        n = int(inside.sum())
        out.append((n, float(confidence[inside].mean()) if n else 0.0, float(correct[inside].mean()) if n else 0.0))
    return edges, out


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: photos, mean confidence (top-1 score), accuracy."""
    edges, table = _bins(probs, labels, bins)
    return [{"low": round(float(edges[i]), 4), "high": round(float(edges[i + 1]), 4), "photos": n,
             "confidence": round(conf, 4) if n else None, "accuracy": round(acc, 4) if n else None}
            for i, (n, conf, acc) in enumerate(table)]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the photo-weighted mean |accuracy - confidence| over ``bins`` equal-width bins of
    the top-1 score."""
    n = len(labels)
    if n == 0:
        return 0.0
    _, table = _bins(probs, labels, bins)
    return float(sum(k * abs(acc - conf) for k, conf, acc in table) / n)


def risk_coverage(probs: np.ndarray, labels: np.ndarray, thresholds=RISK_COVERAGE_THRESHOLDS) -> list[dict]:
    """For each threshold t: the share of photos whose top-1 score is >= t (kept) and the
    top-1 accuracy of those kept (the rest would go to human review)."""
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, bool)
    rows = []
    for t in thresholds:
        kept = confidence >= t
        rows.append({"min_score": t, "kept": round(float(kept.mean()), 4) if len(kept) else 0.0,
                     "photos_kept": int(kept.sum()),
                     "top1_of_kept": round(float(correct[kept].mean()), 4) if kept.any() else None})
    return rows


@dataclass
class CalibrationReport:
    """What evaluation.json and the model card say about calibration (one evaluated set)."""

    temperature: float
    photos: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    risk_coverage: list[dict]  # after calibration
    reliability_before: list[dict]
    reliability_after: list[dict]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
            d[key] = round(d[key], 4)
        return d


def report(probs: np.ndarray, labels: np.ndarray, temperature: float) -> CalibrationReport:
    """Calibration of raw probabilities ``probs`` before and after ``temperature``."""
    after = apply_temperature(probs, temperature) if len(probs) else probs
    return CalibrationReport(temperature, int(len(labels)), expected_calibration_error(probs, labels),
                             expected_calibration_error(after, labels), nll(probs, labels), nll(after, labels),
                             risk_coverage(after, labels), reliability(probs, labels), reliability(after, labels))


def plot_reliability(reports: dict[str, CalibrationReport], path: Path) -> Path:
    """``calibration.png``: one reliability diagram per evaluated set, before and after
    temperature scaling (accuracy against mean confidence per bin; the diagonal is perfect)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(reports)), figsize=(5.2 * max(1, len(reports)), 4.6), squeeze=False)
    for ax, (name, rep) in zip(axes.flat, reports.items()):
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
        for key, style, label in (("reliability_before", "o--", f"before (ECE {rep.ece_before:.1%})"),
                                  ("reliability_after", "s-", f"T={rep.temperature:g} (ECE {rep.ece_after:.1%})")):
            pts = [(b["confidence"], b["accuracy"]) for b in getattr(rep, key) if b["photos"]]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 score)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} ({rep.photos} photos)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
