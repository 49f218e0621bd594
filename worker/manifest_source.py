"""Manifests back in: find the manifests under a SOURCE and read their items one manifest at a
time (``report`` and ``export`` share this).

A SOURCE is

* ``s3://bucket/prefix/``: every ``*.json`` / ``*.jsonl`` object under the prefix (paginated
  listing; ``s3://bucket/prefix`` lists ``prefix/``), or ``s3://bucket/key.json`` for one;
* a local folder: every ``*.json`` / ``*.jsonl`` file under it (recursively), sorted;
* one local file.

A manifest is the JSON document :mod:`worker.manifests` writes (``schema_version``, ``job_id``,
``model``, ``items``) or its JSON Lines form (one item per line, each with ``job_id``). Items
are read as plain dicts, not through :class:`worker.manifests.ItemResult`, so fields that newer
workers add (``dog_score``, the ``no_dog`` / ``uncertain`` statuses, anything unknown) pass
through. The job-level lines of a JSON Lines manifest (a split prefix job's ``continuation``
pages, a job ``error``) are not items: skipped (the pages' own manifests hold their items). A file that is not a manifest (another JSON file in the folder, a broken upload) is
recorded as a :class:`ManifestProblem` and skipped, never a crash.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from botocore.exceptions import BotoCoreError, ClientError

from worker.s3uri import S3Uri

__all__ = [
    "KNOWN_STATUSES",
    "MANIFEST_SUFFIXES",
    "ManifestError",
    "ManifestItem",
    "ManifestProblem",
    "ManifestSource",
    "TopGuess",
    "parse_manifest",
]

#: Statuses a worker writes today or soon; any other status is shown as it is.
KNOWN_STATUSES = ("ok", "error", "no_dog", "uncertain")
MANIFEST_SUFFIXES = (".json", ".jsonl")


class ManifestError(ValueError):
    """A file under SOURCE that cannot be read as a manifest."""


@dataclass(frozen=True)
class ManifestProblem:
    location: str
    reason: str


@dataclass(frozen=True)
class TopGuess:
    breed: str | None
    synset: str | None
    score: float | None


@dataclass(frozen=True)
class ManifestItem:
    """One photo's outcome as a manifest recorded it, with where that manifest is."""

    manifest: str  # s3://bucket/key or a local path
    job_id: str | None
    model_name: str | None
    model_version: str | None
    model_runtime: str | None
    bucket: str  # an S3 bucket, or the folder a local `classify` read (photo_is_local)
    key: str
    etag: str | None
    version_id: str | None
    status: str
    error_code: str | None
    error_message: str | None
    breed: str | None
    synset: str | None
    score: float | None
    dog_score: float | None
    top_k: tuple[TopGuess, ...]
    photo_is_local: bool

    @property
    def photo_uri(self) -> str:
        """Where the photo is: a local path or ``s3://bucket/key``."""
        return str(Path(self.bucket) / self.key) if self.photo_is_local else f"s3://{self.bucket}/{self.key}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _top_k(value: Any) -> tuple[TopGuess, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(TopGuess(_text(t.get("breed")), _text(t.get("synset")), _number(t.get("score")))
                 for t in value if isinstance(t, dict))


def _looks_local(bucket: str) -> bool:
    # S3 bucket names never hold a slash; `classify` of a local folder records the folder as the bucket.
    return "/" in bucket or "\\" in bucket or bucket in (".", "..")


def _item(raw: Any, location: str, job_id: Any, model: Any, local_source: bool) -> ManifestItem:
    if not isinstance(raw, dict):
        raise ManifestError(f"an item is a {type(raw).__name__}, not an object")
    bucket, key = raw.get("bucket"), raw.get("key")
    if not isinstance(bucket, str) or not isinstance(key, str):
        raise ManifestError("an item has no bucket/key strings")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else model
    model = model if isinstance(model, dict) else {}
    status = raw.get("status")
    return ManifestItem(
        manifest=location,
        job_id=_text(raw.get("job_id", job_id)),
        model_name=_text(model.get("name")),
        model_version=_text(model.get("version")),
        model_runtime=_text(model.get("runtime")),
        bucket=bucket,
        key=key,
        etag=_text(raw.get("etag")),
        version_id=_text(raw.get("version_id")),
        status=status if isinstance(status, str) and status else "unknown",
        error_code=_text(raw.get("error_code")),
        error_message=_text(raw.get("error_message")),
        breed=_text(raw.get("breed")),
        synset=_text(raw.get("synset")),
        score=_number(raw.get("score")),
        dog_score=_number(raw.get("dog_score")),
        top_k=_top_k(raw.get("top_k")),
        photo_is_local=local_source or _looks_local(bucket),
    )


def parse_manifest(text: str | bytes, location: str) -> list[ManifestItem]:
    """The items of one manifest (JSON document or JSON Lines); ``ManifestError`` if it is not one."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ManifestError(f"not UTF-8 text ({error.reason})") from error
    try:
        document = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        document = None  # JSON Lines (more than one value), or not JSON at all
    if isinstance(document, dict) and "items" in document:
        if not isinstance(document["items"], list):
            raise ManifestError("'items' is not a list")
        local = document.get("source") == "local-folder"
        return [_item(raw, location, document.get("job_id"), document.get("model"), local)
                for raw in document["items"]]
    if isinstance(document, dict) and "bucket" in document and "key" in document:
        return [_item(document, location, None, None, False)]  # JSON Lines with a single item
    if _job_level(document):
        return []  # JSON Lines with a single job-level line
    if document is not None:
        raise ManifestError("JSON, but not a manifest (no 'items')")
    items = []
    # split on "\n" only: str.splitlines() also splits at U+2028 & co, which JSON may hold raw in a key
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"line {number} is not JSON ({error.msg})") from error
        if not _job_level(raw):
            items.append(_item(raw, location, None, None, False))
    return items


def _job_level(line: Any) -> bool:
    """A JSON Lines line about the job, not an item: ``{"job_id", "continuation": {...}}`` or
    ``{"job_id", "error": {...}}`` (manifest schema 2)."""
    return isinstance(line, dict) and "key" not in line and ("continuation" in line or "error" in line)


class ManifestSource:
    """The manifests named by a SOURCE (see the module docstring); ``s3`` is only needed for
    ``s3://`` sources."""

    def __init__(self, source: str, s3: Any = None, *, page_size: int = 1000):
        self.source = source
        self.s3 = s3
        self.page_size = page_size  # keys per ListObjectsV2 page
        self.problems: list[ManifestProblem] = []

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")

    def locations(self) -> list[str]:
        """Every manifest's location, sorted; ``FileNotFoundError`` when SOURCE names nothing."""
        if self.is_s3:
            uri = S3Uri.parse(self.source)
            if uri.key.endswith(MANIFEST_SUFFIXES):
                return [str(uri)]
            keys = []
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=uri.bucket, Prefix=uri.prefix, PaginationConfig={"PageSize": self.page_size})
            for page in pages:
                keys += [obj["Key"] for obj in page.get("Contents", []) if obj["Key"].endswith(MANIFEST_SUFFIXES)]
            return [f"s3://{uri.bucket}/{key}" for key in sorted(keys)]
        path = Path(self.source)
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
        if path.is_file():
            return [str(path)]
        raise FileNotFoundError(f"{self.source}: no such folder or file")

    def read(self, location: str) -> list[ManifestItem]:
        """The items of the manifest at ``location``; a problem is recorded and [] returned
        when it cannot be read or is not a manifest."""
        try:
            if location.startswith("s3://"):
                uri = S3Uri.parse(location)
                body = self.s3.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
            else:
                body = Path(location).read_bytes()
            return parse_manifest(body, location)
        except ManifestError as error:
            self.problems.append(ManifestProblem(location, str(error)))
        except (OSError, ClientError, BotoCoreError) as error:
            self.problems.append(ManifestProblem(location, f"unreadable: {error}"))
        return []

    def items(self) -> Iterator[ManifestItem]:
        for location in self.locations():
            yield from self.read(location)
