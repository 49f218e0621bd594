"""Continuation pages: a prefix job whose listing holds more photos than one page is split into
job messages of one page each, sent back to the queue the prefix job came from, so the work of
every message stays bounded (a Lambda invocation, a poller's visibility timeout).

* **When**: a listing of at most ``page_keys`` photos is classified in its own message, as
  before; a longer one is split into ``ceil(n / page_keys)`` pages (fewer keys on a page whose
  body would pass :data:`MAX_PAGE_BODY_BYTES`), and the prefix job classifies none of them
  itself: its manifest has no items and lists its pages (``continuations``).
* **What a page is**: an ordinary job message ``{"job_id", "bucket", "keys", "output_prefix"?}``
  over a run of the sorted listing, so its manifest is an ordinary job manifest.
* **Deterministic ids**: ``<job_id>.p0001-<8 hex>``: the page number and a hash of the page's
  bucket and keys. A redelivered prefix job over the same listing sends the same pages under the
  same ids; SQS standard queues do not deduplicate, so the pages are then queued twice, and each
  copy rewrites the same manifest with the same items (a duplicate costs its classification,
  never a second manifest). If the listing changed between deliveries, the changed pages get
  new ids: the last manifest of the prefix job names pages that hold exactly its listing, and a
  page sent by the earlier delivery still gets its own manifest (not named by the prefix job).
  A job id that would pass 128 characters is shortened: its head, ``-`` and 8 hex of the whole.

:class:`ContinuationSender` sends pages with ``send_message_batch`` (at most 10 entries and
256 KiB per call; ``Failed`` entries retried): all pages are sent before the prefix job's
manifest is written, and a page that still fails fails the prefix job (retried whole).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Sequence

from worker.deadline import Deadline, check
from worker.messages import Job
from worker.sqs import SQS_BATCH, SQS_BATCH_BYTES, send_entries

#: Default DOGBREEDS_PREFIX_PAGE_KEYS: photos per continuation page. A Lambda invocation takes up
#: to 10 messages (the template's BatchSize); 10 pages of 100 photos take ~40 s with OpenVINO int8
#: and ~150 s with TF fp32 on 2 vCPUs (README's throughput table), inside the default 300 s
#: timeout, so a batch of pages finishes in one invocation instead of being cut by the deadline
#: (a cut counts as a receive towards the DLQ's maxReceiveCount).
DEFAULT_PAGE_KEYS = 100
#: A page's message body at most (SQS takes 262,144 bytes per message and per batch call).
MAX_PAGE_BODY_BYTES = 200_000
MAX_JOB_ID = 128


class ContinuationError(Exception):
    """Pages that could not be sent (the prefix job fails and is retried)."""


@dataclass(frozen=True)
class Page:
    """One continuation page: a job message over a run of a prefix job's listing."""

    job_id: str
    bucket: str
    keys: tuple[str, ...]
    output_prefix: str | None

    def body(self) -> str:
        doc: dict = {"job_id": self.job_id, "bucket": self.bucket, "keys": list(self.keys)}
        if self.output_prefix is not None:
            doc["output_prefix"] = self.output_prefix
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def page_job_id(parent_id: str, number: int, bucket: str, keys: Sequence[str]) -> str:
    """``<parent_id>.p<number, 4+ digits>-<8 hex of bucket and keys>``, at most 128 characters."""
    suffix = f".p{number:04d}-{_digest(bucket, list(keys))}"
    if len(parent_id) + len(suffix) <= MAX_JOB_ID:
        return parent_id + suffix
    head = parent_id[:MAX_JOB_ID - len(suffix) - 9]
    return f"{head}-{_digest(parent_id)}{suffix}"


def split_pages(job: Job, page_keys: int, max_body_bytes: int = MAX_PAGE_BODY_BYTES) -> list[Page]:
    """The pages of a listed prefix job, in listing order: at most ``page_keys`` keys each, and
    at most ``max_body_bytes`` of message body. A pure function of the listing."""
    if page_keys < 1:
        raise ValueError("page_keys must be >= 1")
    bucket = job.bucket or (job.refs[0].bucket if job.refs else "")
    overhead = len(Page("x" * MAX_JOB_ID, bucket, (), job.output_prefix).body().encode())
    runs: list[list[str]] = []
    size = overhead
    for ref in job.refs:
        key_bytes = len(json.dumps(ref.key, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 1
        if not runs or len(runs[-1]) >= page_keys or size + key_bytes > max_body_bytes:
            runs.append([])
            size = overhead
        runs[-1].append(ref.key)
        size += key_bytes
    return [Page(page_job_id(job.job_id, n, bucket, keys), bucket, tuple(keys), job.output_prefix)
            for n, keys in enumerate(runs, start=1)]


def _chunks(entries: list[dict]) -> list[list[dict]]:
    """send_message_batch calls: at most 10 entries and 256 KiB of bodies each."""
    chunks: list[list[dict]] = []
    size = 0
    for entry in entries:
        body = len(entry["MessageBody"].encode("utf-8", "surrogatepass"))
        if not chunks or len(chunks[-1]) >= SQS_BATCH or size + body > SQS_BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += body
    return chunks


class ContinuationSender:
    """Sends a prefix job's pages to the queue its message came from (``queue_url_of(message_id)``:
    the poller's queue, or the queue of the Lambda record). ``sqs``: a boto3 SQS client, or a
    function that returns one (called when the first page is sent)."""

    def __init__(self, sqs, queue_url_of: Callable[[str], str | None], attempts: int = 3, backoff: float = 0.2):
        self._sqs, self.queue_url_of = sqs, queue_url_of
        self.attempts, self.backoff = attempts, backoff

    @property
    def sqs(self):
        if not hasattr(self._sqs, "send_message_batch"):
            self._sqs = self._sqs()
        return self._sqs

    def send(self, message_id: str, pages: Sequence[Page], deadline: Deadline | None = None) -> None:
        """Send every page, or raise (ContinuationError, DeadlineReached): the prefix job then fails
        and its retry sends the same pages again."""
        queue_url = self.queue_url_of(message_id)
        if not queue_url:
            raise ContinuationError("no queue to send continuation pages to")
        entries = [{"Id": str(i), "MessageBody": page.body()} for i, page in enumerate(pages)]
        for chunk in _chunks(entries):
            check(deadline, "sending continuation pages")
            failed = send_entries(self.sqs.send_message_batch, queue_url, chunk, "continuation send",
                                  self.attempts, self.backoff)
            if failed:
                raise ContinuationError(f"{len(failed)} continuation page(s) not sent (of {len(pages)})")
