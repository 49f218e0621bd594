"""Classification results -> JSON manifest documents at deterministic keys.

One manifest is written per job, at ``manifest_key(output_prefix, job_id)``
(``<output_prefix>/<job_id>.json``, or ``.jsonl`` for the optional JSON Lines
form), with a single ``PutObject``.

Determinism decision
--------------------
The requirement is "same input -> same key and same content: a redelivered
message overwrites, never duplicates". The key is a pure function of the output
prefix and the job id (which, for S3 events, is itself derived from the message
content). For the *content* to be identical as well, the document written to S3
holds **no wall-clock values**: no timestamps and, by default, no timings.
:class:`ItemResult` keeps its ``timings_ms`` for in-process use (logs and
metrics report them); they are serialised only when explicitly requested with
``include_timings=True`` (on :func:`build_manifest` or ``Manifest.to_json``),
which gives up byte-identical redeliveries. This is why ``include_timings``
defaults to ``False``.

Serialisation is canonical: ``sort_keys=True``, separators ``(",", ":")``,
UTF-8 (``ensure_ascii=False``), items sorted by ``(bucket, key, version_id,
etag)``, scores rounded to 6 decimals and timings to 3, ``-0.0`` written as
``0.0``. Non-finite floats are rejected (``ValueError``) rather than written as
invalid JSON. ``top_k`` keeps the order given by the model (best first).

Schema versions
---------------
``2`` (written now) adds two job-level fields to ``1``: ``continuations`` (the pages a prefix
job too long for one message was split into, see :mod:`worker.continuations`; ``[]`` otherwise)
and ``error`` (a job that can produce no items at all, e.g. ``too_many_objects``; ``null``
otherwise). A version-1 reader would take a split prefix job's empty ``items`` for an empty
prefix, hence the new number. ``3`` adds the model's verdicts to ``2``: item statuses
``no_dog`` (the model's dog check found no dog) and ``uncertain`` (best breed score below
``--min-score``), both with ``breed``/``synset``/``score`` null and ``top_k`` kept as a hint; an
item ``dog_score`` (null for errors and for models without a dog check); ``counts`` lists all
four statuses. A version-2 reader would not know the new statuses, hence the new number.
:func:`read_manifest` reads all three versions (a version-1 document has no pages and no error;
a version-1 or -2 document has no ``dog_score`` and only ``ok``/``error`` items).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from worker.messages import is_safe_job_id

__all__ = [
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_JSONL",
    "Continuation",
    "ItemResult",
    "JobError",
    "MANIFEST_SCHEMA_VERSION",
    "Manifest",
    "TopK",
    "build_manifest",
    "manifest_key",
    "read_manifest",
    "write_manifest",
]

MANIFEST_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_JSONL = "application/x-ndjson"

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_NO_DOG = "no_dog"  # the model's dog check found no dog: breed fields null, top_k a hint
STATUS_UNCERTAIN = "uncertain"  # best breed score below --min-score: breed fields null, top_k for review
_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_NO_DOG, STATUS_UNCERTAIN)
_CLASSIFIED = (STATUS_OK, STATUS_NO_DOG, STATUS_UNCERTAIN)

SCORE_DECIMALS = 6
TIMING_DECIMALS = 3


def _num(value: float | None, decimals: int, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return round(value, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass
class TopK:
    synset: str
    breed: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "synset": self.synset,
            "breed": self.breed,
            "score": _num(self.score, SCORE_DECIMALS, "top_k score"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TopK":
        return cls(synset=d["synset"], breed=d["breed"], score=d["score"])


@dataclass
class ItemResult:
    """The outcome for one image: ``status`` ``"ok"`` (``breed``, ``synset``, ``score`` name the
    answer), ``"no_dog"`` or ``"uncertain"`` (those three are null; ``top_k`` is a hint for a
    human) or ``"error"`` (``error_code``, ``error_message``). ``dog_score`` is the model's dog
    score for every classified photo when the model has a dog check, else null."""

    bucket: str
    key: str
    etag: str | None
    version_id: str | None
    status: str
    error_code: str | None = None
    error_message: str | None = None
    breed: str | None = None
    synset: str | None = None
    score: float | None = None
    top_k: list[TopK] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    dog_score: float | None = None

    @classmethod
    def classified(cls, bucket: str, key: str, *, status: str, top_k: Iterable[TopK], dog_score: float | None = None,
                   etag: str | None = None, version_id: str | None = None,
                   timings_ms: dict[str, float] | None = None) -> "ItemResult":
        """A photo the model answered: ``ok`` names its best breed; ``no_dog`` and ``uncertain``
        keep ``breed``/``synset``/``score`` null and the top-k as a hint."""
        if status not in _CLASSIFIED:
            raise ValueError(f"a classified item's status is one of {_CLASSIFIED}, got {status!r}")
        top_k = list(top_k)
        if status == STATUS_OK and not top_k:
            raise ValueError("an ok item needs its top-k breeds")
        best = top_k[0] if status == STATUS_OK else None
        return cls(bucket=bucket, key=key, etag=etag, version_id=version_id, status=status,
                   breed=best.breed if best else None, synset=best.synset if best else None,
                   score=best.score if best else None, top_k=top_k, timings_ms=dict(timings_ms or {}),
                   dog_score=dog_score)

    @classmethod
    def success(
        cls,
        bucket: str,
        key: str,
        *,
        breed: str,
        synset: str,
        score: float,
        top_k: Iterable[TopK] = (),
        etag: str | None = None,
        version_id: str | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> "ItemResult":
        return cls(
            bucket=bucket, key=key, etag=etag, version_id=version_id, status=STATUS_OK,
            breed=breed, synset=synset, score=score, top_k=list(top_k),
            timings_ms=dict(timings_ms or {}),
        )

    @classmethod
    def failure(
        cls,
        bucket: str,
        key: str,
        *,
        error_code: str,
        error_message: str,
        etag: str | None = None,
        version_id: str | None = None,
        timings_ms: dict[str, float] | None = None,
    ) -> "ItemResult":
        return cls(
            bucket=bucket, key=key, etag=etag, version_id=version_id, status=STATUS_ERROR,
            error_code=error_code, error_message=error_message,
            timings_ms=dict(timings_ms or {}),
        )

    def sort_key(self) -> tuple[str, str, str, str]:
        return (self.bucket, self.key, self.version_id or "", self.etag or "")

    def to_dict(self, *, include_timings: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bucket": self.bucket,
            "key": self.key,
            "etag": self.etag,
            "version_id": self.version_id,
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "breed": self.breed,
            "synset": self.synset,
            "score": _num(self.score, SCORE_DECIMALS, "score"),
            "top_k": [t.to_dict() for t in self.top_k],
            "dog_score": _num(self.dog_score, SCORE_DECIMALS, "dog_score"),
        }
        if include_timings:
            d["timings_ms"] = {
                str(k): _num(v, TIMING_DECIMALS, f"timings_ms[{k!r}]")
                for k, v in self.timings_ms.items()
            }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ItemResult":
        return cls(
            bucket=d["bucket"],
            key=d["key"],
            etag=d.get("etag"),
            version_id=d.get("version_id"),
            status=d["status"],
            error_code=d.get("error_code"),
            error_message=d.get("error_message"),
            breed=d.get("breed"),
            synset=d.get("synset"),
            score=d.get("score"),
            top_k=[TopK.from_dict(t) for t in d.get("top_k") or []],
            timings_ms=dict(d.get("timings_ms") or {}),
            dog_score=d.get("dog_score"),
        )


@dataclass(frozen=True)
class Continuation:
    """A page a prefix job was split into: its job id, where its manifest goes, how many photos
    it holds and the first and last of its keys (the pages run through the sorted listing)."""

    job_id: str
    manifest: str  # s3://bucket/key
    photos: int
    first_key: str
    last_key: str

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "manifest": self.manifest, "photos": self.photos,
                "first_key": self.first_key, "last_key": self.last_key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Continuation":
        return cls(d["job_id"], d["manifest"], d["photos"], d["first_key"], d["last_key"])


@dataclass(frozen=True)
class JobError:
    """Why a job has no items at all (a machine-readable code and a message)."""

    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


@dataclass
class Manifest:
    """The document written for one job.

    ``include_timings`` is not part of the document; it only decides whether
    per-item timings are serialised (default: no, see the module docstring).
    """

    schema_version: int
    job_id: str
    source: str
    model: dict[str, Any]
    items: list[ItemResult]
    counts: dict[str, int]
    include_timings: bool = False
    continuations: list[Continuation] = field(default_factory=list)
    error: JobError | None = None

    def sorted_items(self) -> list[ItemResult]:
        return sorted(self.items, key=ItemResult.sort_key)

    def to_dict(self, *, include_timings: bool | None = None) -> dict[str, Any]:
        timings = self.include_timings if include_timings is None else include_timings
        return {
            "schema_version": self.schema_version,
            "job_id": self.job_id,
            "source": self.source,
            "model": self.model,
            "counts": self.counts,
            "items": [it.to_dict(include_timings=timings) for it in self.sorted_items()],
            "continuations": [c.to_dict() for c in self.continuations],
            "error": None if self.error is None else self.error.to_dict(),
        }

    def to_json(self, *, include_timings: bool | None = None) -> str:
        """The canonical JSON document (same manifest -> identical text)."""
        return _dumps(self.to_dict(include_timings=include_timings))

    def to_jsonl(self, *, include_timings: bool | None = None) -> str:
        """JSON Lines: one item per line (each line also carries ``job_id``), then one line per
        continuation page (``{"job_id", "continuation": {...}}``) and the job's error, if any
        (``{"job_id", "error": {...}}``); newline-terminated; an empty manifest gives ``""``."""
        timings = self.include_timings if include_timings is None else include_timings
        lines = []
        for it in self.sorted_items():
            d = it.to_dict(include_timings=timings)
            d["job_id"] = self.job_id
            lines.append(_dumps(d) + "\n")
        lines += [_dumps({"job_id": self.job_id, "continuation": c.to_dict()}) + "\n" for c in self.continuations]
        if self.error is not None:
            lines.append(_dumps({"job_id": self.job_id, "error": self.error.to_dict()}) + "\n")
        return "".join(lines)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
            raise ValueError(f"unsupported manifest schema_version {version!r}")
        items = [ItemResult.from_dict(it) for it in d.get("items") or []]
        return cls(
            schema_version=version,
            job_id=d["job_id"],
            source=d["source"],
            model=dict(d.get("model") or {}),
            items=items,
            counts=dict(d.get("counts") or {}),
            include_timings=any("timings_ms" in it for it in d.get("items") or []),
            continuations=[Continuation.from_dict(c) for c in d.get("continuations") or []],
            error=JobError(**d["error"]) if d.get("error") else None,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return cls.from_dict(json.loads(text))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def manifest_key(output_prefix: str, job_id: str, *, jsonl: bool = False) -> str:
    """``<output_prefix>/<job_id>.json`` (``.jsonl``): same input -> same key.

    An empty prefix (or ``"/"``) puts the manifest at the bucket root.
    """
    if not is_safe_job_id(job_id):
        raise ValueError(f"unsafe job id for a manifest key: {job_id!r}")
    ext = "jsonl" if jsonl else "json"
    prefix = output_prefix.rstrip("/")
    return f"{prefix}/{job_id}.{ext}" if prefix else f"{job_id}.{ext}"


def build_manifest(
    job_id: str,
    source: str,
    model_info: dict[str, Any],
    items: Iterable[ItemResult],
    *,
    include_timings: bool = False,
    continuations: Iterable[Continuation] = (),
    error: JobError | None = None,
) -> Manifest:
    """Assemble a manifest: items sorted by (bucket, key), counts computed; ``continuations``
    (the pages of a split prefix job) in page order.

    ``include_timings`` defaults to ``False`` so that the written document has
    no wall-clock values (see the module docstring).
    """
    sorted_items = sorted(items, key=ItemResult.sort_key)
    counts = {status: 0 for status in _STATUSES}
    for it in sorted_items:
        if it.status not in _STATUSES:
            raise ValueError(f"item {it.bucket}/{it.key}: status must be one of {_STATUSES}, got {it.status!r}")
        counts[it.status] += 1
    return Manifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        job_id=job_id,
        source=source,
        model=dict(model_info),
        items=sorted_items,
        counts=counts,
        include_timings=include_timings,
        continuations=list(continuations),
        error=error,
    )


def write_manifest(s3: Any, bucket: str, key: str, manifest: Manifest, *, jsonl: bool = False) -> None:
    """Write the manifest with ONE ``put_object`` (overwrites on redelivery)."""
    text = manifest.to_jsonl() if jsonl else manifest.to_json()
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=text.encode("utf-8"),
        ContentType=CONTENT_TYPE_JSONL if jsonl else CONTENT_TYPE_JSON,
    )


def read_manifest(s3: Any, bucket: str, key: str) -> Manifest:
    """Read back a JSON manifest written by :func:`write_manifest` (not JSONL)."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return Manifest.from_json(body)
