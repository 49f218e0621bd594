"""A loaded model artifact as a breed classifier: uint8 photos in, a verdict per photo out.

The verdict of one photo (:class:`Prediction`):

- ``no_dog``: the artifact has a dog check (manifest ``dog_check``), it is on, and the photo's
  dog score is below the artifact's threshold;
- ``uncertain``: a ``min_score`` is set and the best breed's (calibrated) score is below it;
- ``ok``: otherwise.

The top-k breeds are kept whatever the verdict (a hint for a human; only ``ok`` names a breed).
An artifact without a dog check (schema 1, or published without one) answers ``ok`` or
``uncertain`` only, with ``dog_score`` None; one without ``calibration`` serves its scores as
they are (temperature 1). Both are logged once, at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from worker.artifact.loading import LoadedArtifact, load_artifact

log = logging.getLogger(__name__)

OK, NO_DOG, UNCERTAIN = "ok", "no_dog", "uncertain"


@dataclass(frozen=True)
class BreedScore:
    synset: str
    breed: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """One photo's verdict: ``status`` (ok / no_dog / uncertain), its top-k breeds (best first,
    kept whatever the status) and its dog score (None when the model has none)."""

    status: str
    top_k: list[BreedScore]
    dog_score: float | None = None

    @property
    def breed(self) -> BreedScore | None:
        """The answer: the best breed, only when the status is ``ok``."""
        return self.top_k[0] if self.status == OK and self.top_k else None


def verdict(best_score: float, dog_score: float | None, *, dog_threshold: float | None,
            min_score: float | None) -> str:
    """The status rule, in order: no dog (dog score below the threshold), then uncertain
    (best breed score below ``min_score``), else ok. ``dog_threshold`` None: no dog check."""
    if dog_threshold is not None and dog_score is not None and dog_score < dog_threshold:
        return NO_DOG
    if min_score is not None and best_score < min_score:
        return UNCERTAIN
    return OK


@dataclass
class Classifier:
    artifact: LoadedArtifact
    top_k: int = 5
    dog_check: bool = True  # apply the artifact's dog check (when it has one)
    min_score: float | None = None  # best breed score below it -> "uncertain"

    def __post_init__(self) -> None:
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        m = self.artifact.manifest
        if not m.dog_check:
            log.warning("model %s/%s has no dog check: every photo is taken to show a dog", m.name, m.version)
        elif not self.dog_check:
            log.warning("the dog check of model %s/%s is off: photos without a dog get a breed", m.name, m.version)
        if not m.calibration:
            log.warning("model %s/%s has no calibration: its scores are served as they are (temperature 1)",
                        m.name, m.version)

    @classmethod
    def load(cls, uri: str, top_k: int = 5, runtime: str | None = None, trust=None, *, dog_check: bool = True,
             min_score: float | None = None, **kw) -> "Classifier":
        """``runtime``: a manifest runtimes key or runtime name; None -> $DOGBREEDS_RUNTIME -> auto
        (see worker.runtimes.select). ``trust``: a worker.signature.TrustPolicy (None -> from the
        environment). Logs what it serves: the model, its manifest digest and whether its signature
        was verified (a warning when it was not)."""
        classifier = cls(load_artifact(uri, runtime=runtime, trust=trust, **kw), top_k, dog_check=dog_check,
                         min_score=min_score)
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
    def dog_threshold(self) -> float | None:
        """The threshold applied, or None (no check in the artifact, or turned off)."""
        check = self.artifact.manifest.dog_check
        return float(check["threshold"]) if check and self.dog_check else None

    @property
    def model_info(self) -> dict:
        m = self.artifact.manifest
        info = {"name": m.name, "version": m.version, "runtime": getattr(self.artifact, "runtime", "tf")}
        provenance = getattr(self.artifact, "provenance", None)
        if provenance is not None:
            info["manifest_sha256"] = provenance.manifest_sha256
        return info

    def scores(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N x H x W x 3 -> (breed probabilities N x C, dog scores N or None), one forward pass."""
        out = self.artifact.predict(np.asarray(pixels, dtype=np.float32))
        c = self.artifact.manifest.num_classes
        return out[:, :c], (out[:, c] if self.artifact.manifest.dog_check else None)

    def predict(self, pixels: np.ndarray) -> list[Prediction]:
        """N x H x W x 3 uint8 -> one verdict per photo."""
        probs, dog = self.scores(pixels)
        labels = self.artifact.labels
        k = min(self.top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1)[:, :k]
        out = []
        for i, (row, idx) in enumerate(zip(probs, order)):
            top = [BreedScore(labels[j].synset, labels[j].breed, float(row[j])) for j in idx]
            dog_score = None if dog is None else float(dog[i])
            status = verdict(top[0].score, dog_score, dog_threshold=self.dog_threshold, min_score=self.min_score)
            out.append(Prediction(status, top, dog_score))
        return out

    def classify(self, pixels: np.ndarray) -> list[list[BreedScore]]:
        """N x H x W x 3 uint8 -> for each photo, the top-k breeds, best first (no verdict)."""
        return [p.top_k for p in self.predict(pixels)]
