"""The model artifact: a self-contained, checksummed model directory.

Layout (locally, and under the S3 prefix ``<prefix>/<name>/<version>/``)::

    <artifact dir>/
      model/          TF SavedModel from keras ``model.export(path)``; signature "serve":
                      float32 (batch, H, W, 3) RGB 0..255 -> probabilities (batch, num_classes)
      labels.json     [{"index": 0, "synset": "n02085620", "breed": "Chihuahua",
                        "folder": "n02085620-Chihuahua"}, ...]
      manifest.json   ArtifactManifest; ``files`` = sha256 of every other file
      README.md       model card
      plots/*.png     optional

A registry (a local directory or an S3 prefix) holds ``<name>/<version>/`` artifacts and a
``<name>/latest`` text object whose content is the current version.

This module is used by the worker and must not import ``trainer``; TensorFlow (or OpenVINO)
is imported lazily, only by :func:`load_artifact` when it loads a model of that runtime
(:mod:`worker.runtimes`). ``manifest.json`` ``runtimes`` lists the model variants: ``tf``
(``model/``, fp32, always there) and optional faster ones published beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from worker.images import DEFAULT_FIT, FITS, LEGACY_FIT
from worker.s3uri import S3Uri, is_s3_uri, s3_client

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactError",
    "ArtifactManifest",
    "Label",
    "LoadedArtifact",
    "advance_latest",
    "copy_to_local_registry",
    "load_artifact",
    "new_version",
    "resolve_artifact",
    "sha256_file",
    "upload_artifact",
    "verify_artifact",
    "write_artifact",
]

# 2: the model's output may carry a dog score column (``dog_check``) and calibrated breed
# scores (``calibration``); a schema-1 reader would take the dog score for a breed, so it must
# refuse these artifacts. Schema-1 artifacts (no dog check, temperature 1) are still served.
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

DEFAULT_INPUT_FORMAT = "float32 RGB 0..255, resized with worker.images.resize_image (fit: input_fit)"
DEFAULT_PREPROCESSING = "inside the SavedModel (feed raw 0..255 RGB)"

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SYNSET = re.compile(r"^n\d{8}$")
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact is missing, malformed or does not match its manifest.

    ``problems`` lists every individual finding (the message joins them).
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Label:
    index: int
    synset: str
    breed: str
    folder: str

    @classmethod
    def from_folder(cls, index: int, folder: str) -> "Label":
        """``"n02089078-black-and-tan_coonhound"`` -> synset ``n02089078``,
        breed ``"black-and-tan coonhound"`` (split at the first '-', '_' -> ' ')."""
        synset, sep, rest = folder.partition("-")
        if not sep or not synset or not rest:
            raise ValueError(f"not a Stanford Dogs folder name (<synset>-<Breed>): {folder!r}")
        return cls(index=int(index), synset=synset, breed=rest.replace("_", " "), folder=folder)

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


@dataclass(frozen=True)
class LoadedArtifact:
    path: Path
    manifest: ArtifactManifest
    labels: list[Label]
    predict: Callable[[np.ndarray], np.ndarray]  # float32 (n, H, W, 3) 0..255 -> (n, manifest.output_width)
    runtime: str = "tf"  # the manifest "runtimes" key serving predict (worker.runtimes)
    provenance: Any = None  # worker.signature.Provenance: manifest digest, signature verified or not


# --------------------------------------------------------------------------- helpers


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_version(now: datetime | None = None) -> str:
    """A sortable UTC timestamp version, e.g. ``20261125T210455Z``."""
    now = now or _utcnow()
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_relpath(rel: str) -> str | None:
    """Why ``rel`` is not a safe relative posix path inside an artifact (None if it is)."""
    if not rel or "\\" in rel or rel.startswith("/"):
        return f"unsafe path {rel!r}"
    parts = PurePosixPath(rel).parts
    if any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).as_posix() != rel:
        return f"unsafe path {rel!r}"
    return None


def _check_key_segments(key: str, what: str) -> None:
    """Keys become local cache paths: refuse '.', '..' and empty segments."""
    key = key.strip("/")
    if key and any(seg in ("", ".", "..") for seg in key.split("/")):
        raise ArtifactError(f"{what}: refusing path segments '.', '..' or '//' in {key!r}")


def _parse_version_text(text: str | bytes, where: str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    version = text.strip()
    if not _SAFE_SEGMENT.match(version) or version == LATEST:
        raise ArtifactError(f"{where}: does not hold a valid version: {version[:80]!r}")
    return version


def _list_files(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, symlinks/specials) under root as sorted relative posix paths."""
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in list(dirnames):
            if (d / name).is_symlink():
                odd.append((d / name).relative_to(root).as_posix())
                dirnames.remove(name)
        for name in filenames:
            p = d / name
            rel = p.relative_to(root).as_posix()
            (files if p.is_file() and not p.is_symlink() else odd).append(rel)
    return sorted(files), sorted(odd)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _install_dir(tmp: Path, final: Path, only: set[str] | None = None) -> None:
    """Move a finished directory into place, replacing whatever is there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            trash = None
    try:
        os.rename(tmp, final)
    except OSError:
        # Somebody else installed the same version concurrently: keep theirs if good.
        try:
            verify_artifact(final, only=only)
        except ArtifactError:
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


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


# --------------------------------------------------------------------------- write / verify


def write_artifact(
    dest: Path,
    *,
    model_dir: Path | None = None,
    keras_model=None,
    labels: list[Label],
    manifest_fields: dict,
    model_card: str,
    extra_files: dict[str, Path] | None = None,
) -> ArtifactManifest:
    """Write a complete artifact to ``dest`` (which must not exist, or be empty).

    Exactly one of ``model_dir`` (an existing SavedModel directory, copied) or ``keras_model``
    (exported with ``keras_model.export(dest/"model")``). ``manifest_fields`` needs ``name``,
    ``backbone`` and ``input_size`` and may give any other manifest field except ``files``;
    ``schema_version``, ``version`` (default :func:`new_version`), ``created`` (now),
    ``num_classes`` (= len(labels)) and ``runtimes`` are filled in. The artifact is assembled
    in a sibling temporary directory and renamed into place, so ``dest`` is either complete
    or absent. Returns the manifest written.
    """
    dest = Path(dest)
    if (model_dir is None) == (keras_model is None):
        raise ArtifactError("write_artifact: give exactly one of model_dir= or keras_model=")
    if not isinstance(model_card, str) or not model_card.strip():
        raise ArtifactError("write_artifact: model_card (README.md) must be a non-empty string")
    labels = list(labels)
    if not labels:
        raise ArtifactError("write_artifact: labels must not be empty")
    for i, label in enumerate(labels):
        if not isinstance(label, Label):
            raise ArtifactError(f"write_artifact: labels[{i}] is not a Label: {label!r}")
        if label.index != i:
            raise ArtifactError(f"write_artifact: labels[{i}] has index {label.index}; must be 0..n-1 in order")

    fields = dict(manifest_fields)
    if "files" in fields:
        raise ArtifactError("write_artifact: 'files' is computed, do not pass it in manifest_fields")
    unknown = set(fields) - set(ArtifactManifest._TYPES) - {"input_fit", "dog_check", "calibration"}
    if unknown:
        raise ArtifactError(f"write_artifact: unknown manifest fields {sorted(unknown)}")
    for required in ("name", "backbone", "input_size"):
        if required not in fields:
            raise ArtifactError(f"write_artifact: manifest_fields lacks {required!r}")
    if fields.setdefault("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ArtifactError(f"write_artifact: schema_version must be {SCHEMA_VERSION}")
    if fields.setdefault("num_classes", len(labels)) != len(labels):
        raise ArtifactError(
            f"write_artifact: num_classes={fields['num_classes']} but {len(labels)} labels were given"
        )
    now = _utcnow()
    fields.setdefault("version", new_version(now))
    fields.setdefault("created", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    fields.setdefault("weights", {})
    fields.setdefault("input_format", DEFAULT_INPUT_FORMAT)
    fields.setdefault("input_fit", DEFAULT_FIT)
    fields.setdefault("preprocessing", DEFAULT_PREPROCESSING)
    fields.setdefault("metrics", {})
    fields.setdefault("hyperparameters", {})
    fields.setdefault("training", {})
    fields.setdefault("runtimes", {"tf": {"path": MODEL_DIR, "precision": "fp32"}})
    fields["input_size"] = list(fields["input_size"]) if isinstance(fields["input_size"], tuple) else fields["input_size"]
    # Validate everything but files now, before the (slow) export.
    ArtifactManifest.from_dict({**fields, "files": {}})

    if keras_model is not None:
        width = len(labels) + (1 if fields.get("dog_check") else 0)
        _check_keras_model(keras_model, num_classes=width, input_size=fields["input_size"])

    extras: dict[str, Path] = {}
    for rel, src in (extra_files or {}).items():
        rel = str(rel)
        why = _check_relpath(rel)
        if why:
            raise ArtifactError(f"write_artifact: extra file {why}")
        if rel in (MANIFEST_FILE, SIGNATURE_FILE, LABELS_FILE, README_FILE) or rel == MODEL_DIR or rel.startswith(MODEL_DIR + "/"):
            raise ArtifactError(f"write_artifact: extra file {rel!r} clashes with a reserved artifact path")
        src = Path(src)
        if not src.is_file():
            raise ArtifactError(f"write_artifact: extra file source for {rel!r} is not a file: {src}")
        extras[rel] = src

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArtifactError(f"write_artifact: destination exists and is not an empty directory: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        if keras_model is not None:
            export_saved_model(keras_model, tmp / MODEL_DIR)
        else:
            model_dir = Path(model_dir)
            if not (model_dir / "saved_model.pb").is_file():
                raise ArtifactError(f"write_artifact: {model_dir} is not a SavedModel (no saved_model.pb)")
            shutil.copytree(model_dir, tmp / MODEL_DIR, symlinks=False)
        if not (tmp / SAVED_MODEL_PB).is_file():
            raise ArtifactError(f"write_artifact: export produced no {SAVED_MODEL_PB}")

        (tmp / LABELS_FILE).write_text(json.dumps([l.to_dict() for l in labels], indent=2) + "\n", encoding="utf-8")
        (tmp / README_FILE).write_text(model_card if model_card.endswith("\n") else model_card + "\n", encoding="utf-8")
        for rel, src in extras.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)

        files, odd = _list_files(tmp)
        if odd:
            raise ArtifactError(f"write_artifact: symlinks/special files are not allowed: {odd}")
        fields["files"] = {rel: sha256_file(tmp / rel) for rel in files if rel != MANIFEST_FILE}
        manifest = ArtifactManifest.from_dict(fields)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")  # last
        verify_artifact(tmp)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def export_saved_model(keras_model, path: Path) -> None:
    """Export a Keras model as a SavedModel with one signature, ``serve`` (its input named as
    the model's, one output ``output_0``), each weight stored once.

    ``keras_model.export()`` would do, but Keras 3.x's export archive saves every variable
    twice (under ``variables`` and ``_all_variables``): a VGG16 artifact then carries 117 MB of
    variables for 59 MB of weights, downloaded by every worker and held twice in memory."""
    import tensorflow as tf  # lazy: only exporting needs TensorFlow

    module = tf.Module()
    module.weights = [v.value for v in keras_model.variables]  # the tf.Variables behind them
    spec = tf.TensorSpec((None, *keras_model.input_shape[1:]), tf.float32, name=keras_model.inputs[0].name)

    @tf.function(input_signature=[spec])
    def serve(x):
        return {"output_0": keras_model(x, training=False)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={SERVE_SIGNATURE: serve})


def _check_keras_model(model, *, num_classes: int, input_size) -> None:
    """Catch label/size mismatches before exporting (best effort: skips unknown shapes)."""
    try:
        out_shape = tuple(model.output_shape)
        in_shape = tuple(model.input_shape)
    except Exception:  # noqa: BLE001 - subclassed/unbuilt models have no static shapes
        return
    if out_shape and out_shape[-1] is not None and out_shape[-1] != num_classes:
        raise ArtifactError(f"write_artifact: model outputs {out_shape[-1]} classes but {num_classes} labels were given")
    if len(in_shape) == 4 and None not in in_shape[1:3] and list(in_shape[1:3]) != list(input_size):
        raise ArtifactError(f"write_artifact: model input is {list(in_shape[1:3])} but input_size is {list(input_size)}")


def verify_artifact(path: Path, *, only: set[str] | None = None) -> ArtifactManifest:
    """Check an artifact directory against its manifest; returns the manifest.

    Every file listed in ``manifest.files`` (or, with ``only``, every one of those files: a
    partial download holding one runtime's model) must exist with the listed sha256; ``labels.json``,
    ``README.md`` and ``model/saved_model.pb`` must be listed; no unlisted file may be inside
    ``model/``; labels.json must have ``num_classes`` entries indexed 0..n-1. All findings are
    reported together in one :class:`ArtifactError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"not an artifact directory: {path}")
    if not (path / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{MANIFEST_FILE} is missing in {path}")
    manifest = read_manifest(path)

    problems: list[str] = []
    for rel in sorted(manifest.files):
        why = _check_relpath(rel)
        if why:
            problems.append(f"manifest.json files: {why}")
        elif rel == MANIFEST_FILE:
            problems.append("manifest.json files: must not list manifest.json itself")
    if problems:
        raise ArtifactError(f"artifact {path} is invalid: " + "; ".join(problems), problems)

    for required in (LABELS_FILE, README_FILE, SAVED_MODEL_PB):
        if required not in manifest.files:
            problems.append(f"manifest.json files: does not list required {required}")
    for key, spec in sorted(manifest.runtimes.items()):  # each model variant must be checksummed
        fallback = spec.get("fallback") if isinstance(spec, dict) else None
        for rel in (spec.get("path") if isinstance(spec, dict) else None,
                    fallback.get("path") if isinstance(fallback, dict) else None):
            if isinstance(rel, str) and not (_check_relpath(rel) is None and (
                    rel in manifest.files or any(f.startswith(rel + "/") for f in manifest.files))):
                problems.append(f"manifest.json runtimes: {key!r} path {rel!r} is not listed in files")

    for rel, expected in sorted(manifest.files.items()):
        if only is not None and rel not in only:
            continue
        p = path / rel
        if p.is_symlink() or (p.exists() and not p.is_file()):
            problems.append(f"{rel}: not a regular file")
        elif not p.exists():
            problems.append(f"{rel}: missing")
        else:
            actual = sha256_file(p)
            if actual != expected:
                problems.append(f"{rel}: sha256 mismatch (expected {expected}, actual {actual})")

    model_root = path / MODEL_DIR
    if model_root.is_symlink():
        problems.append(f"{MODEL_DIR}: is a symlink")
    elif model_root.is_dir():
        files, odd = _list_files(model_root)
        for rel in files:
            full = f"{MODEL_DIR}/{rel}"
            if full not in manifest.files:
                problems.append(f"{full}: not listed in manifest.json (unexpected file)")
        for rel in odd:
            problems.append(f"{MODEL_DIR}/{rel}: symlink or special file not allowed")

    if (path / LABELS_FILE).is_file() and LABELS_FILE not in {p.split(":")[0] for p in problems}:
        try:
            labels = read_labels(path / LABELS_FILE)
        except ArtifactError as e:
            problems.append(str(e))
        else:
            if len(labels) != manifest.num_classes:
                problems.append(
                    f"{LABELS_FILE}: has {len(labels)} labels but manifest.json num_classes is {manifest.num_classes}"
                )

    if problems:
        raise ArtifactError(f"artifact {path} failed verification: " + "; ".join(problems), problems)
    return manifest


# --------------------------------------------------------------------------- registries


def copy_to_local_registry(local: Path, root: Path, set_latest: bool = True) -> Path:
    """Copy a verified artifact to ``root/<name>/<version>/`` and (by default) point
    ``root/<name>/latest`` at it. Versions are immutable: an existing different artifact
    with the same name/version is an error; an identical one is left as is."""
    local = Path(local)
    manifest = verify_artifact(local)
    name_dir = Path(root) / manifest.name
    dest = name_dir / manifest.version
    manifest_bytes = (local / MANIFEST_FILE).read_bytes()

    if dest.exists() and dest.resolve() != local.resolve():
        existing = dest / MANIFEST_FILE
        if not existing.is_file() or existing.read_bytes() != manifest_bytes:
            raise ArtifactError(
                f"{dest} already exists with different content; versions are immutable, write a new version"
            )
        try:
            verify_artifact(dest)
        except ArtifactError:
            _copy_artifact_files(local, manifest, name_dir, dest, manifest_bytes)  # repair
    elif not dest.exists():
        _copy_artifact_files(local, manifest, name_dir, dest, manifest_bytes)

    signature = _read_optional(local / SIGNATURE_FILE)
    if signature is not None and _read_optional(dest / SIGNATURE_FILE) != signature:
        _write_bytes_atomic(dest / SIGNATURE_FILE, signature)  # a signature added to (or renewed on) a version
    if set_latest:
        _write_text_atomic(name_dir / LATEST, manifest.version)
    return dest


def _read_optional(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _copy_artifact_files(local: Path, manifest: ArtifactManifest, parent: Path, dest: Path, manifest_bytes: bytes) -> None:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{dest.name}.partial-{uuid.uuid4().hex}"
    try:
        for rel in sorted(manifest.files):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local / rel, tmp / rel)
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
        if (local / SIGNATURE_FILE).is_file():
            shutil.copyfile(local / SIGNATURE_FILE, tmp / SIGNATURE_FILE)
        verify_artifact(tmp)
        _install_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _s3_get_bytes(s3, bucket: str, key: str, *, denied_is_missing: bool = False) -> bytes | None:
    """Object body, or None when the object (or bucket) does not exist. ``denied_is_missing``:
    also None on AccessDenied, which S3 answers for a missing key when the caller may not
    s3:ListBucket (for probes whose fallback is another key)."""
    from botocore.exceptions import ClientError

    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound") or (denied_is_missing and code in ("AccessDenied", "403")):
            return None
        raise


def upload_artifact(local: Path, uri: str, *, s3=None, set_latest: bool = True) -> str:
    """Upload a verified artifact to ``<uri>/<name>/<version>/``, then move ``<uri>/<name>/latest``
    forward to it. Returns ``s3://bucket/<prefix>/<name>/<version>``.

    The files go first, then ``manifest.sig`` (when the artifact is signed), then ``manifest.json``
    with a conditional PUT (``If-None-Match: *``): a visible manifest means a complete upload, and
    a version, once published, is never replaced (a publisher racing another one with the same
    version and different content gets an ArtifactError; the same content is accepted).
    ``latest`` only moves forward (:func:`advance_latest`)."""
    from botocore.exceptions import ClientError

    local = Path(local)
    manifest = verify_artifact(local)
    base = S3Uri.parse(uri)
    _check_key_segments(base.key, uri)
    dest = base.join(manifest.name, manifest.version)
    s3 = s3 or s3_client()
    manifest_bytes = (local / MANIFEST_FILE).read_bytes()
    manifest_key = f"{dest.key}/{MANIFEST_FILE}"

    def refuse_if_different(existing: bytes | None) -> None:
        if existing is not None and existing != manifest_bytes:
            raise ArtifactError(f"{dest} already exists with different content; versions are immutable")

    refuse_if_different(_s3_get_bytes(s3, dest.bucket, manifest_key))
    for rel in sorted(manifest.files):
        s3.upload_file(str(local / rel), dest.bucket, f"{dest.key}/{rel}")
    signature = _read_optional(local / SIGNATURE_FILE)
    if signature is not None:
        s3.put_object(Bucket=dest.bucket, Key=f"{dest.key}/{SIGNATURE_FILE}", Body=signature,
                      ContentType="application/json")
    try:
        s3.put_object(Bucket=dest.bucket, Key=manifest_key, Body=manifest_bytes, ContentType="application/json",
                      IfNoneMatch="*")
    except ClientError as error:
        if _error_code(error) not in _CONDITION_FAILED:
            raise
        refuse_if_different(_s3_get_bytes(s3, dest.bucket, manifest_key))  # published meanwhile: the same?
    if set_latest:
        advance_latest(s3, dest.bucket, base.join(manifest.name, LATEST).key, manifest.version)
    return str(dest)


_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def version_order(version: str) -> tuple:
    """Sort key of versions: digit runs compare as numbers (``v9`` < ``v10``); the default
    UTC timestamp versions (``20261125T210455Z``) sort by time."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version) if part)


def advance_latest(s3, bucket: str, key: str, version: str, *, attempts: int = 20) -> str:
    """Point ``s3://bucket/key`` (a ``latest`` object) at ``version`` unless it already names a
    newer one (:func:`version_order`), so that ``latest`` never moves back when publishers race.
    Each write is conditional on what was read (``If-Match`` on its ETag, or ``If-None-Match: *``
    when there was none); a write that loses a race reads again. Returns the version ``latest``
    names afterwards."""
    from botocore.exceptions import ClientError

    for _ in range(attempts):
        try:
            answer = s3.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _error_code(error) not in ("NoSuchKey", "404", "NotFound"):
                raise
            current, condition = None, {"IfNoneMatch": "*"}
        else:
            body = answer["Body"].read()
            try:
                current = _parse_version_text(body, f"s3://{bucket}/{key}")
            except ArtifactError:
                current = None  # not a version: replace it (still conditionally)
            condition = {"IfMatch": answer["ETag"]}
        if current is not None and version_order(current) >= version_order(version):
            return current
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=version.encode("utf-8"), ContentType="text/plain", **condition)
            return version
        except ClientError as error:
            if _error_code(error) not in _CONDITION_FAILED + ("NoSuchKey",):
                raise
    raise ArtifactError(f"s3://{bucket}/{key} kept changing while {version} was published; run publish again")


# --------------------------------------------------------------------------- resolve / load


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DOGBREEDS_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "dogbreeds" / "artifacts"


Needed = Callable[[ArtifactManifest], set]  # manifest -> the files a caller will read


def resolve_artifact(uri: str, *, s3=None, cache_dir: Path | None = None, needed: Needed | None = None,
                     trust=None) -> Path:
    """Turn an artifact reference into a verified local artifact directory.

    Local: an artifact dir; a registry dir ``root/<name>`` (follows ``latest``); or
    ``root/<name>/latest``. S3: ``s3://bucket/prefix/<name>/<version>``, or
    ``s3://.../<name>`` / ``s3://.../<name>/latest`` (reads ``latest``). S3 artifacts are
    downloaded to ``<cache root>/<bucket>/<key of the version prefix>/`` where the cache
    root is ``cache_dir``, else ``$DOGBREEDS_CACHE``, else ``~/.cache/dogbreeds/artifacts``;
    a cached copy that verifies is reused (a pinned version then needs no S3 call at all),
    anything else is downloaded afresh. The returned directory has always passed
    :func:`verify_artifact`.

    ``needed(manifest)`` (S3 only) names the files the caller will read, e.g. one runtime's
    model (see :func:`load_artifact`): only those and ``labels.json`` are downloaded and
    verified, and a later call needing more files adds them to the same cached copy, each
    checked against its sha256 before it is moved into place.

    ``trust`` (a :class:`worker.signature.TrustPolicy`) checks the bytes of ``manifest.json``
    (its signature, ``manifest.sig``, against the worker's trusted key; its pinned digest) before
    anything else of the artifact is read or downloaded; a refusal raises its SignatureError.
    """
    if is_s3_uri(uri):
        return _resolve_s3(uri, s3=s3, cache_dir=cache_dir, needed=needed, trust=trust)
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    p = Path(text).expanduser()
    if p.name == LATEST and p.is_file():
        target = p.parent / _parse_version_text(p.read_bytes(), str(p))
    elif (p / MANIFEST_FILE).is_file():
        target = p
    elif (p / LATEST).is_file():
        target = p / _parse_version_text((p / LATEST).read_bytes(), str(p / LATEST))
    elif not p.exists():
        raise ArtifactError(f"no such artifact or registry path: {p}")
    else:
        raise ArtifactError(f"{p} is neither an artifact (no {MANIFEST_FILE}) nor a registry entry (no {LATEST})")
    if trust is not None:
        _check_trust(trust, target, str(uri))
    verify_artifact(target)
    return target.resolve()


def _check_trust(trust, path: Path, where: str):
    """The trust policy's verdict on a local artifact directory (its manifest.json + manifest.sig)."""
    manifest_bytes = _read_optional(Path(path) / MANIFEST_FILE)
    if manifest_bytes is None:
        raise ArtifactError(f"{MANIFEST_FILE} is missing in {path}")
    return trust.check(manifest_bytes, _read_optional(Path(path) / SIGNATURE_FILE), where)


def _wanted_files(manifest: ArtifactManifest, needed: Needed | None) -> set[str] | None:
    """The files to download and verify: None (all of them), or ``needed``'s and labels.json."""
    if needed is None:
        return None
    return {rel for rel in set(needed(manifest)) | {LABELS_FILE} if rel in manifest.files}


def _download_into(s3, bucket: str, vkey: str, manifest: ArtifactManifest, rels, dest: Path) -> None:
    """Add files to a cached artifact: each downloaded beside its place, checked against its
    sha256, then renamed into place (a reader never sees a partial or wrong file)."""
    for rel in sorted(rels):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
        try:
            s3.download_file(bucket, f"{vkey}/{rel}", str(part))
            actual = sha256_file(part)
            if actual != manifest.files[rel]:
                raise ArtifactError(f"s3://{bucket}/{vkey}/{rel}: sha256 mismatch (expected {manifest.files[rel]}, "
                                    f"actual {actual})")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)


def _resolve_s3(uri: str, *, s3, cache_dir: Path | None, needed: Needed | None = None, trust=None) -> Path:
    u = S3Uri.parse(uri)
    key = u.key.strip("/")
    _check_key_segments(key, uri)
    bucket_root = _cache_root(cache_dir) / u.bucket

    # A pinned version that is already cached and intact needs no network.
    if key and key.rsplit("/", 1)[-1] != LATEST:
        cached = bucket_root / key
        if (cached / MANIFEST_FILE).is_file():
            try:
                if trust is not None:
                    _check_trust(trust, cached, uri)
                m = verify_artifact(cached, only=_wanted_files(read_manifest(cached), needed))
            except ArtifactError:
                pass
            else:
                if key == f"{m.name}/{m.version}" or key.endswith(f"/{m.name}/{m.version}"):
                    return cached

    s3 = s3 or s3_client()
    manifest_bytes = None
    if key.rsplit("/", 1)[-1] == LATEST:
        latest_key, base = key, key.rsplit("/", 1)[0] if "/" in key else ""
        body = _s3_get_bytes(s3, u.bucket, latest_key)
        if body is None:
            raise ArtifactError(f"no latest pointer at s3://{u.bucket}/{latest_key}")
        vkey = "/".join(x for x in (base, _parse_version_text(body, f"s3://{u.bucket}/{latest_key}")) if x)
    else:
        # <name>/<version>/manifest.json, or else <name>/latest (a probe: without s3:ListBucket a
        # missing key answers AccessDenied, not NoSuchKey)
        manifest_bytes = _s3_get_bytes(s3, u.bucket, f"{key}/{MANIFEST_FILE}" if key else MANIFEST_FILE,
                                       denied_is_missing=True)
        if manifest_bytes is not None:
            vkey = key
        else:
            latest_key = f"{key}/{LATEST}" if key else LATEST
            body = _s3_get_bytes(s3, u.bucket, latest_key)
            if body is None:
                raise ArtifactError(f"no artifact at {uri}: neither {MANIFEST_FILE} nor {LATEST} found there")
            vkey = "/".join(x for x in (key, _parse_version_text(body, f"s3://{u.bucket}/{latest_key}")) if x)

    if manifest_bytes is None:
        manifest_bytes = _s3_get_bytes(s3, u.bucket, f"{vkey}/{MANIFEST_FILE}")
        if manifest_bytes is None:
            raise ArtifactError(f"s3://{u.bucket}/{vkey}/{MANIFEST_FILE} is missing (incomplete upload?)")
    signature = None
    if trust is not None:  # before the manifest is even parsed: a refused artifact is never downloaded
        if trust.requires_signature:
            signature = _s3_get_bytes(s3, u.bucket, f"{vkey}/{SIGNATURE_FILE}", denied_is_missing=True)
        trust.check(manifest_bytes, signature, f"s3://{u.bucket}/{vkey}")
    try:
        manifest = ArtifactManifest.from_dict(json.loads(manifest_bytes))
    except ValueError as e:
        raise ArtifactError(f"s3://{u.bucket}/{vkey}/{MANIFEST_FILE} is not valid JSON: {e}") from None
    if not (vkey == f"{manifest.name}/{manifest.version}" or vkey.endswith(f"/{manifest.name}/{manifest.version}")):
        raise ArtifactError(
            f"s3://{u.bucket}/{vkey} holds {manifest.name}/{manifest.version}; "
            "artifacts must live under <prefix>/<name>/<version>/"
        )
    for rel in manifest.files:
        why = _check_relpath(rel)
        if why or rel == MANIFEST_FILE:
            raise ArtifactError(f"s3://{u.bucket}/{vkey}/{MANIFEST_FILE}: {why or 'lists itself'}")

    local = bucket_root / vkey
    wanted = _wanted_files(manifest, needed)
    if (local / MANIFEST_FILE).is_file() and (local / MANIFEST_FILE).read_bytes() == manifest_bytes:
        # a cached copy of this version, maybe partial (another runtime's files): add what is absent
        absent = {rel for rel in (manifest.files if wanted is None else wanted) if not (local / rel).exists()}
        _download_into(s3, u.bucket, vkey, manifest, absent, local)
        if signature is not None and _read_optional(local / SIGNATURE_FILE) != signature:
            _write_bytes_atomic(local / SIGNATURE_FILE, signature)
        try:
            verify_artifact(local, only=wanted)
            return local
        except ArtifactError:
            pass  # damaged cache: download again

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.partial-{uuid.uuid4().hex}"
    try:
        for rel in sorted(manifest.files if wanted is None else wanted):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(u.bucket, f"{vkey}/{rel}", str(tmp / rel))
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
        if signature is not None:
            (tmp / SIGNATURE_FILE).write_bytes(signature)
        verify_artifact(tmp, only=wanted)
        _install_dir(tmp, local, only=wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


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
    from worker import runtimes, signature  # both import this module

    trust = signature.TrustPolicy.from_env() if trust is None else trust

    def needed(manifest: ArtifactManifest) -> set[str]:  # from S3, only the chosen runtime's model
        return runtimes.files_of(runtimes.select(manifest.runtimes, runtime), manifest.files)

    path = resolve_artifact(uri, s3=s3, cache_dir=cache_dir, needed=needed, trust=trust)
    manifest_bytes = (Path(path) / MANIFEST_FILE).read_bytes()
    provenance = trust.check(manifest_bytes, _read_optional(Path(path) / SIGNATURE_FILE), str(uri))
    manifest = ArtifactManifest.from_dict(json.loads(manifest_bytes))  # the bytes just vouched for
    labels = read_labels(path)
    entry = runtimes.select(manifest.runtimes, runtime)
    predict = runtimes.load(path, entry, input_size=manifest.input_size, num_classes=manifest.num_classes,
                            outputs=manifest.output_width)
    return LoadedArtifact(path=Path(path), manifest=manifest, labels=labels, predict=predict, runtime=entry.key,
                          provenance=provenance)
