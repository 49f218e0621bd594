"""Writing an artifact: a Keras model (or an exported SavedModel), its labels and manifest
fields -> a complete, checksummed artifact directory (:mod:`worker.artifact.contract` says
what one is; the worker only reads them).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from worker.artifact.contract import (
    LABELS_FILE,
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
    check_relpath,
)
from worker.artifact.verification import list_files, sha256_file, verify_artifact
from worker.images import DEFAULT_FIT

__all__ = ["check_keras_model", "export_saved_model", "label_from_folder", "new_version", "write_artifact"]

DEFAULT_INPUT_FORMAT = "float32 RGB 0..255, resized with worker.images.resize_image (fit: input_fit)"
DEFAULT_PREPROCESSING = "inside the SavedModel (feed raw 0..255 RGB)"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_version(now: datetime | None = None) -> str:
    """A sortable UTC timestamp version, e.g. ``20261125T210455Z``."""
    now = now or _utcnow()
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


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
        check_keras_model(keras_model, num_classes=width, input_size=fields["input_size"])

    extras: dict[str, Path] = {}
    for rel, src in (extra_files or {}).items():
        rel = str(rel)
        why = check_relpath(rel)
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

        files, odd = list_files(tmp)
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


def check_keras_model(model, *, num_classes: int, input_size) -> None:
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


def label_from_folder(index: int, folder: str) -> Label:
    """``"n02089078-black-and-tan_coonhound"`` -> synset ``n02089078``,
    breed ``"black-and-tan coonhound"`` (split at the first '-', '_' -> ' ')."""
    synset, sep, rest = folder.partition("-")
    if not sep or not synset or not rest:
        raise ValueError(f"not a Stanford Dogs folder name (<synset>-<Breed>): {folder!r}")
    return Label(index=int(index), synset=synset, breed=rest.replace("_", " "), folder=folder)
