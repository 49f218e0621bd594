"""The store: an artifact reference (a local directory, a registry entry, an S3 prefix, a
``latest`` pointer) -> a verified local directory, downloading from S3 into the cache.

The cache lives under :func:`cache_root`: ``$DOGBREEDS_CACHE/artifacts`` (default
``~/.cache/dogbreeds/artifacts``), one sub-folder per bucket. ``$DOGBREEDS_CACHE`` holds one
sub-folder per kind (``artifacts``, ``features``, ``weights``), so no bucket name can land an
artifact among the trainer's features or weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from worker.artifact.contract import (
    LABELS_FILE,
    LATEST,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArtifactError,
    ArtifactManifest,
    check_key_segments,
    check_relpath,
    parse_version_text,
    read_manifest,
)
from worker.artifact.verification import sha256_file, verify_artifact
from worker.s3uri import S3Uri, is_s3_uri, s3_client

CACHE_ENV = "DOGBREEDS_CACHE"
CACHE_KIND = "artifacts"  # the sub-folder of $DOGBREEDS_CACHE that holds artifacts


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where S3 artifacts are cached: ``cache_dir`` when given, else ``$DOGBREEDS_CACHE/artifacts``,
    else ``~/.cache/dogbreeds/artifacts``."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "dogbreeds").expanduser() / CACHE_KIND


def cache_path(bucket: str, key: str, cache_dir: Path | None = None) -> Path:
    """The local copy of ``s3://bucket/key`` (an artifact version's prefix) in the cache."""
    key = key.strip("/")
    check_key_segments(key, f"s3://{bucket}/{key}")
    return cache_root(cache_dir) / bucket / key if key else cache_root(cache_dir) / bucket


Needed = Callable[[ArtifactManifest], set]  # manifest -> the files a caller will read


def resolve_artifact(uri: str, *, s3=None, cache_dir: Path | None = None, needed: Needed | None = None,
                     trust=None) -> Path:
    """Turn an artifact reference into a verified local artifact directory.

    Local: an artifact dir; a registry dir ``root/<name>`` (follows ``latest``); or
    ``root/<name>/latest``. S3: ``s3://bucket/prefix/<name>/<version>``, or
    ``s3://.../<name>`` / ``s3://.../<name>/latest`` (reads ``latest``). S3 artifacts are
    downloaded to ``<cache root>/<bucket>/<key of the version prefix>/`` where the cache
    root is ``cache_dir``, else ``$DOGBREEDS_CACHE/artifacts``, else ``~/.cache/dogbreeds/artifacts``;
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
        target = p.parent / parse_version_text(p.read_bytes(), str(p))
    elif (p / MANIFEST_FILE).is_file():
        target = p
    elif (p / LATEST).is_file():
        target = p / parse_version_text((p / LATEST).read_bytes(), str(p / LATEST))
    elif not p.exists():
        raise ArtifactError(f"no such artifact or registry path: {p}")
    else:
        raise ArtifactError(f"{p} is neither an artifact (no {MANIFEST_FILE}) nor a registry entry (no {LATEST})")
    if trust is not None:
        check_trust(trust, target, str(uri))
    verify_artifact(target)
    return target.resolve()


def check_trust(trust, path: Path, where: str):
    """The trust policy's verdict on a local artifact directory (its manifest.json + manifest.sig)."""
    manifest_bytes = read_optional(Path(path) / MANIFEST_FILE)
    if manifest_bytes is None:
        raise ArtifactError(f"{MANIFEST_FILE} is missing in {path}")
    return trust.check(manifest_bytes, read_optional(Path(path) / SIGNATURE_FILE), where)


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
    check_key_segments(key, uri)

    # A pinned version that is already cached and intact needs no network.
    if key and key.rsplit("/", 1)[-1] != LATEST:
        cached = cache_path(u.bucket, key, cache_dir)
        if (cached / MANIFEST_FILE).is_file():
            try:
                if trust is not None:
                    check_trust(trust, cached, uri)
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
        body = s3_get_bytes(s3, u.bucket, latest_key)
        if body is None:
            raise ArtifactError(f"no latest pointer at s3://{u.bucket}/{latest_key}")
        vkey = "/".join(x for x in (base, parse_version_text(body, f"s3://{u.bucket}/{latest_key}")) if x)
    else:
        # <name>/<version>/manifest.json, or else <name>/latest (a probe: without s3:ListBucket a
        # missing key answers AccessDenied, not NoSuchKey)
        manifest_bytes = s3_get_bytes(s3, u.bucket, f"{key}/{MANIFEST_FILE}" if key else MANIFEST_FILE,
                                       denied_is_missing=True)
        if manifest_bytes is not None:
            vkey = key
        else:
            latest_key = f"{key}/{LATEST}" if key else LATEST
            body = s3_get_bytes(s3, u.bucket, latest_key)
            if body is None:
                raise ArtifactError(f"no artifact at {uri}: neither {MANIFEST_FILE} nor {LATEST} found there")
            vkey = "/".join(x for x in (key, parse_version_text(body, f"s3://{u.bucket}/{latest_key}")) if x)

    if manifest_bytes is None:
        manifest_bytes = s3_get_bytes(s3, u.bucket, f"{vkey}/{MANIFEST_FILE}")
        if manifest_bytes is None:
            raise ArtifactError(f"s3://{u.bucket}/{vkey}/{MANIFEST_FILE} is missing (incomplete upload?)")
    signature = None
    if trust is not None:  # before the manifest is even parsed: a refused artifact is never downloaded
        if trust.requires_signature:
            signature = s3_get_bytes(s3, u.bucket, f"{vkey}/{SIGNATURE_FILE}", denied_is_missing=True)
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
        why = check_relpath(rel)
        if why or rel == MANIFEST_FILE:
            raise ArtifactError(f"s3://{u.bucket}/{vkey}/{MANIFEST_FILE}: {why or 'lists itself'}")

    local = cache_path(u.bucket, vkey, cache_dir)
    wanted = _wanted_files(manifest, needed)
    if (local / MANIFEST_FILE).is_file() and (local / MANIFEST_FILE).read_bytes() == manifest_bytes:
        # a cached copy of this version, maybe partial (another runtime's files): add what is absent
        absent = {rel for rel in (manifest.files if wanted is None else wanted) if not (local / rel).exists()}
        _download_into(s3, u.bucket, vkey, manifest, absent, local)
        if signature is not None and read_optional(local / SIGNATURE_FILE) != signature:
            write_bytes_atomic(local / SIGNATURE_FILE, signature)
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
        install_dir(tmp, local, only=wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def install_dir(tmp: Path, final: Path, only: set[str] | None = None) -> None:
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


def read_optional(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def s3_get_bytes(s3, bucket: str, key: str, *, denied_is_missing: bool = False) -> bytes | None:
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
