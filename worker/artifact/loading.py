"""Loading: resolve and verify an artifact, then load one of its model variants
(:mod:`worker.runtimes`) behind a plain ``predict`` function."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from worker import runtimes, signature
from worker.artifact.contract import MANIFEST_FILE, SIGNATURE_FILE, ArtifactManifest, Label, read_labels
from worker.artifact.store import read_optional, resolve_artifact


@dataclass(frozen=True)
class LoadedArtifact:
    path: Path
    manifest: ArtifactManifest
    labels: list[Label]
    predict: Callable[[np.ndarray], np.ndarray]  # float32 (n, H, W, 3) 0..255 -> (n, manifest.output_width)
    runtime: str = "tf"  # the manifest "runtimes" key serving predict (worker.runtimes)
    provenance: Any = None  # worker.signature.Provenance: manifest digest, signature verified or not


def load_artifact(uri: str, *, s3=None, cache_dir: Path | None = None, runtime: str | None = None,
                  trust=None) -> LoadedArtifact:
    """Resolve + verify an artifact and load one of its runtimes (see :mod:`worker.runtimes`):
    ``runtime`` None -> ``$DOGBREEDS_RUNTIME`` -> ``"auto"`` (the fastest data-only variant whose
    recorded agreement with fp32 passed; the TensorFlow SavedModel only when chosen explicitly or
    allowed with ``$DOGBREEDS_ALLOW_SAVEDMODEL``).

    ``trust`` (:class:`worker.signature.TrustPolicy`; None -> from ``$DOGBREEDS_TRUSTED_KEY`` and
    ``$DOGBREEDS_MODEL_DIGEST``) vouches for ``manifest.json`` before anything of the artifact is
    downloaded or loaded; every file then read is checked against that manifest's sha256. The
    result's ``provenance`` says what was verified."""
    trust = signature.TrustPolicy.from_env() if trust is None else trust

    def needed(manifest: ArtifactManifest) -> set[str]:  # from S3, only the chosen runtime's model
        return runtimes.files_of(runtimes.select(manifest.runtimes, runtime), manifest.files)

    path = resolve_artifact(uri, s3=s3, cache_dir=cache_dir, needed=needed, trust=trust)
    manifest_bytes = (Path(path) / MANIFEST_FILE).read_bytes()
    provenance = trust.check(manifest_bytes, read_optional(Path(path) / SIGNATURE_FILE), str(uri))
    manifest = ArtifactManifest.from_dict(json.loads(manifest_bytes))  # the bytes just vouched for
    labels = read_labels(path)
    entry = runtimes.select(manifest.runtimes, runtime)
    predict = runtimes.load(path, entry, input_size=manifest.input_size, num_classes=manifest.num_classes,
                            outputs=manifest.output_width)
    return LoadedArtifact(path=Path(path), manifest=manifest, labels=labels, predict=predict, runtime=entry.key,
                          provenance=provenance)
