"""SQS message bodies -> image references.

The worker reads SQS messages whose body is one of:

* an **S3 event notification** (``{"Records": [{"eventSource": "aws:s3", ...}]}``),
  either delivered directly or wrapped by SNS
  (``{"Type": "Notification", "Message": "<json string>"}``). Only
  ``ObjectCreated:*`` records are kept; object keys are URL-encoded in these
  events and are decoded with :func:`urllib.parse.unquote_plus`. "Folder"
  markers (keys ending in ``/``) are skipped. The job id is derived from the
  message content (bucket, key, version id, ETag and sequencer of every kept
  record), so a redelivered message yields the same job id and therefore the
  same manifest key.
* the **S3 test event** that S3 sends when a notification is configured
  (``{"Service": "Amazon S3", "Event": "s3:TestEvent", ...}``): parsed to
  ``None`` -- the caller deletes the message and does nothing else.
* a **job message** ``{"job_id", "bucket", "keys": [...], "output_prefix"?}``.
  Keys are plain (not URL-encoded); duplicates are dropped, order is kept.
* a **prefix job** ``{"job_id", "bucket", "prefix", "output_prefix"?}``: parsed to
  a :class:`Job` without refs; :func:`expand_prefix_job` lists the prefix.

Anything else raises :class:`MessageError` (and only that exception type): the
caller logs ``code``/``message`` and leaves the message on the queue so that it
is retried and ends up in the dead-letter queue after ``maxReceiveCount``.
Job messages are validated strictly, unknown fields included, so that a typo
such as ``"output_prefx"`` fails loudly instead of being silently ignored.

ETags are stored without the surrounding double quotes that ``ListObjectsV2``
returns (S3 events carry them unquoted), so both sources compare equal.

Nothing here imports TensorFlow; the only AWS call (:func:`expand_prefix_job`)
takes a boto3 S3 client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import unquote_plus

from worker import images
from worker.deadline import Deadline, check

__all__ = [
    "IMAGE_SUFFIXES",
    "JOB_ID_PATTERN",
    "ImageRef",
    "Job",
    "MessageError",
    "SOURCE_JOB",
    "SOURCE_PREFIX_JOB",
    "SOURCE_S3_EVENT",
    "SOURCE_TEST_EVENT",
    "expand_prefix_job",
    "is_safe_job_id",
    "parse_message",
]

IMAGE_SUFFIXES = images.IMAGE_SUFFIXES

SOURCE_S3_EVENT = "s3-event"
SOURCE_JOB = "job"
SOURCE_PREFIX_JOB = "prefix-job"
SOURCE_TEST_EVENT = "test-event"

#: A job id must be usable as one path segment of an S3 key.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

#: S3's own limit on key length, in UTF-8 bytes.
MAX_KEY_BYTES = 1024

_JOB_FIELDS = frozenset({"job_id", "bucket", "keys", "output_prefix"})
_PREFIX_JOB_FIELDS = frozenset({"job_id", "bucket", "prefix", "output_prefix"})


class MessageError(Exception):
    """A message body that cannot be turned into a job.

    ``code`` is a short machine-readable identifier, one of:
    ``malformed_json`` (not valid JSON / not text), ``unknown_message`` (valid
    JSON of no known shape), ``invalid_s3_event`` (an S3 event with missing or
    mistyped fields), ``invalid_job`` (a job or prefix-job message with missing,
    unknown or mistyped fields, or an unsafe job id) and, from
    :func:`expand_prefix_job`, ``too_many_objects``.
    """

    MALFORMED_JSON = "malformed_json"
    UNKNOWN_MESSAGE = "unknown_message"
    INVALID_S3_EVENT = "invalid_s3_event"
    INVALID_JOB = "invalid_job"
    TOO_MANY_OBJECTS = "too_many_objects"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageRef:
    """One S3 object to classify."""

    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Job:
    """A unit of work: one manifest is written per job.

    ``output_prefix`` ``None`` means the worker's default. ``bucket`` and
    ``prefix`` are set for prefix jobs only (``refs`` is empty until
    :func:`expand_prefix_job` fills it).
    """

    job_id: str
    refs: tuple[ImageRef, ...]
    output_prefix: str | None
    source: str
    prefix: str | None = None
    bucket: str | None = None


def is_safe_job_id(value: object) -> bool:
    """True if ``value`` is a string usable as a single S3 key path segment."""
    return (
        isinstance(value, str)
        and JOB_ID_PATTERN.fullmatch(value) is not None
        and value not in (".", "..")
    )


# --------------------------------------------------------------------------- #
# parsing
# --------------------------------------------------------------------------- #

def parse_message(body: str) -> Job | None:
    """Parse one SQS message body.

    Returns ``None`` for messages to acknowledge and ignore (the S3 test
    event), a :class:`Job` otherwise. Raises :class:`MessageError` -- and no
    other exception -- for bodies that cannot be understood.
    """
    return _parse(body, sns_unwrapped=False)


def _parse(body: object, *, sns_unwrapped: bool) -> Job | None:
    doc = _load_json(body)
    if not isinstance(doc, dict):
        raise MessageError(
            MessageError.UNKNOWN_MESSAGE,
            f"expected a JSON object, got {_json_type(doc)}",
        )

    if doc.get("Event") == "s3:TestEvent":
        return None

    if not sns_unwrapped and doc.get("Type") == "Notification" and "Message" in doc:
        inner = doc["Message"]
        if not isinstance(inner, str):
            raise MessageError(
                MessageError.UNKNOWN_MESSAGE,
                "SNS notification 'Message' must be a JSON string",
            )
        return _parse(inner, sns_unwrapped=True)

    if "Records" in doc:
        return _parse_s3_event(doc)

    if "job_id" in doc:
        return _parse_job(doc)

    fields = ", ".join(sorted(str(k) for k in doc)[:10]) or "none"
    raise MessageError(
        MessageError.UNKNOWN_MESSAGE,
        f"not an S3 event, S3 test event or job message (fields: {fields})",
    )


def _load_json(body: object) -> Any:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(MessageError.MALFORMED_JSON, f"body is not UTF-8: {exc}") from None
    if not isinstance(body, str):
        raise MessageError(
            MessageError.MALFORMED_JSON, f"body must be a string, got {type(body).__name__}"
        )
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MessageError(MessageError.MALFORMED_JSON, f"body is not valid JSON: {exc}") from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_object_created(event_name: str) -> bool:
    if event_name.startswith("s3:"):
        event_name = event_name[3:]
    return event_name.startswith("ObjectCreated:")


def _strip_etag(etag: str | None) -> str | None:
    if etag is None:
        return None
    etag = etag.strip('"')
    return etag or None


def _parse_s3_event(doc: dict) -> Job:
    bad = MessageError.INVALID_S3_EVENT
    records = doc["Records"]
    if not isinstance(records, list):
        raise MessageError(bad, f"'Records' must be an array, got {_json_type(records)}")

    refs: list[ImageRef] = []
    identity: list[tuple[str, str, str, str, str]] = []
    seen: set[tuple[str, str, str | None, str | None]] = set()
    for i, rec in enumerate(records):
        where = f"Records[{i}]"
        if not isinstance(rec, dict):
            raise MessageError(bad, f"{where} must be an object, got {_json_type(rec)}")
        source = rec.get("eventSource")
        if source != "aws:s3":
            raise MessageError(bad, f"{where}.eventSource must be 'aws:s3', got {source!r}")
        name = rec.get("eventName")
        if not isinstance(name, str):
            raise MessageError(bad, f"{where}.eventName must be a string")
        if not _is_object_created(name):
            continue

        s3 = rec.get("s3")
        if not isinstance(s3, dict):
            raise MessageError(bad, f"{where}.s3 must be an object")
        bucket_obj = s3.get("bucket")
        obj = s3.get("object")
        if not isinstance(bucket_obj, dict) or not isinstance(obj, dict):
            raise MessageError(bad, f"{where}.s3.bucket and .s3.object must be objects")
        bucket = bucket_obj.get("name")
        if not isinstance(bucket, str) or not bucket:
            raise MessageError(bad, f"{where}.s3.bucket.name must be a non-empty string")
        raw_key = obj.get("key")
        if not isinstance(raw_key, str) or not raw_key:
            raise MessageError(bad, f"{where}.s3.object.key must be a non-empty string")
        key = unquote_plus(raw_key)

        etag = _optional_str(obj, "eTag", where, bad)
        version_id = _optional_str(obj, "versionId", where, bad)
        sequencer = _optional_str(obj, "sequencer", where, bad)
        size = obj.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise MessageError(bad, f"{where}.s3.object.size must be a non-negative integer")

        if key.endswith("/"):  # "folder" marker created by the console
            continue
        etag = _strip_etag(etag)
        version_id = version_id or None
        dedupe = (bucket, key, version_id, etag)
        if dedupe in seen:
            continue
        seen.add(dedupe)
        refs.append(ImageRef(bucket=bucket, key=key, etag=etag, version_id=version_id, size=size))
        identity.append((bucket, key, version_id or "", etag or "", sequencer or ""))

    return Job(
        job_id=_content_job_id(identity),
        refs=tuple(refs),
        output_prefix=None,
        source=SOURCE_S3_EVENT,
    )


def _optional_str(obj: dict, field: str, where: str, code: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise MessageError(code, f"{where}.s3.object.{field} must be a string")
    return value


def _content_job_id(identity: Iterable[tuple[str, ...]]) -> str:
    """sha256 of the canonical, sorted identity list -> first 16 hex digits."""
    canonical = json.dumps(sorted(identity), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _parse_job(doc: dict) -> Job:
    bad = MessageError.INVALID_JOB
    has_keys = "keys" in doc
    has_prefix = "prefix" in doc
    if has_keys and has_prefix:
        raise MessageError(bad, "a job message takes either 'keys' or 'prefix', not both")
    if not has_keys and not has_prefix:
        raise MessageError(bad, "a job message needs 'keys' (a list) or 'prefix' (a string)")

    allowed = _JOB_FIELDS if has_keys else _PREFIX_JOB_FIELDS
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise MessageError(bad, f"unknown field(s): {', '.join(unknown)}")

    job_id = doc["job_id"]
    if not is_safe_job_id(job_id):
        raise MessageError(
            bad,
            f"'job_id' must match [A-Za-z0-9._-]{{1,128}} (and not be '.' or '..'), got {job_id!r}"[:300],
        )

    bucket = doc.get("bucket")
    if not isinstance(bucket, str) or not bucket or "/" in bucket:
        raise MessageError(bad, "'bucket' must be a non-empty string without '/'")

    output_prefix = doc.get("output_prefix")
    if output_prefix is not None and (not isinstance(output_prefix, str) or not output_prefix.strip("/")):
        raise MessageError(bad, "'output_prefix' must be a non-empty string when given")

    if has_prefix:
        prefix = doc["prefix"]
        if not isinstance(prefix, str):
            raise MessageError(bad, f"'prefix' must be a string, got {_json_type(prefix)}")
        return Job(
            job_id=job_id,
            refs=(),
            output_prefix=output_prefix,
            source=SOURCE_PREFIX_JOB,
            prefix=prefix,
            bucket=bucket,
        )

    keys = doc["keys"]
    if not isinstance(keys, list):
        raise MessageError(bad, f"'keys' must be an array, got {_json_type(keys)}")
    if not keys:
        raise MessageError(bad, "'keys' must not be empty")
    refs: list[ImageRef] = []
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise MessageError(bad, f"keys[{i}] must be a non-empty string")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise MessageError(bad, f"keys[{i}] is longer than {MAX_KEY_BYTES} bytes")
        if key in seen:
            continue
        seen.add(key)
        refs.append(ImageRef(bucket=bucket, key=key))
    return Job(job_id=job_id, refs=tuple(refs), output_prefix=output_prefix, source=SOURCE_JOB)


# --------------------------------------------------------------------------- #
# prefix expansion (the one AWS call)
# --------------------------------------------------------------------------- #

def _has_suffix(key: str, suffixes: tuple[str, ...] | None) -> bool:
    if suffixes is None:
        return True
    return key.lower().endswith(suffixes)


def expand_prefix_job(
    job: Job,
    s3: Any,
    *,
    suffixes: Iterable[str] | None = IMAGE_SUFFIXES,
    max_keys: int | None = None,
    page_size: int | None = None,
    deadline: Deadline | None = None,
) -> Job:
    """List ``s3://job.bucket/job.prefix`` and return the job with its refs filled.

    Uses the ``list_objects_v2`` paginator (``page_size`` sets ``MaxKeys`` per
    request). Keys ending in ``/`` are skipped, the rest are kept when they end
    in one of ``suffixes`` (case-insensitive; ``None`` keeps every key). Refs are
    sorted by key and carry the (unquoted) ETag and size. More than ``max_keys``
    matching objects raises ``MessageError("too_many_objects")`` rather than
    silently processing part of the prefix (the listing stops there). S3
    errors (``ClientError``) propagate unchanged. ``deadline`` is checked
    before each LIST request (``DeadlineReached``).
    """
    if job.source != SOURCE_PREFIX_JOB or job.bucket is None or job.prefix is None:
        raise ValueError(f"not a prefix job: {job!r}")
    if max_keys is not None and max_keys < 0:
        raise ValueError("max_keys must be >= 0")
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)

    pagination: dict[str, int] = {}
    if page_size is not None:
        pagination["PageSize"] = page_size
    paginator = s3.get_paginator("list_objects_v2")
    pages = iter(paginator.paginate(Bucket=job.bucket, Prefix=job.prefix, PaginationConfig=pagination))

    refs: list[ImageRef] = []
    while True:
        check(deadline, "a prefix listing request")
        page = next(pages, None)
        if page is None:
            break
        for obj in page.get("Contents", ()) or ():
            key = obj["Key"]
            if key.endswith("/") or not _has_suffix(key, wanted):
                continue
            refs.append(
                ImageRef(
                    bucket=job.bucket,
                    key=key,
                    etag=_strip_etag(obj.get("ETag")),
                    size=obj.get("Size"),
                )
            )
            if max_keys is not None and len(refs) > max_keys:
                raise MessageError(
                    MessageError.TOO_MANY_OBJECTS,
                    f"s3://{job.bucket}/{job.prefix} holds more than {max_keys} matching objects",
                )
    refs.sort(key=lambda r: r.key)
    return dataclasses.replace(job, refs=tuple(refs))
