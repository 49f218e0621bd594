"""The model artifact, as the worker reads it: the contract (:mod:`.contract`), verification
(:mod:`.verification`), the store that resolves, downloads and caches artifacts (:mod:`.store`)
and loading a model variant for serving (:mod:`.loading`, imported on its own: it pulls in
:mod:`worker.runtimes`, which imports the contract from here).

Writing and publishing artifacts is the trainer's job (``trainer.artifact_writer``,
``trainer.registry``); nothing here imports the trainer, TensorFlow or Keras.
"""

from worker.artifact.contract import (
    LABELS_FILE,
    LATEST,
    MANIFEST_FILE,
    MODEL_DIR,
    README_FILE,
    SAVED_MODEL_PB,
    SCHEMA_VERSION,
    SERVE_SIGNATURE,
    SIGNATURE_FILE,
    ArtifactError,
    ArtifactManifest,
    Label,
    read_labels,
    read_manifest,
)
from worker.artifact.store import cache_root, resolve_artifact
from worker.artifact.verification import sha256_file, verify_artifact

__all__ = [
    "LABELS_FILE",
    "LATEST",
    "MANIFEST_FILE",
    "MODEL_DIR",
    "README_FILE",
    "SAVED_MODEL_PB",
    "SCHEMA_VERSION",
    "SERVE_SIGNATURE",
    "SIGNATURE_FILE",
    "ArtifactError",
    "ArtifactManifest",
    "Label",
    "cache_root",
    "read_labels",
    "read_manifest",
    "resolve_artifact",
    "sha256_file",
    "verify_artifact",
]
