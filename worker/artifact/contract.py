"""The artifact contract: what a model artifact is, and the readers of its two JSON files.

Layout (locally, and under the S3 prefix ``<prefix>/<name>/<version>/``)::

    <artifact dir>/
      model/          TF SavedModel; signature "serve":
                      float32 (batch, H, W, 3) RGB 0..255 -> probabilities (batch, num_classes)
      labels.json     [{"index": 0, "synset": "n02085620", "breed": "Chihuahua",
                        "folder": "n02085620-Chihuahua"}, ...]
      manifest.json   ArtifactManifest; ``files`` = sha256 of every other file
      manifest.sig    optional: the signature of manifest.json (worker.signature)
      README.md       model card
      plots/*.png     optional

A registry (a local directory or an S3 prefix) holds ``<name>/<version>/`` artifacts and a
``<name>/latest`` text object whose content is the current version. ``manifest.json``
``runtimes`` lists the model variants: ``tf`` (``model/``, fp32, always there) and optional
faster ones published beside it (:mod:`worker.runtimes`).

Only reading lives in :mod:`worker.artifact`; the trainer writes and publishes artifacts
(``trainer.artifact_writer``, ``trainer.registry``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from worker.images import FITS, LEGACY_FIT

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MODEL_DIR = "model"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # optional: the signature of manifest.json (worker.signature)
README_FILE = "README.md"
LATEST = "latest"
SAVED_MODEL_PB = f"{MODEL_DIR}/saved_model.pb"
SERVE_SIGNATURE = "serve"
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(Exception):
    """An artifact is missing, malformed or does not match its manifest.

    ``problems`` lists every individual finding (the message joins them).
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


@dataclass(frozen=True)
class Label:
    index: int
    synset: str
    breed: str
    folder: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "synset": self.synset, "breed": self.breed, "folder": self.folder}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Label":
        if not isinstance(d, dict):
            raise ArtifactError(f"label entry is not an object: {d!r}")
        try:
            index, synset, breed, folder = d["index"], d["synset"], d["breed"], d["folder"]
        except KeyError as e:
            raise ArtifactError(f"label entry {d!r} lacks {e.args[0]!r}") from None
        if isinstance(index, bool) or not isinstance(index, int):
            raise ArtifactError(f"label index is not an integer: {d!r}")
        for k, v in (("synset", synset), ("breed", breed), ("folder", folder)):
            if not isinstance(v, str) or not v:
                raise ArtifactError(f"label {k} is not a non-empty string: {d!r}")
        return cls(index=index, synset=synset, breed=breed, folder=folder)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ArtifactManifest:
    schema_version: int
    name: str
    version: str
    created: str  # ISO 8601 UTC, e.g. 2026-11-25T21:04:55Z
    backbone: str
    weights: dict  # {"kind", "location", "sha256", "imagenet", "note"}
    input_size: list[int]  # [H, W]
    input_format: str
    preprocessing: str
    num_classes: int
    metrics: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    runtimes: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative posix path -> sha256
    # worker.images fit the model was trained with; manifests written before the field existed
    # were trained on squashed photos
    input_fit: str = LEGACY_FIT
    # {"method", "threshold", "score_column" (= num_classes), ...}: the model's output has one
    # more column, the dog score; a photo scoring below the threshold has no dog. {}: no check.
    dog_check: dict = field(default_factory=dict)
    # {"temperature", ...}: the breed scores are calibrated inside the model. {}: T = 1.
    calibration: dict = field(default_factory=dict)

    # Class constant (no annotation, so not a dataclass field): field -> (check, description).
    _TYPES = {
        "schema_version": (_is_int, "an integer"),
        "name": (lambda v: isinstance(v, str) and bool(_SAFE_SEGMENT.match(v)), "a name of [A-Za-z0-9._-]"),
        "version": (
            lambda v: isinstance(v, str) and bool(_SAFE_SEGMENT.match(v)) and v != LATEST,
            "a version of [A-Za-z0-9._-] (not 'latest')",
        ),
        "created": (lambda v: isinstance(v, str) and bool(v), "a string"),
        "backbone": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "weights": (lambda v: isinstance(v, dict), "an object"),
        "input_size": (
            lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
            "[H, W] positive integers",
        ),
        "input_format": (lambda v: isinstance(v, str), "a string"),
        "preprocessing": (lambda v: isinstance(v, str), "a string"),
        "num_classes": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "metrics": (lambda v: isinstance(v, dict), "an object"),
        "hyperparameters": (lambda v: isinstance(v, dict), "an object"),
        "training": (lambda v: isinstance(v, dict), "an object"),
        "runtimes": (lambda v: isinstance(v, dict), "an object"),
        "files": (
            lambda v: isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(s, str) and _SHA256.match(s) for k, s in v.items()),
            "an object of relative path -> lowercase hex sha256",
        ),
    }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "backbone": self.backbone,
            "weights": dict(self.weights),
            "input_size": list(self.input_size),
            "input_format": self.input_format,
            "input_fit": self.input_fit,
            "preprocessing": self.preprocessing,
            "num_classes": self.num_classes,
            "metrics": dict(self.metrics),
            "hyperparameters": dict(self.hyperparameters),
            "training": dict(self.training),
            "runtimes": dict(self.runtimes),
            "dog_check": dict(self.dog_check),
            "calibration": dict(self.calibration),
            "files": dict(sorted(self.files.items())),
        }

    @property
    def output_width(self) -> int:
        """Columns of the model's output: the breeds, then the dog score when there is a check."""
        return self.num_classes + (1 if self.dog_check else 0)

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0)) if self.calibration else 1.0

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArtifactManifest":
        """Validate and build; unknown keys are ignored. Raises ArtifactError."""
        if not isinstance(d, dict):
            raise ArtifactError("manifest.json: not a JSON object")
        problems = []
        sv = d.get("schema_version")
        if _is_int(sv) and sv > max(READABLE_SCHEMA_VERSIONS):
            raise ArtifactError(
                f"manifest.json: schema_version {sv} is newer than this code understands ({SCHEMA_VERSION})"
            )
        for name, (check, desc) in cls._TYPES.items():
            if name not in d:
                problems.append(f"manifest.json: missing field {name!r}")
            elif not check(d[name]):
                problems.append(f"manifest.json: field {name!r} must be {desc}, got {d[name]!r}")
        fit = d.get("input_fit", LEGACY_FIT)
        if fit not in FITS:
            problems.append(f"manifest.json: field 'input_fit' must be one of {list(FITS)}, got {fit!r}")
        dog_check, calibration = d.get("dog_check") or {}, d.get("calibration") or {}
        problems += _dog_check_problems(dog_check, d.get("num_classes")) + _calibration_problems(calibration)
        if problems:
            raise ArtifactError("; ".join(problems), problems)
        kwargs = {name: d[name] for name in cls._TYPES}
        kwargs["input_fit"] = fit
        kwargs["dog_check"], kwargs["calibration"] = dict(dog_check), dict(calibration)
        kwargs["input_size"] = [int(x) for x in d["input_size"]]
        return cls(**kwargs)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dog_check_problems(dog_check: Any, num_classes: Any) -> list[str]:
    if not isinstance(dog_check, dict):
        return [f"manifest.json: field 'dog_check' must be an object, got {dog_check!r}"]
    if not dog_check:
        return []
    problems = []
    if not isinstance(dog_check.get("method"), str) or not dog_check["method"]:
        problems.append("manifest.json: dog_check.method must be a non-empty string")
    threshold = dog_check.get("threshold")
    if not _number(threshold) or not 0.0 <= threshold <= 1.0:
        problems.append(f"manifest.json: dog_check.threshold must be a number in [0, 1], got {threshold!r}")
    if dog_check.get("score_column") != num_classes:
        problems.append(f"manifest.json: dog_check.score_column must be num_classes ({num_classes!r}): the dog score "
                        f"is the column after the breeds, got {dog_check.get('score_column')!r}")
    return problems


def _calibration_problems(calibration: Any) -> list[str]:
    if not isinstance(calibration, dict):
        return [f"manifest.json: field 'calibration' must be an object, got {calibration!r}"]
    temperature = calibration.get("temperature", 1.0)
    if calibration and (not _number(temperature) or not temperature > 0):
        return [f"manifest.json: calibration.temperature must be a positive number, got {temperature!r}"]
    return []


def check_relpath(rel: str) -> str | None:
    """Why ``rel`` is not a safe relative posix path inside an artifact (None if it is)."""
    if not rel or "\\" in rel or rel.startswith("/"):
        return f"unsafe path {rel!r}"
    parts = PurePosixPath(rel).parts
    if any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).as_posix() != rel:
        return f"unsafe path {rel!r}"
    return None


def check_key_segments(key: str, what: str) -> None:
    """Keys become local cache paths: refuse '.', '..' and empty segments."""
    key = key.strip("/")
    if key and any(seg in ("", ".", "..") for seg in key.split("/")):
        raise ArtifactError(f"{what}: refusing path segments '.', '..' or '//' in {key!r}")


def parse_version_text(text: str | bytes, where: str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    version = text.strip()
    if not _SAFE_SEGMENT.match(version) or version == LATEST:
        raise ArtifactError(f"{where}: does not hold a valid version: {version[:80]!r}")
    return version


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what} is missing: {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} is not valid JSON ({path}): {e}") from None


def read_labels(path: Path) -> list[Label]:
    """labels.json of an artifact dir (or the file itself), checked to be indexed 0..n-1."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    data = _read_json(path, LABELS_FILE)
    if not isinstance(data, list) or not data:
        raise ArtifactError(f"{LABELS_FILE}: must be a non-empty JSON list")
    labels = [Label.from_dict(d) for d in data]
    for i, label in enumerate(labels):
        if label.index != i:
            raise ArtifactError(f"{LABELS_FILE}: entry {i} has index {label.index}; indices must be 0..n-1 in order")
    return labels


def read_manifest(path: Path) -> ArtifactManifest:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    return ArtifactManifest.from_dict(_read_json(path, MANIFEST_FILE))
