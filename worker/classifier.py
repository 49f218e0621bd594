"""A loaded model artifact as a breed classifier: uint8 photos in, top-k breeds out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.artifact import LoadedArtifact, load_artifact


@dataclass(frozen=True)
class BreedScore:
    synset: str
    breed: str
    score: float


@dataclass
class Classifier:
    artifact: LoadedArtifact
    top_k: int = 5

    @classmethod
    def load(cls, uri: str, top_k: int = 5, runtime: str | None = None, **kw) -> "Classifier":
        """``runtime``: a manifest runtimes key or runtime name; None -> $DOGBREEDS_RUNTIME -> auto
        (see worker.runtimes.select)."""
        return cls(load_artifact(uri, runtime=runtime, **kw), top_k)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) for ``worker.images.load_image``."""
        h, w = self.artifact.manifest.input_size
        return (w, h)

    @property
    def input_fit(self) -> str:
        """The ``worker.images`` fit the model was trained with (``crop`` or ``squash``)."""
        return self.artifact.manifest.input_fit

    @property
    def model_info(self) -> dict:
        m = self.artifact.manifest
        return {"name": m.name, "version": m.version, "runtime": getattr(self.artifact, "runtime", "tf")}

    def classify(self, pixels: np.ndarray) -> list[list[BreedScore]]:
        """N x H x W x 3 uint8 -> for each photo, the top-k breeds, best first."""
        probs = self.artifact.predict(np.asarray(pixels, dtype=np.float32))
        labels = self.artifact.labels
        k = min(self.top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[BreedScore(labels[j].synset, labels[j].breed, float(row[j])) for j in idx]
                for row, idx in zip(probs, order)]
