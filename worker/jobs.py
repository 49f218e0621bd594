"""Process a batch of queue messages: parse each into a job, classify the photos of every job
in one pipeline pass (micro-batches cross message boundaries, so one-photo S3 event messages
still infer in full batches), then write one manifest per job.

Results travel with their message: every photo of every job is a
:class:`~worker.pipeline.PhotoRequest` naming its message and its position there, and every
answer carries its request; a photo named by several messages of the batch is read and
inferred once and answered in each. A message is given its items only when it has exactly one
answer for each of its photos, none of them a failure; otherwise it fails (and is retried).

Two steps, :func:`classify_messages` (the shared classification, for the whole batch) then the
record loop, :func:`write_manifests`: Powertools' batch processor runs the record handler
:func:`write_manifest` (one message's manifest) for every SQS record of the batch, concurrently,
and keeps the books: a record whose handler raises -- a message that failed before it
(:class:`MessageFailed`, with its reason) or a manifest PUT that fails -- is a failure, the others
succeed; its response lists exactly the failed ids (``batchItemFailures``). The Lambda handler
feeds the event's records, the poller SQS-shaped records built from ``receive_message``
(:func:`worker.sqs.sqs_record`), and deletes exactly the records that succeeded. The poller
writes one batch's manifests while it classifies the next; :func:`process_messages` runs both.
A message counts as done only once its manifest is written; a message that failed is reported
with its reason and left for the queue to redeliver (and, after maxReceiveCount, to move to the
DLQ).

What fails what: a malformed message, a prefix listing that fails, a manifest PUT that fails
fail only their own message; a photo's transient fault or ``MemoryError``, or an inference that
fails for that photo alone, fails only the messages naming that photo (see
:mod:`worker.pipeline`); an exception that escapes the shared classification anyway is retried
message by message, and fails only the messages whose own classification raises.

Prefix jobs: the listing is checked against ``OutputSettings.page_keys``; a listing of at most
one page is classified in its own message, a longer one is split into continuation pages sent
back to the queue (:mod:`worker.continuations`) before its manifest (no items, the pages in
``continuations``) is written. A listing over ``max_prefix_keys`` is not retried: its manifest
carries the job error ``too_many_objects`` and the message is done.

Time limits: with a :class:`~worker.deadline.Deadline` (the Lambda handler), no new listing, page
send, photo read or micro-batch starts once it is reached; the messages not fully answered by
then fail with a ``deadline: ...`` reason (retried), the others get their manifests as usual.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType

from worker import manifests
from worker.continuations import DEFAULT_PAGE_KEYS, ContinuationSender, Page, split_pages
from worker.deadline import Deadline, DeadlineReached, check
from worker.messages import SOURCE_S3_EVENT, Job, MessageError, parse_message
from worker.observability import logger as log
from worker.pipeline import Answer, PhotoRequest, Pipeline
from worker.prefix_listing import expand_prefix_job

MANIFEST_WRITERS = 8  # concurrent manifest PUTs per batch of messages


@dataclass(frozen=True)
class OutputSettings:
    bucket: str | None = None  # None: the bucket the photos came from
    prefix: str = "manifests"
    jsonl: bool = False
    max_prefix_keys: int = 100_000  # a longer listing is not classified: job error too_many_objects
    page_keys: int = DEFAULT_PAGE_KEYS  # a longer listing is split into continuation pages of this size


@dataclass(frozen=True)
class QueuedMessage:
    message_id: str
    body: str

    def record(self) -> dict:
        """The message as an SQS record of a Lambda event (what the batch processor reads)."""
        return {"messageId": self.message_id, "receiptHandle": "", "body": self.body, "attributes": {},
                "messageAttributes": {}, "eventSource": "aws:sqs"}


class MessageFailed(Exception):
    """Raised by the record handler for a message that failed before its manifest (retried)."""


@dataclass(frozen=True)
class MessageOutcome:
    """What the batch processor said about one record: a read-only view for logs and metrics."""
    message_id: str
    ok: bool
    job_id: str | None = None
    manifest: str | None = None  # s3://bucket/key
    reason: str | None = None  # why it failed, or why a message that succeeded has no manifest
    counts: dict = field(default_factory=dict)
    timings_ms: dict = field(default_factory=dict)


@dataclass
class BatchOutcome:
    """The batch processor's results, in the order of the records, and its response."""
    outcomes: list[MessageOutcome]
    images: int
    seconds: float
    response: dict = field(default_factory=lambda: {"batchItemFailures": []})  # the processor's, for Lambda
    undeleted: list[str] = field(default_factory=list)  # succeeded, but the queue would not delete them

    @property
    def failed_ids(self) -> list[str]:
        return [o.message_id for o in self.outcomes if not o.ok]

    @property
    def succeeded_ids(self) -> list[str]:
        return [o.message_id for o in self.outcomes if o.ok]


@dataclass
class ClassifiedBatch:
    """A batch of messages after classification, before its manifests are written."""
    messages: list[QueuedMessage]
    jobs: dict[str, Job]  # message id -> job (messages that parsed into one)
    items_of: dict[str, list]  # message id -> its photos' items, in the order of its photos
    failed: dict[str, str]  # message id -> why it fails (malformed, listing, classification, deadline)
    images: int  # distinct photos the batch named (each read once)
    started: float  # perf_counter at the start of classification
    pages: dict[str, list[Page]] = field(default_factory=dict)  # message id -> continuation pages sent
    errors: dict[str, manifests.JobError] = field(default_factory=dict)  # message id -> why a job has no items
    ignored: dict[str, str] = field(default_factory=dict)  # message id -> why it is done with nothing to write


def requests_of(message_id: str, job: Job) -> list[PhotoRequest]:
    """The photos ``job`` asks for, each naming its message and position; an S3 event names
    exact objects (its ETag / version), a job or prefix job names keys."""
    exact = job.source == SOURCE_S3_EVENT
    return [PhotoRequest(message_id, position, ref, exact) for position, ref in enumerate(job.refs)]


def parse_messages(messages: list[QueuedMessage], pipeline: Pipeline, output: OutputSettings,
                   deadline: Deadline | None = None, continuations: ContinuationSender | None = None,
                   ) -> tuple[dict[str, Job], dict[str, str], dict[str, str], dict[str, list[Page]],
                              dict[str, manifests.JobError]]:
    """Jobs of the messages that parse into one (prefix jobs listed, and split into continuation
    pages that are sent when the listing is longer than a page), why the others fail, why those
    with nothing to do are ignored, the pages sent, and the jobs that have no items for a reason
    of their own (too_many_objects)."""
    failed: dict[str, str] = {}
    ignored: dict[str, str] = {}
    jobs: dict[str, Job] = {}
    pages_of: dict[str, list[Page]] = {}
    errors: dict[str, manifests.JobError] = {}
    for message in messages:
        message_id, job = message.message_id, None
        try:
            job = parse_message(message.body)
            if job is None:  # s3:TestEvent: nothing to do, delete it
                ignored[message_id] = "ignored: s3:TestEvent"
                continue
            if job.prefix is not None:
                job, pages, error = _expand(message_id, job, pipeline, output, deadline, continuations)
                if pages:
                    pages_of[message_id] = pages
                if error is not None:
                    errors[message_id] = error
            jobs[message_id] = job
        except MessageError as error:
            log.warning("bad message", extra={"message_id": message_id, "code": error.code, "reason": error.message})
            failed[message_id] = f"{error.code}: {error.message}"
        except DeadlineReached as stop:
            failed[message_id] = str(stop)
        except Exception as error:  # noqa: BLE001 - listing or sending pages failed: retry the message later
            log.warning("job expansion failed", extra={"message_id": message_id, "reason": str(error)})
            failed[message_id] = f"expand: {type(error).__name__}: {error}"
    return jobs, failed, ignored, pages_of, errors


def _expand(message_id: str, job: Job, pipeline: Pipeline, output: OutputSettings, deadline: Deadline | None,
            continuations: ContinuationSender | None) -> tuple[Job, list[Page], manifests.JobError | None]:
    """List a prefix job: its photos (one page or less), or its pages, sent (no photos of its
    own), or a job error (too many photos: retrying cannot change that, the job is done)."""
    check(deadline, "a prefix listing")
    try:
        listed = expand_prefix_job(job, pipeline.s3, max_keys=output.max_prefix_keys, deadline=deadline)
    except MessageError as error:
        if error.code != MessageError.TOO_MANY_OBJECTS:
            raise
        log.warning("prefix job too large", extra={"message_id": message_id, "job_id": job.job_id,
                                                   "reason": error.message})
        return job, [], manifests.JobError(error.code, f"{error.message}: split it into prefix jobs of at most "
                                                       f"{output.max_prefix_keys} photos")
    if len(listed.refs) <= output.page_keys:
        return listed, [], None
    pages = split_pages(listed, output.page_keys)
    if continuations is None:
        raise RuntimeError(f"{len(listed.refs)} photos need continuation pages and no queue was given to send them")
    continuations.send(message_id, pages, deadline)
    log.info("prefix job split into continuation pages", extra={"message_id": message_id, "job_id": job.job_id,
                                                                "photos": len(listed.refs), "pages": len(pages)})
    return dataclasses.replace(listed, refs=()), pages, None


def classify_messages(messages: list[QueuedMessage], pipeline: Pipeline, output: OutputSettings,
                      deadline: Deadline | None = None, continuations: ContinuationSender | None = None,
                      ) -> ClassifiedBatch:
    """Parse the messages and classify the photos of every job in one pipeline pass; with a
    ``deadline``, stop taking new work when it is reached (the unfinished messages fail)."""
    started = time.perf_counter()
    jobs, failed, ignored, pages, errors = parse_messages(messages, pipeline, output, deadline, continuations)
    requests = {message_id: requests_of(message_id, job) for message_id, job in jobs.items()}
    answers: list[Answer] = []
    try:
        answers = pipeline.answer([r for mine in requests.values() for r in mine], deadline=deadline)
    except Exception:  # noqa: BLE001 - escaped the per-photo isolation: retry message by message
        log.exception("the shared classification of a batch failed: retrying message by message")
        answers = []
        for message_id, mine in requests.items():
            try:
                answers += pipeline.answer(mine, deadline=deadline)
            except Exception as error:  # noqa: BLE001 - fails this message only (retried later)
                log.exception("classification failed", extra={"message_id": message_id})
                failed[message_id] = f"classify: {type(error).__name__}: {error}"
    answers_of: dict[str, list[Answer]] = {message_id: [] for message_id in jobs}
    for answer in answers:
        answers_of[answer.request.message_id].append(answer)
    items_of: dict[str, list] = {}
    for message_id in jobs:
        if message_id in failed:
            continue
        items, reason = _items(requests[message_id], answers_of[message_id])
        if reason is None:
            items_of[message_id] = items
        else:
            failed[message_id] = reason
    photos = len({_photo_key(r.ref) for mine in requests.values() for r in mine})
    return ClassifiedBatch(list(messages), jobs, items_of, failed, photos, started, pages, errors, ignored)


def _items(requests: list[PhotoRequest], answers: list[Answer]) -> tuple[list, str | None]:
    """A message's items in the order of its photos, or why it fails: one of its photos must be
    retried, or (a bug, never written) its answers are not exactly one per photo."""
    failures = [a.failure for a in answers if a.failure is not None]
    if failures:
        return [], f"{failures[0]}" + (f" (and {len(failures) - 1} more photos)" if len(failures) > 1 else "")
    by_position = {a.request.position: a for a in answers}
    if len(by_position) != len(answers) or sorted(by_position) != list(range(len(requests))) or any(
            by_position[r.position].request != r for r in requests):
        log.error("answers do not match the photos of a message", extra={"photos": len(requests),
                                                                         "answers": len(answers)})
        return [], f"internal: {len(answers)} answers for {len(requests)} photos"
    return [by_position[r.position].item for r in requests], None


def _photo_key(ref) -> tuple:
    return (ref.bucket, ref.key, ref.version_id or None)


def write_manifest(batch: ClassifiedBatch, message_id: str, pipeline: Pipeline, output: OutputSettings) -> dict:
    """The record handler's work for one message of a classified batch: write its manifest and
    say where; raises :class:`MessageFailed` for a message that failed before (and whatever a
    failed PUT raises): the batch processor counts the record as failed."""
    if message_id in batch.failed:
        raise MessageFailed(batch.failed[message_id])
    if message_id in batch.ignored:
        return {"reason": batch.ignored[message_id]}
    job, items = batch.jobs[message_id], batch.items_of[message_id]
    where = _manifest_uri(job, job.job_id, output)
    if where is None:
        return {"job_id": job.job_id, "reason": "no photos in this event"}
    bucket, key = where
    document = manifests.build_manifest(
        job.job_id, job.source, pipeline.classifier.model_info, items,
        continuations=[_continuation(job, page, output) for page in batch.pages.get(message_id, ())],
        error=batch.errors.get(message_id))
    manifests.write_manifest(pipeline.s3, bucket, key, document, jsonl=output.jsonl)
    return {"job_id": job.job_id, "manifest": f"s3://{bucket}/{key}", "counts": dict(document.counts),
            "timings_ms": _stage_totals(items)}


def write_manifests(batch: ClassifiedBatch, pipeline: Pipeline, output: OutputSettings,
                    records: list[dict] | None = None) -> BatchOutcome:
    """Run the record handler over the batch's SQS records (default: built from its messages) with
    Powertools' batch processor, at most ``MANIFEST_WRITERS`` PUTs at a time (so ten small jobs
    cost one round trip, not ten); the processor's results and response."""
    records = [m.record() for m in batch.messages] if records is None else records
    processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    with ThreadPoolExecutor(MANIFEST_WRITERS, thread_name_prefix="manifest") as writers:
        async def record_handler(record) -> dict:
            return await asyncio.get_running_loop().run_in_executor(
                writers, write_manifest, batch, record.message_id, pipeline, output)

        with processor(records, record_handler):
            results = processor.async_process()
    failures = {record["messageId"]: error for record, (_, error, _) in zip(processor.fail_messages,
                                                                           processor.exceptions)}
    outcomes = []
    for status, result, record in results:
        message_id = record["messageId"]
        job = batch.jobs.get(message_id)
        if status == "success":
            outcomes.append(MessageOutcome(message_id, True, **result))
        else:
            error = failures[message_id]
            if not isinstance(error, MessageFailed):
                log.error("manifest write failed", exc_info=error, extra={"message_id": message_id})
            outcomes.append(MessageOutcome(message_id, False, job.job_id if job else None,
                                           reason=str(error) if isinstance(error, MessageFailed) else f"write: {error}"))
    return BatchOutcome(outcomes, batch.images, time.perf_counter() - batch.started, processor.response())


def process_messages(messages: list[QueuedMessage], pipeline: Pipeline, output: OutputSettings,
                     deadline: Deadline | None = None, continuations: ContinuationSender | None = None,
                     records: list[dict] | None = None) -> BatchOutcome:
    """Classify the messages' photos, then write their manifests (``records``: the messages' SQS
    records, when they came in a Lambda event)."""
    batch = classify_messages(messages, pipeline, output, deadline, continuations)
    return write_manifests(batch, pipeline, output, records)


def _manifest_uri(job: Job, job_id: str, output: OutputSettings) -> tuple[str, str] | None:
    """(bucket, key) of a job's manifest; None for an event that named no photo."""
    bucket = output.bucket or job.bucket or (job.refs[0].bucket if job.refs else None)
    if bucket is None:
        return None
    prefix = job.output_prefix if job.output_prefix is not None else output.prefix
    return bucket, manifests.manifest_key(prefix, job_id, jsonl=output.jsonl)


def _continuation(job: Job, page: Page, output: OutputSettings) -> manifests.Continuation:
    bucket, key = _manifest_uri(job, page.job_id, output)
    return manifests.Continuation(page.job_id, f"s3://{bucket}/{key}", len(page.keys), page.keys[0], page.keys[-1])


def _stage_totals(items) -> dict[str, float]:
    """Per-stage time of a job's photos (download, decode, infer): for logs and metrics, not the
    manifest, whose content must not change when a message is redelivered."""
    totals: dict[str, float] = {}
    for item in items:
        for stage, ms in item.timings_ms.items():
            totals[stage] = round(totals.get(stage, 0.0) + ms, 3)
    return totals
