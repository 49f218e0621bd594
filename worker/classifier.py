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
    def load(cls, uri: str, top_k: int = 5, runtime: str | None = None, trust=None, **kw) -> "Classifier":
        """``runtime``: a manifest runtimes key or runtime name; None -> $DOGBREEDS_RUNTIME -> auto
        (see worker.runtimes.select). ``trust``: a worker.signature.TrustPolicy (None -> from the
        environment). Logs what it serves: the model, its manifest digest and whether its signature
        was verified (a warning when it was not)."""
        classifier = cls(load_artifact(uri, runtime=runtime, trust=trust, **kw), top_k)
        classifier.log_provenance(uri)
        return classifier

    def log_provenance(self, uri: str) -> None:
        from worker.observability import logger

        provenance = self.artifact.provenance
        details = {"model": {**self.model_info, "uri": uri, **(provenance.to_dict() if provenance else {})}}
        if provenance is not None and provenance.verified:
            logger.info("model signature verified", extra=details)
        else:
            logger.warning("serving an unverified model: no trusted key is configured (DOGBREEDS_TRUSTED_KEY or "
                           "--trusted-key), so anyone who can write the model's files decides what runs",
                           extra=details)

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
        info = {"name": m.name, "version": m.version, "runtime": getattr(self.artifact, "runtime", "tf")}
        provenance = getattr(self.artifact, "provenance", None)
        if provenance is not None:
            info["manifest_sha256"] = provenance.manifest_sha256
        return info

    def classify(self, pixels: np.ndarray) -> list[list[BreedScore]]:
        """N x H x W x 3 uint8 -> for each photo, the top-k breeds, best first."""
        probs = self.artifact.predict(np.asarray(pixels, dtype=np.float32))
        labels = self.artifact.labels
        k = min(self.top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[BreedScore(labels[j].synset, labels[j].breed, float(row[j])) for j in idx]
                for row, idx in zip(probs, order)]
