"""Publishing artifacts to a registry: a local directory or an S3 prefix holding
``<name>/<version>/`` and a ``<name>/latest`` pointer.

Versions are immutable (on S3 the manifest goes last, with a conditional PUT) and ``latest``
only moves forward when publishers race (:func:`advance_latest`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from worker.artifact.contract import (
    LATEST,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArtifactError,
    ArtifactManifest,
    check_key_segments,
    parse_version_text,
)
from worker.artifact.store import install_dir, read_optional, s3_get_bytes, write_bytes_atomic
from worker.artifact.verification import verify_artifact
from worker.s3uri import S3Uri, s3_client

__all__ = ["advance_latest", "copy_to_local_registry", "upload_artifact", "version_order"]


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

    signature = read_optional(local / SIGNATURE_FILE)
    if signature is not None and read_optional(dest / SIGNATURE_FILE) != signature:
        write_bytes_atomic(dest / SIGNATURE_FILE, signature)  # a signature added to (or renewed on) a version
    if set_latest:
        _write_text_atomic(name_dir / LATEST, manifest.version)
    return dest


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
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
        install_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    check_key_segments(base.key, uri)
    dest = base.join(manifest.name, manifest.version)
    s3 = s3 or s3_client()
    manifest_bytes = (local / MANIFEST_FILE).read_bytes()
    manifest_key = f"{dest.key}/{MANIFEST_FILE}"

    def refuse_if_different(existing: bytes | None) -> None:
        if existing is not None and existing != manifest_bytes:
            raise ArtifactError(f"{dest} already exists with different content; versions are immutable")

    refuse_if_different(s3_get_bytes(s3, dest.bucket, manifest_key))
    for rel in sorted(manifest.files):
        s3.upload_file(str(local / rel), dest.bucket, f"{dest.key}/{rel}")
    signature = read_optional(local / SIGNATURE_FILE)
    if signature is not None:
        s3.put_object(Bucket=dest.bucket, Key=f"{dest.key}/{SIGNATURE_FILE}", Body=signature,
                      ContentType="application/json")
    try:
        s3.put_object(Bucket=dest.bucket, Key=manifest_key, Body=manifest_bytes, ContentType="application/json",
                      IfNoneMatch="*")
    except ClientError as error:
        if _error_code(error) not in _CONDITION_FAILED:
            raise
        refuse_if_different(s3_get_bytes(s3, dest.bucket, manifest_key))  # published meanwhile: the same?
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
                current = parse_version_text(body, f"s3://{bucket}/{key}")
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
