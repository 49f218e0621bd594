"""SQS message bodies -> jobs (the photos one manifest answers).

The worker reads SQS messages whose body is one of:

* an **S3 event notification** (``{"Records": [{"eventSource": "aws:s3", ...}]}``), delivered
  directly or wrapped by SNS (``{"Type": "Notification", "Message": "<json string>"}``). Only
  ``ObjectCreated:*`` records are kept; object keys are URL-encoded in these events and are
  decoded with :func:`urllib.parse.unquote_plus` (as Powertools' ``S3Event`` data class does).
  "Folder" markers (keys ending in ``/``) are skipped. The job id is derived from the message
  content (bucket, key, version id, ETag and sequencer of every kept record), so a redelivered
  message yields the same job id and therefore the same manifest key.
* the **S3 test event** S3 sends when a notification is configured: parsed to ``None`` (the
  caller deletes the message and does nothing else).
* a **job message** ``{"job_id", "bucket", "keys": [...], "output_prefix"?}``: plain keys (not
  URL-encoded), duplicates dropped, order kept.
* a **prefix job** ``{"job_id", "bucket", "prefix", "output_prefix"?}``: a :class:`Job` without
  refs; :func:`worker.prefix_listing.expand_prefix_job` lists the prefix.

Shapes are pydantic models (strict types; job messages ``extra="forbid"``, so a typo such as
``"output_prefx"`` fails loudly). The S3 record models name only the fields the worker reads and
ignore the rest: Powertools' ``S3Model`` requires fields (``userIdentity``, ``requestParameters``,
``ownerIdentity``, ``eventTime``...) that S3-compatible stores and hand-made events leave out, and
rejecting those would change which messages the worker accepts.

Anything else raises :class:`MessageError` (and only that exception type) with a one-line reason:
the caller logs ``code``/``message`` and leaves the message on the queue, so that it is retried and
ends up in the dead-letter queue after ``maxReceiveCount``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from worker import images

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
    "is_safe_job_id",
    "parse_message",
    "strip_etag",
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


class MessageError(Exception):
    """A message body that cannot be turned into a job.

    ``code`` is a short machine-readable identifier, one of:
    ``malformed_json`` (not valid JSON / not text), ``unknown_message`` (valid
    JSON of no known shape), ``invalid_s3_event`` (an S3 event with missing or
    mistyped fields), ``invalid_job`` (a job or prefix-job message with missing,
    unknown or mistyped fields, or an unsafe job id) and, from
    :func:`worker.prefix_listing.expand_prefix_job`, ``too_many_objects``.
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
    :func:`worker.prefix_listing.expand_prefix_job` fills it).
    """

    job_id: str
    refs: tuple[ImageRef, ...]
    output_prefix: str | None
    source: str
    prefix: str | None = None
    bucket: str | None = None


def is_safe_job_id(value: object) -> bool:
    """True if ``value`` is a string usable as a single S3 key path segment."""
    return isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value) is not None and value not in (".", "..")


def strip_etag(etag: str | None) -> str | None:
    """An ETag without the double quotes S3 listings put around it (``None`` if empty)."""
    return (etag.strip('"') or None) if etag is not None else None


# --------------------------------------------------------------------------- #
# the shapes
# --------------------------------------------------------------------------- #

NonEmpty = Annotated[str, Field(min_length=1)]


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)


class S3Notification(_Shape):
    Records: list[dict[str, Any]]


class S3RecordHead(_Shape):
    """What decides whether a record is read further: its source and event name."""
    eventSource: Literal["aws:s3"]
    eventName: str

    @property
    def object_created(self) -> bool:
        return self.eventName.removeprefix("s3:").startswith("ObjectCreated:")


class S3Bucket(_Shape):
    name: NonEmpty


class S3Object(_Shape):
    key: NonEmpty  # URL-encoded
    size: NonNegativeInt | None = None
    eTag: str | None = None
    versionId: str | None = None
    sequencer: str | None = None


class S3Entity(_Shape):
    bucket: S3Bucket
    object: S3Object


class S3CreatedRecord(S3RecordHead):
    s3: S3Entity


class _JobMessage(_Shape):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    job_id: str
    bucket: str
    output_prefix: str | None = None

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, value: str) -> str:
        if not is_safe_job_id(value):
            raise ValueError(f"must match [A-Za-z0-9._-]{{1,128}} (and not be '.' or '..'), got {value[:140]!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError("must be a non-empty string without '/'")
        return value

    @field_validator("output_prefix")
    @classmethod
    def _output_prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.strip("/"):
            raise ValueError("must be a non-empty string when given")
        return value


class KeysJobMessage(_JobMessage):
    keys: Annotated[list[str], Field(min_length=1)]

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not key:
                raise ValueError(f"keys[{i}] must be a non-empty string")
            if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                raise ValueError(f"keys[{i}] is longer than {MAX_KEY_BYTES} bytes")
        return keys


class PrefixJobMessage(_JobMessage):
    prefix: str


def _validate(model: type[BaseModel], doc: object, code: str, where: str = "") -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as error:
        raise MessageError(code, _one_line(error, where)) from None


def _one_line(error: ValidationError, where: str) -> str:
    """The first problem of a validation error, as ``path: reason`` (and how many more)."""
    problems = error.errors(include_url=False)
    first = problems[0]
    path = where
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path or 'message'}: {first['msg'].removeprefix('Value error, ')}{more}"[:300]


# --------------------------------------------------------------------------- #
# parsing
# --------------------------------------------------------------------------- #

def parse_message(body: str) -> Job | None:
    """Parse one SQS message body.

    Returns ``None`` for messages to acknowledge and ignore (the S3 test
    event), a :class:`Job` otherwise. Raises :class:`MessageError` -- and no
    other exception -- for bodies that cannot be understood.
    """
    return _parse(_load_json(body), sns_unwrapped=False)


def _parse(doc: object, *, sns_unwrapped: bool) -> Job | None:
    if not isinstance(doc, dict):
        raise MessageError(MessageError.UNKNOWN_MESSAGE, f"expected a JSON object, got {_json_type(doc)}")
    if doc.get("Event") == "s3:TestEvent":
        return None
    if not sns_unwrapped and doc.get("Type") == "Notification" and "Message" in doc:
        if not isinstance(doc["Message"], str):
            raise MessageError(MessageError.UNKNOWN_MESSAGE, "SNS notification 'Message' must be a JSON string")
        return _parse(_load_json(doc["Message"]), sns_unwrapped=True)
    if "Records" in doc:
        return _s3_event_job(doc)
    if "job_id" in doc:
        return _job(doc)
    fields = ", ".join(sorted(str(k) for k in doc)[:10]) or "none"
    raise MessageError(MessageError.UNKNOWN_MESSAGE,
                       f"not an S3 event, S3 test event or job message (fields: {fields})")


def _load_json(body: object) -> Any:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(MessageError.MALFORMED_JSON, f"body is not UTF-8: {exc}") from None
    if not isinstance(body, str):
        raise MessageError(MessageError.MALFORMED_JSON, f"body must be a string, got {type(body).__name__}")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MessageError(MessageError.MALFORMED_JSON, f"body is not valid JSON: {exc}") from None


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _s3_event_job(doc: dict) -> Job:
    bad = MessageError.INVALID_S3_EVENT
    records = _validate(S3Notification, doc, bad).Records
    refs: list[ImageRef] = []
    identity: list[tuple[str, str, str, str, str]] = []
    seen: set[tuple[str, str, str | None, str | None]] = set()
    for i, record in enumerate(records):
        if not _validate(S3RecordHead, record, bad, f"Records[{i}]").object_created:
            continue
        s3 = _validate(S3CreatedRecord, record, bad, f"Records[{i}]").s3
        key = unquote_plus(s3.object.key)
        if key.endswith("/"):  # "folder" marker created by the console
            continue
        etag, version_id = strip_etag(s3.object.eTag), s3.object.versionId or None
        if (s3.bucket.name, key, version_id, etag) in seen:
            continue
        seen.add((s3.bucket.name, key, version_id, etag))
        refs.append(ImageRef(s3.bucket.name, key, etag=etag, version_id=version_id, size=s3.object.size))
        identity.append((s3.bucket.name, key, version_id or "", etag or "", s3.object.sequencer or ""))
    return Job(job_id=_content_job_id(identity), refs=tuple(refs), output_prefix=None, source=SOURCE_S3_EVENT)


def _content_job_id(identity: list[tuple[str, ...]]) -> str:
    """sha256 of the canonical, sorted identity list -> first 16 hex digits."""
    canonical = json.dumps(sorted(identity), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _job(doc: dict) -> Job:
    bad = MessageError.INVALID_JOB
    if ("keys" in doc) == ("prefix" in doc):
        raise MessageError(bad, "a job message takes either 'keys' (a list) or 'prefix' (a string), exactly one")
    if "prefix" in doc:
        message = _validate(PrefixJobMessage, doc, bad)
        return Job(message.job_id, (), message.output_prefix, SOURCE_PREFIX_JOB, prefix=message.prefix,
                   bucket=message.bucket)
    message = _validate(KeysJobMessage, doc, bad)
    refs = tuple(ImageRef(message.bucket, key) for key in dict.fromkeys(message.keys))  # deduped, in order
    return Job(message.job_id, refs, message.output_prefix, SOURCE_JOB)
