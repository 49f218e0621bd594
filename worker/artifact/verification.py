"""Verification: an artifact directory against its manifest (every file's sha256, nothing
unlisted inside the model, labels that match ``num_classes``). Who vouches for the manifest
itself (its signature) is :mod:`worker.signature`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from worker.artifact.contract import (
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    README_FILE,
    SAVED_MODEL_PB,
    ArtifactError,
    ArtifactManifest,
    check_relpath,
    read_labels,
    read_manifest,
)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> tuple[list[str], list[str]]:
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
        why = check_relpath(rel)
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
            if isinstance(rel, str) and not (check_relpath(rel) is None and (
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
        files, odd = list_files(model_root)
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
