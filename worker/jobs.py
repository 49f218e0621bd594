"""Process a batch of queue messages: parse each into a job, classify the photos of every job
in one pipeline pass (micro-batches cross message boundaries, so one-photo S3 event messages
still infer in full batches), then write one manifest per job.

Two steps, :func:`classify_messages` then :func:`write_manifests` (the poller writes one batch's
manifests while it classifies the next); :func:`process_messages` runs both.
Shared by the poller and the Lambda handler. A message counts as done only once its manifest
is written; a message that failed is reported with its reason and left for the queue to
redeliver (and, after maxReceiveCount, to move to the DLQ).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from worker import manifests
from worker.messages import Job, MessageError, expand_prefix_job, parse_message
from worker.observability import logger as log
from worker.pipeline import Pipeline, TransientError

MANIFEST_WRITERS = 8  # concurrent manifest PUTs per batch of messages


@dataclass(frozen=True)
class OutputSettings:
    bucket: str | None = None  # None: the bucket the photos came from
    prefix: str = "manifests"
    jsonl: bool = False
    max_prefix_keys: int = 100_000


@dataclass(frozen=True)
class QueuedMessage:
    message_id: str
    body: str


@dataclass
class MessageOutcome:
    message_id: str
    ok: bool
    job_id: str | None = None
    manifest: str | None = None  # s3://bucket/key
    reason: str | None = None  # why it failed
    counts: dict = field(default_factory=dict)
    timings_ms: dict = field(default_factory=dict)


@dataclass
class BatchOutcome:
    outcomes: list[MessageOutcome]
    images: int
    seconds: float

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
    items_of: dict[str, list]  # message id -> its photos' results
    outcomes: dict[str, MessageOutcome]  # messages already settled (ignored, malformed, failed)
    images: int
    started: float  # perf_counter at the start of classification


def classify_messages(messages: list[QueuedMessage], pipeline: Pipeline, output: OutputSettings) -> ClassifiedBatch:
    """Parse the messages and classify the photos of every job in one pipeline pass."""
    started = time.perf_counter()
    outcomes: dict[str, MessageOutcome] = {}
    jobs: dict[str, Job] = {}
    for message in messages:
        try:
            job = parse_message(message.body)
            if job is None:  # s3:TestEvent: nothing to do, delete it
                outcomes[message.message_id] = MessageOutcome(message.message_id, True, reason="ignored: s3:TestEvent")
                continue
            if job.prefix is not None:
                job = expand_prefix_job(job, pipeline.s3, max_keys=output.max_prefix_keys)
            jobs[message.message_id] = job
        except MessageError as error:
            log.warning("bad message", extra={"message_id": message.message_id, "code": error.code,
                                              "reason": error.message})
            outcomes[message.message_id] = MessageOutcome(message.message_id, False, reason=f"{error.code}: {error.message}")
        except Exception as error:  # noqa: BLE001 - listing failed: retry the message later
            log.warning("job expansion failed", extra={"message_id": message.message_id, "reason": str(error)})
            outcomes[message.message_id] = MessageOutcome(message.message_id, False, reason=f"expand: {error}")

    refs = [ref for job in jobs.values() for ref in job.refs]
    try:
        results = pipeline.classify(refs)
    except TransientError as error:
        # Retry them one message at a time so that one bad bucket does not fail the others.
        results = None
        log.warning("transient fault in a shared batch, retrying per message", extra={"reason": str(error)})
    items_of: dict[str, list] = {}
    cursor = 0
    for message_id, job in jobs.items():
        if results is not None:
            items_of[message_id] = results[cursor:cursor + len(job.refs)]
            cursor += len(job.refs)
        else:
            try:
                items_of[message_id] = pipeline.classify(list(job.refs))
            except TransientError as error:
                outcomes[message_id] = MessageOutcome(message_id, False, job.job_id, reason=f"transient: {error}")
            except Exception as error:  # noqa: BLE001 - retry the message later
                log.exception("classification failed", extra={"message_id": message_id})
                outcomes[message_id] = MessageOutcome(message_id, False, job.job_id, reason=f"classify: {error}")
    return ClassifiedBatch(list(messages), jobs, items_of, outcomes, len(refs), started)


def write_manifests(batch: ClassifiedBatch, pipeline: Pipeline, output: OutputSettings) -> BatchOutcome:
    """One manifest per classified job, written concurrently; the outcome of every message."""
    outcomes = dict(batch.outcomes)

    def write(message_id: str) -> MessageOutcome:
        job = batch.jobs[message_id]
        try:
            return _write(job, batch.items_of[message_id], message_id, pipeline, output)
        except Exception as error:  # noqa: BLE001 - manifest write failed: retry later
            log.exception("manifest write failed", extra={"message_id": message_id})
            return MessageOutcome(message_id, False, job.job_id, reason=f"write: {error}")

    # One PUT per message: written concurrently, so ten small jobs cost one round trip, not ten.
    with ThreadPoolExecutor(max(1, min(MANIFEST_WRITERS, len(batch.items_of))), thread_name_prefix="manifest") as writers:
        for message_id, outcome in zip(batch.items_of, writers.map(write, batch.items_of)):
            outcomes[message_id] = outcome
    ordered = [outcomes[m.message_id] for m in batch.messages]
    return BatchOutcome(ordered, batch.images, time.perf_counter() - batch.started)


def process_messages(messages: list[QueuedMessage], pipeline: Pipeline, output: OutputSettings) -> BatchOutcome:
    """Classify the messages' photos, then write their manifests."""
    return write_manifests(classify_messages(messages, pipeline, output), pipeline, output)


def _write(job: Job, items, message_id: str, pipeline: Pipeline, output: OutputSettings) -> MessageOutcome:
    bucket = output.bucket or job.bucket or (job.refs[0].bucket if job.refs else None)
    if bucket is None:
        return MessageOutcome(message_id, True, job.job_id, reason="no photos in this event")
    prefix = job.output_prefix if job.output_prefix is not None else output.prefix
    key = manifests.manifest_key(prefix, job.job_id, jsonl=output.jsonl)
    document = manifests.build_manifest(job.job_id, job.source, pipeline.classifier.model_info, items)
    manifests.write_manifest(pipeline.s3, bucket, key, document, jsonl=output.jsonl)
    return MessageOutcome(message_id, True, job.job_id, f"s3://{bucket}/{key}", counts=dict(document.counts),
                          timings_ms=_stage_totals(items))


def _stage_totals(items) -> dict[str, float]:
    """Per-stage time of a job's photos (download, decode, infer): for logs and metrics, not the
    manifest, whose content must not change when a message is redelivered."""
    totals: dict[str, float] = {}
    for item in items:
        for stage, ms in item.timings_ms.items():
            totals[stage] = round(totals.get(stage, 0.0) + ms, 3)
    return totals
