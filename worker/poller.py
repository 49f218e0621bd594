"""A long-running SQS consumer: long polling, a visibility heartbeat over every message it holds,
delete only after the manifest is written, failed messages left for retry (and the DLQ), and
SIGTERM/SIGINT finish the current batch, then stop.

Three stages overlap (``PollerSettings.pipelined``, the default): while the main thread
classifies batch N, one thread receives batch N+1 (and starts fetching its photos) and another
writes batch N-1's manifests and deletes its messages. So the cores never wait for a receive,
a manifest PUT or a delete round trip, nor for the first downloads of a batch. A message is
deleted only after its manifest is written, as before; the messages received
ahead are covered by the same heartbeat, and on stop they are handed back to the queue
(visibility 0) instead of waiting out their visibility timeout.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from worker.jobs import (BatchOutcome, ClassifiedBatch, OutputSettings, QueuedMessage, classify_messages,
                         write_manifests)
from worker.messages import MessageError, parse_message
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
    pipelined: bool = True  # receive ahead and write manifests behind while classifying


@dataclass
class PollerSummary:
    messages: int = 0
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    receives: int = 0
    seconds: float = 0.0


class InFlight:
    """The receipt handles of the messages this worker holds (received, not yet deleted or
    handed back), shared by the stages and renewed by the :class:`Heartbeat`."""

    def __init__(self):
        self._receipts: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, received: list[dict]) -> None:
        with self._lock:
            self._receipts.update((m["MessageId"], m["ReceiptHandle"]) for m in received)

    def discard(self, message_ids) -> None:
        with self._lock:
            for message_id in message_ids:
                self._receipts.pop(message_id, None)

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._receipts.items())


class Heartbeat:
    """Renews the visibility of in-flight messages every ``every`` seconds until stopped."""

    def __init__(self, sqs, queue_url: str, in_flight: InFlight, timeout: int, every: float):
        self._sqs, self._queue_url, self._in_flight = sqs, queue_url, in_flight
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
                       for i, (_, handle) in enumerate(self._in_flight.snapshot())]
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
        self.in_flight = InFlight()

    def stop(self, *_args) -> None:
        """Finish the batch in hand, then return from run()."""
        if not self._stopping.is_set():
            logger.info("stop requested: finishing the current batch")
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def receive(self, wanted: int) -> list[dict]:
        s = self.settings
        response = self.sqs.receive_message(QueueUrl=s.queue_url, MaxNumberOfMessages=wanted,
                                            WaitTimeSeconds=s.wait_seconds, VisibilityTimeout=s.visibility_timeout,
                                            MessageSystemAttributeNames=["ApproximateReceiveCount"])
        received = response.get("Messages", [])
        self.in_flight.add(received)
        return received

    def receive_ahead(self, wanted: int) -> list[dict]:
        """Receive the next batch while this one is classified, and start fetching its photos."""
        received = self.receive(wanted)
        refs = []
        for message in received:
            try:
                job = parse_message(message["Body"])
            except MessageError:
                continue  # classify_messages reports it
            if job is not None and job.prefix is None:
                refs += job.refs
        if refs:
            self.pipeline.prefetch(refs)
        return received

    def run(self) -> PollerSummary:
        s = self.settings
        summary = PollerSummary()
        started = time.perf_counter()
        ahead = 1 if s.pipelined else 0
        with Heartbeat(self.sqs, s.queue_url, self.in_flight, s.visibility_timeout, s.heartbeat_seconds), \
                ThreadPoolExecutor(1, thread_name_prefix="receive") as receiver, \
                ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
            upcoming: Future | None = None  # the receive running ahead
            finishing: Future | None = None  # the previous batch's manifests and deletes
            claimed = 0  # messages received so far (max_total)

            def wanted() -> int:
                return s.max_messages if s.max_total is None else min(s.max_messages, s.max_total - claimed)

            def settle(future: Future | None) -> None:
                if future is not None:
                    outcome = future.result()
                    summary.succeeded += len(outcome.succeeded_ids)
                    summary.failed += len(outcome.failed_ids)
                    summary.images += outcome.images

            while not self._stopping.is_set():
                if upcoming is None:
                    if wanted() <= 0:
                        break
                    upcoming = receiver.submit(self.receive, wanted())
                    nothing_pending = finishing is None
                received = upcoming.result()
                upcoming = None
                summary.receives += 1
                claimed += len(received)
                if not received:
                    if s.until_empty:
                        if nothing_pending:  # empty, and no message of ours can come back for a retry
                            break
                        settle(finishing)  # a failed message may come back: look again once it is settled
                        finishing = None
                    continue
                summary.messages += len(received)
                if ahead and not self._stopping.is_set() and wanted() > 0:
                    upcoming = receiver.submit(self.receive_ahead, wanted())  # runs while this batch is classified
                    nothing_pending = False
                classified = self.classify(received)
                settle(finishing)  # at most one batch waits for its manifests
                finishing = finisher.submit(self.finish, received, classified)
                if not ahead:
                    settle(finishing)
                    finishing = None
            settle(finishing)
            if upcoming is not None:  # received ahead but not started: hand them back now
                self.release(upcoming.result())
                self.pipeline.discard_prefetched()
        summary.seconds = round(time.perf_counter() - started, 3)
        logger.info("poller stopped", extra={"summary": summary.__dict__})
        return summary

    def classify(self, received: list[dict]) -> ClassifiedBatch:
        return classify_messages([QueuedMessage(m["MessageId"], m["Body"]) for m in received], self.pipeline,
                                 self.output)

    def finish(self, received: list[dict], classified: ClassifiedBatch) -> BatchOutcome:
        """Write the manifests, delete the messages that succeeded, and make the failed ones
        visible again after ``retry_delay``."""
        s = self.settings
        outcome = write_manifests(classified, self.pipeline, self.output)
        handles = {m["MessageId"]: m["ReceiptHandle"] for m in received}
        done = [{"Id": str(i), "ReceiptHandle": handles[mid]} for i, mid in enumerate(outcome.succeeded_ids)]
        for start in range(0, len(done), 10):
            self.sqs.delete_message_batch(QueueUrl=s.queue_url, Entries=done[start:start + 10])
        self._hand_back(handles, outcome.failed_ids, s.retry_delay)
        self.in_flight.discard(handles)
        for o in outcome.outcomes:
            (logger.info if o.ok else logger.warning)(
                "message done" if o.ok else "message failed",
                extra={"message_id": o.message_id, "job_id": o.job_id, "manifest": o.manifest, "reason": o.reason,
                       "counts": o.counts, "timings_ms": o.timings_ms})
        metrics_for_batch(outcome)
        return outcome

    def release(self, received: list[dict]) -> None:
        """Give messages received but never started back to the queue (visible now)."""
        if received:
            handles = {m["MessageId"]: m["ReceiptHandle"] for m in received}
            self._hand_back(handles, list(handles), 0)
            self.in_flight.discard(handles)
            logger.info("handed back messages received ahead", extra={"messages": len(handles)})

    def _hand_back(self, handles: dict[str, str], message_ids: list[str], delay: int) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": handles[mid], "VisibilityTimeout": delay}
                   for i, mid in enumerate(message_ids)]
        for start in range(0, len(entries), 10):
            try:
                self.sqs.change_message_visibility_batch(QueueUrl=self.settings.queue_url, Entries=entries[start:start + 10])
            except Exception as error:  # noqa: BLE001 - they come back after the visibility timeout anyway
                logger.warning("could not change the visibility of messages", extra={"reason": str(error)})
