"""A long-running SQS consumer: long polling, a visibility heartbeat while a batch takes long,
delete only after the manifest is written, failed messages left for retry (and the DLQ), and
SIGTERM/SIGINT finish the current batch, then stop."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

from worker.jobs import BatchOutcome, OutputSettings, QueuedMessage, process_messages
from worker.observability import logger, metrics_for_batch
from worker.pipeline import Pipeline


@dataclass(frozen=True)
class PollerSettings:
    queue_url: str
    wait_seconds: int = 20  # long polling
    max_messages: int = 10  # per receive (SQS maximum)
    visibility_timeout: int = 300  # set on receive and renewed by the heartbeat
    heartbeat_seconds: float = 60.0
    retry_delay: int = 10  # seconds before a failed message becomes visible again
    max_total: int | None = None  # stop after this many messages
    until_empty: bool = False  # stop when a receive comes back empty


@dataclass
class PollerSummary:
    messages: int = 0
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    receives: int = 0
    seconds: float = 0.0


class Heartbeat:
    """Renews the visibility of in-flight messages every ``every`` seconds until stopped."""

    def __init__(self, sqs, queue_url: str, receipts: list[tuple[str, str]], timeout: int, every: float):
        self._sqs, self._queue_url, self._receipts = sqs, queue_url, receipts
        self._timeout, self._every = timeout, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="visibility-heartbeat", daemon=True)
        self.beats = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": self._timeout}
                       for i, (_, handle) in enumerate(self._receipts)]
            for start in range(0, len(entries), 10):
                try:
                    self._sqs.change_message_visibility_batch(QueueUrl=self._queue_url, Entries=entries[start:start + 10])
                except Exception as error:  # noqa: BLE001 - a missed beat is retried at the next one
                    logger.warning("visibility heartbeat failed", extra={"reason": str(error)})
            self.beats += 1


class Poller:
    def __init__(self, sqs, pipeline: Pipeline, output: OutputSettings, settings: PollerSettings):
        self.sqs, self.pipeline, self.output, self.settings = sqs, pipeline, output, settings
        self._stopping = threading.Event()

    def stop(self, *_args) -> None:
        """Finish the batch in hand, then return from run()."""
        if not self._stopping.is_set():
            logger.info("stop requested: finishing the current batch")
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> PollerSummary:
        s = self.settings
        summary = PollerSummary()
        started = time.perf_counter()
        while not self._stopping.is_set():
            wanted = s.max_messages if s.max_total is None else min(s.max_messages, s.max_total - summary.messages)
            if wanted <= 0:
                break
            response = self.sqs.receive_message(QueueUrl=s.queue_url, MaxNumberOfMessages=wanted,
                                                WaitTimeSeconds=s.wait_seconds, VisibilityTimeout=s.visibility_timeout,
                                                MessageSystemAttributeNames=["ApproximateReceiveCount"])
            summary.receives += 1
            received = response.get("Messages", [])
            if not received:
                if s.until_empty:
                    break
                continue
            outcome = self.handle(received)
            summary.messages += len(received)
            summary.succeeded += len(outcome.succeeded_ids)
            summary.failed += len(outcome.failed_ids)
            summary.images += outcome.images
        summary.seconds = round(time.perf_counter() - started, 3)
        logger.info("poller stopped", extra={"summary": summary.__dict__})
        return summary

    def handle(self, received: list[dict]) -> BatchOutcome:
        s = self.settings
        receipts = [(m["MessageId"], m["ReceiptHandle"]) for m in received]
        messages = [QueuedMessage(m["MessageId"], m["Body"]) for m in received]
        with Heartbeat(self.sqs, s.queue_url, receipts, s.visibility_timeout, s.heartbeat_seconds):
            outcome = process_messages(messages, self.pipeline, self.output)
        handles = dict(receipts)
        done = [{"Id": str(i), "ReceiptHandle": handles[mid]} for i, mid in enumerate(outcome.succeeded_ids)]
        for start in range(0, len(done), 10):
            self.sqs.delete_message_batch(QueueUrl=s.queue_url, Entries=done[start:start + 10])
        retry = [{"Id": str(i), "ReceiptHandle": handles[mid], "VisibilityTimeout": s.retry_delay}
                 for i, mid in enumerate(outcome.failed_ids)]
        for start in range(0, len(retry), 10):
            try:
                self.sqs.change_message_visibility_batch(QueueUrl=s.queue_url, Entries=retry[start:start + 10])
            except Exception as error:  # noqa: BLE001 - they come back after the visibility timeout anyway
                logger.warning("could not shorten visibility of failed messages", extra={"reason": str(error)})
        for o in outcome.outcomes:
            (logger.info if o.ok else logger.warning)(
                "message done" if o.ok else "message failed",
                extra={"message_id": o.message_id, "job_id": o.job_id, "manifest": o.manifest, "reason": o.reason,
                       "counts": o.counts, "timings_ms": o.timings_ms})
        metrics_for_batch(outcome)
        return outcome
