"""A long-running SQS consumer: long polling, a visibility heartbeat over every message it holds,
delete only after the manifest is written, failed messages left for retry (and the DLQ), and
SIGTERM/SIGINT finish the current batch, then stop.

Three stages overlap (``PollerSettings.pipelined``, the default): while the main thread
classifies batch N, one thread receives batch N+1 (and starts fetching its photos) and another
writes batch N-1's manifests and deletes its messages. So the cores never wait for a receive,
a manifest PUT or a delete round trip, nor for the first downloads of a batch. A message is
deleted only after its manifest is written; the messages received ahead are covered by the
same heartbeat, and on stop they are handed back to the queue (visibility 0) instead of
waiting out their visibility timeout.

Queue bookkeeping:

* A message leaves the held set (:class:`InFlight`) *before* it is deleted or handed back, and
  leaving waits for a heartbeat renewal in progress: a renewal can never land after a hand back
  (which would hide a failed message for a whole visibility timeout instead of ``retry_delay``).
* ``delete_message_batch`` / ``change_message_visibility_batch`` answer per entry: ``Failed``
  entries are logged and retried (``queue_attempts``); a delete still failing is logged and
  counted (metric ``UndeletedMessages``, ``PollerSummary.undeleted``): the message comes back
  after its visibility timeout and its manifest is rewritten, byte for byte.
* Stop (SIGTERM/SIGINT): the batch in hand is finished; a batch received after the stop (or
  received ahead) is handed back at once, not classified; a receive still long-polling is
  waited for at most ``stop_grace_seconds``, so the poller returns within the current batch
  plus that grace (if that receive returns later, its thread hands its messages back; if the
  process is gone by then, they come back after their visibility timeout).
* An exception that escapes the classification of a batch (a bug) hands that batch back for a
  retry; a failed receive is retried with a backoff: neither stops the poller.

The stop is checked before any new work is taken (a receive, a classification). The poller has
no deadline; a prefix job longer than a page is split into continuation pages sent back to its
queue, as in the Lambda handler (:mod:`worker.continuations`).
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit

from worker.continuations import ContinuationSender
from worker.jobs import (
    BatchOutcome,
    ClassifiedBatch,
    OutputSettings,
    QueuedMessage,
    classify_messages,
    requests_of,
    write_manifests,
)
from worker.messages import MessageError, parse_message
from worker.observability import logger, metrics, metrics_for_batch, metrics_for_stages
from worker.pipeline import Pipeline
from worker.sqs import SQS_BATCH, send_entries, sqs_record  # noqa: F401 - SQS_BATCH re-exported


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
    stop_grace_seconds: float = 5.0  # on stop, how long to wait for a receive still in flight
    queue_attempts: int = 3  # tries of a delete / visibility change SQS answers as Failed
    queue_backoff_seconds: float = 0.2  # before the first retry of those (doubled each time)
    receive_backoff_seconds: float = 1.0  # after a failed receive (doubled, at most 30 s)


@dataclass
class PollerSummary:
    messages: int = 0
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    receives: int = 0
    seconds: float = 0.0
    undeleted: int = 0  # manifest written but the delete kept failing: it will be redelivered
    handed_back: int = 0  # received but not started (stop): visible again at once
    classify_s: float = 0.0  # classifying batches: download, decode, inference
    finish_s: float = 0.0  # writing manifests and deleting messages (beside the next classify when pipelined)


class InFlight:
    """The receipt handles of the messages this worker holds (received, not yet deleted or
    handed back), shared by the stages and renewed by the :class:`Heartbeat`."""

    def __init__(self):
        self._receipts: dict[str, str] = {}
        self._lock = threading.Lock()  # guards _receipts
        self._renewing = threading.Lock()  # held while a renewal is in flight

    def add(self, received: list[dict]) -> None:
        with self._lock:
            self._receipts.update((m["MessageId"], m["ReceiptHandle"]) for m in received)

    def discard(self, message_ids) -> None:
        """Stop holding these messages: when this returns no renewal of them is in flight and
        none will start (call it *before* deleting or handing them back)."""
        with self._renewing, self._lock:
            for message_id in message_ids:
                self._receipts.pop(message_id, None)

    @contextmanager
    def renewal(self):
        """The receipts to renew, held against :meth:`discard` until the renewal is done."""
        with self._renewing:
            with self._lock:
                held = list(self._receipts.items())
            yield held

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._receipts.items())


class Heartbeat:
    """Renews the visibility of in-flight messages every ``every`` seconds until stopped."""

    def __init__(self, sqs, queue_url: str, in_flight: InFlight, timeout: int, every: float, attempts: int = 3,
                 backoff: float = 0.2):
        self._sqs, self._queue_url, self._in_flight = sqs, queue_url, in_flight
        self._timeout, self._every = timeout, every
        self._attempts, self._backoff = attempts, backoff
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
            self.beat()

    def beat(self) -> None:
        """Renew every held message once (a missed renewal is retried at the next beat)."""
        with self._in_flight.renewal() as held:
            entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": self._timeout}
                       for i, (_, handle) in enumerate(held)]
            failed = send_entries(self._sqs.change_message_visibility_batch, self._queue_url, entries,
                                  "visibility renewal", self._attempts, self._backoff)
        if failed:
            metrics.add_metric(name="RenewalFailures", unit=MetricUnit.Count, value=len(failed))
        self.beats += 1


class Poller:
    def __init__(self, sqs, pipeline: Pipeline, output: OutputSettings, settings: PollerSettings):
        self.sqs, self.pipeline, self.output, self.settings = sqs, pipeline, output, settings
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set by stop() and by a receive coming back
        self.in_flight = InFlight()
        self.handed_back = 0  # messages received but never started, given back (visible at once)
        self.finish_seconds = 0.0  # summed by the one finishing thread
        # a prefix job longer than a page sends its pages back to this queue (no deadline here:
        # the pages keep each message's work bounded, so the visibility timeout stays meaningful)
        self.continuations = ContinuationSender(sqs, lambda _message_id: settings.queue_url, settings.queue_attempts,
                                                settings.queue_backoff_seconds)

    def stop(self, *_args) -> None:
        """Finish the batch in hand, then return from run()."""
        if not self._stopping.is_set():
            logger.info("stop requested: finishing the current batch")
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def receive(self, wanted: int) -> list[dict]:
        s = self.settings
        response = self.sqs.receive_message(QueueUrl=s.queue_url, MaxNumberOfMessages=wanted,
                                            WaitTimeSeconds=s.wait_seconds, VisibilityTimeout=s.visibility_timeout)
        received = response.get("Messages", [])
        self.in_flight.add(received)
        return received

    def receive_ahead(self, wanted: int) -> list[dict]:
        """Receive the next batch while this one is classified, and start fetching its photos."""
        received = self.receive(wanted)
        requests = []
        for message in received:
            try:
                job = parse_message(message["Body"])
            except MessageError:
                continue  # classify_messages reports it
            if job is not None and job.prefix is None:
                requests += requests_of(message["MessageId"], job)
        if requests and not self.stopping:
            self.pipeline.prefetch(requests)
        return received

    def _receive_in_background(self, wanted: int, ahead: bool) -> Future:
        """Run a receive in a daemon thread (a long poll must not keep a stopping process alive);
        what it receives once stop is requested is handed back at once, never classified."""
        future: Future = Future()

        def receive() -> None:
            try:
                received = (self.receive_ahead if ahead else self.receive)(wanted)
            except BaseException as error:  # noqa: BLE001 - reported to whoever waits for it
                future.set_exception(error)
            else:
                if self.stopping and received:
                    self.release(received)
                    received = []
                future.set_result(received)
            self._wake.set()

        threading.Thread(target=receive, name="receive", daemon=True).start()
        return future

    def _await(self, future: Future) -> list[dict] | None:
        """The messages of a receive, or None when stop is requested before it comes back."""
        while not future.done() and not self.stopping:
            self._wake.wait()
            self._wake.clear()
        return future.result() if future.done() else None

    def run(self) -> PollerSummary:
        s = self.settings
        summary = PollerSummary()
        started = time.perf_counter()
        ahead = 1 if s.pipelined else 0
        upcoming: Future | None = None  # the receive running ahead
        finishing: Future | None = None  # the previous batch's manifests and deletes
        claimed = 0  # messages received so far (max_total)
        receive_failures = 0

        def wanted() -> int:
            return s.max_messages if s.max_total is None else min(s.max_messages, s.max_total - claimed)

        def settle(future: Future | None) -> None:
            if future is None:
                return
            try:
                outcome = future.result()
            except Exception:  # noqa: BLE001 - finish() settles its messages itself; keep polling
                logger.exception("finishing a batch failed")
                return
            summary.succeeded += len(outcome.succeeded_ids)
            summary.failed += len(outcome.failed_ids)
            summary.images += outcome.images
            summary.undeleted += len(outcome.undeleted)

        with Heartbeat(self.sqs, s.queue_url, self.in_flight, s.visibility_timeout, s.heartbeat_seconds,
                       s.queue_attempts, s.queue_backoff_seconds), \
                ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
            try:
                while not self.stopping:
                    if upcoming is None:
                        if wanted() <= 0:
                            break
                        upcoming = self._receive_in_background(wanted(), ahead=False)
                        nothing_pending = finishing is None
                    try:
                        received = self._await(upcoming)
                    except Exception as error:  # noqa: BLE001 - SQS unreachable after boto3's retries
                        upcoming = None
                        receive_failures += 1
                        delay = min(30.0, s.receive_backoff_seconds * 2 ** (receive_failures - 1))
                        logger.warning("receive failed: retrying", extra={"reason": str(error), "in_s": delay})
                        self._stopping.wait(delay)
                        continue
                    if received is None:  # stop requested while the receive was out: see finally
                        break
                    upcoming, receive_failures = None, 0
                    summary.receives += 1
                    claimed += len(received)
                    if self.stopping:  # received after the stop: hand back at once, not classified
                        self.release(received)
                        break
                    if not received:
                        if s.until_empty:
                            if nothing_pending:  # empty, and no message of ours can come back for a retry
                                break
                            settle(finishing)  # a failed message may come back: look again once it is settled
                            finishing = None
                        continue
                    summary.messages += len(received)
                    if ahead and wanted() > 0:  # runs while this batch is classified
                        upcoming = self._receive_in_background(wanted(), ahead=True)
                        nothing_pending = False
                    classify_started = time.perf_counter()
                    classified = self._classify_or_hand_back(received)
                    classify_s = time.perf_counter() - classify_started
                    summary.classify_s += classify_s
                    settle(finishing)  # at most one batch waits for its manifests
                    finishing = (finisher.submit(self.finish, received, classified, classify_s=classify_s)
                                 if classified else None)
                    if classified is None:
                        summary.failed += len(received)
                    if not ahead:
                        settle(finishing)
                        finishing = None
            finally:
                settle(finishing)
                if upcoming is not None:  # received ahead but not started: hand back, waiting at most the grace
                    self._hand_back_upcoming(upcoming)
        summary.handed_back = self.handed_back
        summary.seconds = round(time.perf_counter() - started, 3)
        summary.classify_s, summary.finish_s = round(summary.classify_s, 3), round(self.finish_seconds, 3)
        logger.info("poller stopped", extra={"summary": summary.__dict__})
        return summary

    def _hand_back_upcoming(self, upcoming: Future) -> None:
        try:
            received = upcoming.result(timeout=self.settings.stop_grace_seconds)
        except FutureTimeout:
            logger.info("a receive is still in flight: its thread hands back what it gets")
            self.stop()  # so that it does
            return
        except Exception as error:  # noqa: BLE001 - nothing received, nothing to hand back
            logger.warning("the receive ahead failed", extra={"reason": str(error)})
            return
        finally:
            self.pipeline.discard_prefetched()
        self.release(received)

    def _classify_or_hand_back(self, received: list[dict]) -> ClassifiedBatch | None:
        """Classify a batch; if that raises (a bug: classify_messages isolates every expected
        fault), hand the batch back for a retry and keep polling."""
        try:
            return self.classify(received)
        except Exception:  # noqa: BLE001
            logger.exception("classifying a batch failed: handing it back for a retry")
            handles = {m["MessageId"]: m["ReceiptHandle"] for m in received}
            self.in_flight.discard(handles)
            self._hand_back(handles, list(handles), self.settings.retry_delay)
            return None

    def classify(self, received: list[dict]) -> ClassifiedBatch:
        return classify_messages([QueuedMessage(m["MessageId"], m["Body"]) for m in received], self.pipeline,
                                 self.output, continuations=self.continuations)

    def finish(self, received: list[dict], classified: ClassifiedBatch, classify_s: float | None = None) -> BatchOutcome:
        """Write the manifests (the batch processor over the received messages as SQS records),
        delete exactly the records that succeeded, and make the failed ones visible again after
        ``retry_delay``; log and count the batch's stage times (``classify_s``: how long its
        classification took)."""
        s = self.settings
        started = time.perf_counter()
        handles = {m["MessageId"]: m["ReceiptHandle"] for m in received}
        try:
            outcome = write_manifests(classified, self.pipeline, self.output, [sqs_record(m) for m in received])
        finally:
            self.in_flight.discard(handles)  # first: no renewal may land after a delete or hand back
        done = [{"Id": str(i), "ReceiptHandle": handles[mid]} for i, mid in enumerate(outcome.succeeded_ids)]
        undeleted = send_entries(self.sqs.delete_message_batch, s.queue_url, done, "delete", s.queue_attempts,
                                 s.queue_backoff_seconds)
        outcome.undeleted = [outcome.succeeded_ids[int(entry["Id"])] for entry in undeleted]
        if undeleted:
            logger.warning("messages not deleted: they will be redelivered and their manifests rewritten",
                           extra={"message_ids": outcome.undeleted})
            metrics.add_metric(name="UndeletedMessages", unit=MetricUnit.Count, value=len(undeleted))
        self._hand_back(handles, outcome.failed_ids, s.retry_delay)
        for o in outcome.outcomes:
            (logger.info if o.ok else logger.warning)(
                "message done" if o.ok else "message failed",
                extra={"message_id": o.message_id, "job_id": o.job_id, "manifest": o.manifest, "reason": o.reason,
                       "counts": o.counts, "timings_ms": o.timings_ms})
        finish_s = time.perf_counter() - started
        self.finish_seconds += finish_s
        logger.info("batch done", extra={"messages": len(received), "images": outcome.images,
                                         "classify_ms": None if classify_s is None else round(classify_s * 1000, 1),
                                         "finish_ms": round(finish_s * 1000, 1)})
        metrics_for_stages(classify_s=classify_s, finish_s=finish_s)
        metrics_for_batch(outcome)
        return outcome

    def release(self, received: list[dict]) -> int:
        """Give messages received but never started back to the queue (visible now)."""
        if not received:
            return 0
        handles = {m["MessageId"]: m["ReceiptHandle"] for m in received}
        self.in_flight.discard(handles)
        self._hand_back(handles, list(handles), 0)
        self.handed_back += len(handles)
        logger.info("handed back messages received but not started", extra={"messages": len(handles)})
        return len(handles)

    def _hand_back(self, handles: dict[str, str], message_ids: list[str], delay: int) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": handles[mid], "VisibilityTimeout": delay}
                   for i, mid in enumerate(message_ids)]
        failed = send_entries(self.sqs.change_message_visibility_batch, self.settings.queue_url, entries,
                              "hand back", self.settings.queue_attempts, self.settings.queue_backoff_seconds)
        if failed:  # they come back after their visibility timeout anyway
            logger.warning("could not hand back messages: visible again after their visibility timeout",
                           extra={"messages": len(failed)})
            metrics.add_metric(name="HandBackFailures", unit=MetricUnit.Count, value=len(failed))
