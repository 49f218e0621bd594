"""Evaluate a model on a test set: loss, top-1, top-5, per-breed accuracy, confusion matrix,
and the photos it got wrong, as ``evaluation.json`` and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Evaluation:
    photos: int
    loss: float
    top1: float
    top5: float
    per_breed: dict[str, dict]  # folder -> {"photos", "top1"}
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    classes: list[str]
    mistakes: list[dict]  # {"path", "true", "predicted", "score"}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def summary(self) -> dict:
        return {"photos": self.photos, "loss": round(self.loss, 4), "top1": round(self.top1, 4),
                "top5": round(self.top5, 4)}


def evaluate_probabilities(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                           paths: list[str] | None = None) -> Evaluation:
    """Metrics from predicted probabilities (N x C) and true class indices (N)."""
    n, c = probs.shape
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), labels], eps, 1.0)))) if n else 0.0
    order = np.argsort(-probs, axis=1)
    predicted = order[:, 0]
    top1 = float(np.mean(predicted == labels)) if n else 0.0
    top5 = float(np.mean([labels[i] in order[i, :5] for i in range(n)])) if n else 0.0
    confusion = np.zeros((c, c), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_breed = {}
    for k, folder in enumerate(classes):
        total = int(confusion[k].sum())
        per_breed[folder] = {"photos": total, "top1": round(float(confusion[k, k] / total), 4) if total else None}
    mistakes = [
        {"path": paths[i] if paths else str(i), "true": classes[labels[i]], "predicted": classes[predicted[i]],
         "score": round(float(probs[i, predicted[i]]), 4)}
        for i in np.flatnonzero(predicted != labels)
    ]
    return Evaluation(n, loss, top1, top5, per_breed, confusion.tolist(), list(classes), mistakes)


def breed_name(folder: str) -> str:
    return folder.split("-", 1)[-1].replace("_", " ")


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(evaluation.confusion, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    c = len(evaluation.classes)
    size = max(6, min(30, 0.35 * c + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    names = [breed_name(f) for f in evaluation.classes]
    if c <= 40:
        ax.set_xticks(range(c), names, rotation=90, fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted breed")
    ax.set_ylabel("true breed")
    ax.set_title(f"Confusion matrix: top-1 {evaluation.top1:.1%} on {evaluation.photos} photos")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_mistakes(evaluation: Evaluation, pixels_by_path: dict[str, np.ndarray], path: Path, limit: int = 24) -> Path:
    """A grid of misclassified photos with true and predicted breeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mistakes = [m for m in evaluation.mistakes if m["path"] in pixels_by_path][:limit]
    cols = 6
    rows = max(1, (len(mistakes) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(pixels_by_path[m["path"]])
        ax.set_title(f"true: {breed_name(m['true'])}\npred: {breed_name(m['predicted'])} ({m['score']:.2f})",
                     fontsize=7)
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(f"Misclassified photos ({len(evaluation.mistakes)} in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_evaluation(evaluation: Evaluation, out_dir: Path, pixels_by_path: dict[str, np.ndarray] | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"evaluation": out_dir / "evaluation.json"}
    files["evaluation"].write_text(evaluation.to_json())
    files["confusion"] = plot_confusion(evaluation, out_dir / "confusion.png")
    if pixels_by_path is not None:
        files["mistakes"] = plot_mistakes(evaluation, pixels_by_path, out_dir / "mistakes.png")
    return files
