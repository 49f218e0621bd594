"""worker.poller.Poller: the next receive and the previous batch's manifests overlap the
classification of the current batch; messages received ahead are covered by the heartbeat and
handed back on stop; a message is deleted only after its manifest is written; the queue's
per-entry failures are retried; a renewal never lands after a hand back.

No test here sleeps or reads a clock: the fakes block on events that only the behaviour under
test can set, and a wait that runs out (WAIT seconds, never reached when the code is right)
is the failure."""

from __future__ import annotations

import json
import threading
from collections import deque

from worker.jobs import ClassifiedBatch, OutputSettings, QueuedMessage
from worker.manifests import ItemResult
from worker.pipeline import Answer
from worker.poller import Heartbeat, Poller, PollerSettings

WAIT = 10.0  # seconds: only a failing run waits this long


class Log:
    """What happened, in order."""

    def __init__(self):
        self.lock, self.entries = threading.Lock(), []

    def add(self, kind: str, what) -> None:
        with self.lock:
            self.entries.append((kind, what))

    def of(self, kind: str) -> list:
        with self.lock:
            return [what for k, what in self.entries if k == kind]

    def index(self, kind: str, what) -> int:
        with self.lock:
            return self.entries.index((kind, what))


class FakeSQS:
    """Hands out prepared batches (receive ``i`` can be made to wait for ``hold[i]``); records
    receives, deletes and visibility changes; sets ``received[i]`` when receive ``i`` returns."""

    def __init__(self, batches: list[list[dict]], log: Log, s3=None, hold: dict[int, threading.Event] | None = None):
        self.batches, self.log, self.s3 = deque(batches), log, s3
        self.hold = hold or {}
        self.receiving = [threading.Event() for _ in range(len(batches) + 8)]  # receive n was called
        self.received = [threading.Event() for _ in range(len(batches) + 8)]  # receive n returned
        self.receives = 0
        self.deleted: list[str] = []
        self.visibility: list[tuple[str, int]] = []
        self.violations: list[str] = []
        self.renewed: set[str] = set()
        self.lock = threading.Condition()

    def wait_for(self, condition) -> bool:
        """Wait until ``condition(self)`` holds (checked at every visibility change)."""
        with self.lock:
            return self.lock.wait_for(lambda: condition(self), WAIT)

    def receive_message(self, **kw):
        with self.lock:
            n = self.receives
            self.receives += 1
        self.receiving[n].set()
        if n in self.hold:
            assert self.hold[n].wait(WAIT), f"receive {n} was never released"
        with self.lock:
            batch = self.batches.popleft() if self.batches else []
        self.log.add("receive", tuple(m["MessageId"] for m in batch))
        self.received[n].set()
        return {"Messages": batch}

    def delete_message_batch(self, QueueUrl, Entries):  # noqa: N803 - boto3's names
        for e in Entries:
            if self.s3 is not None and f"manifests/job-{e['ReceiptHandle'][1:]}.json" not in self.s3.written:
                self.violations.append(f"{e['ReceiptHandle']} deleted before its manifest was written")
            self.log.add("delete", e["ReceiptHandle"])
        with self.lock:
            self.deleted += [e["ReceiptHandle"] for e in Entries]
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}

    def change_message_visibility_batch(self, QueueUrl, Entries):  # noqa: N803
        with self.lock:
            self.visibility += [(e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries]
            for e in Entries:
                self.log.add("visibility", (e["ReceiptHandle"], e["VisibilityTimeout"]))
                if e["VisibilityTimeout"] == 30:  # the heartbeat's timeout in these tests
                    self.renewed.add(e["ReceiptHandle"])
            self.lock.notify_all()
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}


class FakeS3:
    def __init__(self, log: Log):
        self.log, self.written, self.lock = log, set(), threading.Lock()
        self.wanted: set[str] = set()
        self.wanted_written = threading.Event()

    def put_object(self, Bucket, Key, Body, **kw):  # noqa: N803
        with self.lock:
            self.written.add(Key)
            if self.wanted and self.wanted <= self.written:
                self.wanted_written.set()
        self.log.add("put", Key)


class StubClassifier:
    model_info = {"name": "stub", "version": "v1", "runtime": "tf"}


class FakePipeline:
    """Answers every photo with a beagle; ``during(n, keys)`` runs inside classification ``n``."""

    classifier = StubClassifier()

    def __init__(self, s3, log: Log, during=None):
        self.s3, self.log, self.during = s3, log, during
        self.calls = 0
        self.prefetched = threading.Event()
        self.prefetched_keys: list[tuple] = []

    def prefetch(self, requests):
        keys = tuple(r.ref.key for r in requests)
        self.prefetched_keys.append(keys)
        self.log.add("prefetch", keys)
        self.prefetched.set()
        return len(requests)

    def discard_prefetched(self, reads=None):
        self.log.add("discard", None)

    def answer(self, requests, deadline=None):
        n, self.calls = self.calls, self.calls + 1
        keys = tuple(r.ref.key for r in requests)
        self.log.add("classify-start", keys)
        if self.during:
            self.during(n, keys)
        self.log.add("classify-end", keys)
        return [Answer(r, ItemResult.success(r.ref.bucket, r.ref.key, breed="beagle", synset="n02088364", score=0.9,
                                             top_k=[], etag=None, version_id=None)) for r in requests]


def message(i: int) -> dict:
    return {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}",
            "Body": json.dumps({"job_id": f"job-{i}", "bucket": "photos", "keys": [f"{i}.jpg"]})}


def batches(n_batches: int, per_batch: int = 2) -> list[list[dict]]:
    return [[message(b * per_batch + j) for j in range(per_batch)] for b in range(n_batches)]


def make(n_batches: int, *, pipelined: bool = True, during=None, hold=None, **settings):
    log = Log()
    s3 = FakeS3(log)
    sqs = FakeSQS(batches(n_batches), log, s3, hold)
    pipeline = FakePipeline(s3, log, during)
    poller = Poller(sqs, pipeline, OutputSettings(),
                    PollerSettings("queue", wait_seconds=0, until_empty=True, pipelined=pipelined,
                                   queue_backoff_seconds=0, **settings))
    return poller, sqs, s3, pipeline, log


def test_receive_ahead_and_manifests_behind_overlap_classification():
    seen = {}
    s3_holder = {}

    def during(n, keys):
        if n == 0:  # batch 2 is received, and its photos prefetched, while batch 1 is classified
            seen["received ahead"] = sqs.received[1].wait(WAIT)
            seen["prefetched ahead"] = pipeline.prefetched.wait(WAIT)
            s3_holder["s3"].wanted = {"manifests/job-0.json", "manifests/job-1.json"}
        if n == 1:  # batch 1's manifests are written while batch 2 is classified
            seen["written behind"] = s3_holder["s3"].wanted_written.wait(WAIT)

    poller, sqs, s3, pipeline, log = make(3, during=during)
    s3_holder["s3"] = s3
    summary = poller.run()
    assert seen == {"received ahead": True, "prefetched ahead": True, "written behind": True}
    assert (summary.messages, summary.succeeded, summary.failed, summary.images) == (6, 6, 0, 6)
    assert len(log.of("classify-start")) == 3
    assert pipeline.prefetched_keys[0] == ("2.jpg", "3.jpg") and ("0.jpg", "1.jpg") not in pipeline.prefetched_keys
    # every message deleted once, each after its own manifest was written
    assert sorted(sqs.deleted) == [f"r{i}" for i in range(6)] and sqs.violations == []
    for i in range(6):
        assert log.index("put", f"manifests/job-{i}.json") < log.index("delete", f"r{i}")


def test_not_pipelined_runs_one_stage_at_a_time():
    poller, sqs, s3, pipeline, log = make(2, pipelined=False)
    poller.run()
    receive_2 = log.index("receive", ("m2", "m3"))
    assert log.index("put", "manifests/job-0.json") < receive_2 and log.index("put", "manifests/job-1.json") < receive_2
    assert receive_2 < log.index("classify-start", ("2.jpg", "3.jpg"))
    assert sorted(sqs.deleted) == [f"r{i}" for i in range(4)] and not log.of("prefetch")


def test_stop_finishes_the_batch_in_hand_and_hands_back_the_batch_received_ahead():
    def stop_during_first(n, keys):
        if n == 0:
            assert sqs.received[1].wait(WAIT)  # the receive ahead came back
            poller.stop()

    poller, sqs, s3, pipeline, log = make(3, during=stop_during_first)
    summary = poller.run()
    assert sorted(sqs.deleted) == ["r0", "r1"]  # the batch in hand: manifests written, deleted
    assert log.of("put") and len(log.of("classify-start")) == 1
    assert ("r2", 0) in sqs.visibility and ("r3", 0) in sqs.visibility  # visible again at once
    assert log.of("discard")  # and their prefetched photos dropped
    assert summary.succeeded == 2 and summary.handed_back == 2 and poller.in_flight.snapshot() == []
    assert len(sqs.batches) == 1  # the third batch was never received


def test_the_heartbeat_renews_the_messages_received_ahead():
    seen = {}

    def during(n, keys):
        if n == 0:  # while batch 1 (r0, r1) is classified, batch 2 (r2, r3), received ahead, is renewed too
            seen["renewed"] = sqs.wait_for(lambda q: {"r0", "r1", "r2", "r3"} <= q.renewed)

    poller, sqs, s3, pipeline, log = make(2, during=during, heartbeat_seconds=0.01, visibility_timeout=30)
    poller.run()
    assert seen == {"renewed": True}
    assert poller.in_flight.snapshot() == []  # nothing left to renew once deleted


def test_a_batch_received_after_a_stop_is_handed_back_not_classified():
    hold = {0: threading.Event()}
    poller, sqs, s3, pipeline, log = make(2, hold=hold)
    runner = threading.Thread(target=lambda: seen.setdefault("summary", poller.run()))
    seen = {}
    runner.start()
    assert sqs.receiving[0].wait(WAIT)
    poller.stop()  # while the first receive is still out (it waits for hold[0])
    hold[0].set()
    runner.join(WAIT)
    assert not runner.is_alive()
    assert log.of("classify-start") == [] and sqs.deleted == []
    assert sorted(sqs.visibility) == [("r0", 0), ("r1", 0)]  # handed back at once
    assert poller.in_flight.snapshot() == [] and seen["summary"].messages == 0
    assert seen["summary"].handed_back == 2


def test_stop_does_not_wait_for_a_long_poll_beyond_the_grace():
    hold = {1: threading.Event()}  # the receive ahead long-polls until the test lets it return

    def stop_during_first(n, keys):
        if n == 0:
            poller.stop()

    poller, sqs, s3, pipeline, log = make(2, during=stop_during_first, hold=hold, stop_grace_seconds=0.01)
    done = threading.Event()
    runner = threading.Thread(target=lambda: (poller.run(), done.set()))
    runner.start()
    assert done.wait(WAIT), "run() waited for the long poll"
    assert not sqs.received[1].is_set()  # it returned while the receive was still out
    assert sorted(sqs.deleted) == ["r0", "r1"]
    hold[1].set()  # the long poll comes back with batch 2: its thread hands it back at once
    assert sqs.received[1].wait(WAIT)
    runner.join(WAIT)
    assert sqs.wait_for(lambda q: {("r2", 0), ("r3", 0)} <= set(q.visibility))
    assert len(log.of("classify-start")) == 1


class BlockingRenewalSQS(FakeSQS):
    """The heartbeat's renewal (VisibilityTimeout 30) stays in flight until ``go`` is set; any
    other visibility change (a hand back) sets ``go`` once it is recorded."""

    def __init__(self, log):
        super().__init__([], log)
        self.renewal_started, self.go = threading.Event(), threading.Event()

    def change_message_visibility_batch(self, QueueUrl, Entries):  # noqa: N803
        if all(e["VisibilityTimeout"] == 30 for e in Entries):
            self.renewal_started.set()
            assert self.go.wait(WAIT)
            return super().change_message_visibility_batch(QueueUrl, Entries)
        response = super().change_message_visibility_batch(QueueUrl, Entries)
        self.go.set()
        return response


def test_a_renewal_in_flight_never_lands_after_a_hand_back():
    log = Log()
    sqs = BlockingRenewalSQS(log)
    poller = Poller(sqs, FakePipeline(FakeS3(log), log), OutputSettings(),
                    PollerSettings("queue", retry_delay=7, visibility_timeout=30, queue_backoff_seconds=0))
    received = [message(0)]
    poller.in_flight.add(received)
    discard = poller.in_flight.discard

    def discard_and_let_the_renewal_go(ids):
        sqs.go.set()  # a fixed poller waits here for the renewal in flight
        discard(ids)

    poller.in_flight.discard = discard_and_let_the_renewal_go
    heartbeat = Heartbeat(sqs, "queue", poller.in_flight, timeout=30, every=3600)
    beating = threading.Thread(target=heartbeat.beat)
    beating.start()
    assert sqs.renewal_started.wait(WAIT)
    failed = ClassifiedBatch([QueuedMessage("m0", received[0]["Body"])], {}, {},
                             {"m0": "transient: test"}, 0, 0.0)
    poller.finish(received, failed)
    beating.join(WAIT)
    assert [v for r, v in sqs.visibility if r == "r0"] == [30, 7]  # the hand back is the last word
    assert poller.in_flight.snapshot() == []


def test_failed_deletes_and_hand_backs_are_retried_and_a_lasting_failure_is_counted():
    from tests.fakes import MemorySQS

    log = Log()
    # r0: one failed delete, then deleted; r1: never deletable; r2 fails (bad job) and its hand back fails once
    bad = {"MessageId": "m2", "ReceiptHandle": "r2", "Body": json.dumps({"job_id": "x", "bucket": "photos"})}
    sqs = MemorySQS([[message(0), message(1), bad]], failing_deletes={"r0": 1, "r1": None},
                    failing_visibility={"r2": 1})
    s3 = FakeS3(log)
    poller = Poller(sqs, FakePipeline(s3, log), OutputSettings(),
                    PollerSettings("queue", wait_seconds=0, until_empty=True, queue_backoff_seconds=0, retry_delay=0,
                                   max_total=3))
    summary = poller.run()
    assert sqs.deleted == ["r0"] and sqs.delete_attempts == {"r0": 2, "r1": 3}
    assert summary.succeeded == 2 and summary.undeleted == 1 and summary.failed == 1
    assert "manifests/job-1.json" in s3.written  # it will be redelivered and its manifest rewritten
    assert sqs.visibility == [("r2", 0)]  # the hand back, retried


def test_an_exception_classifying_a_batch_hands_it_back_and_the_poller_goes_on():
    poller, sqs, s3, pipeline, log = make(2, retry_delay=5)
    classify = poller.classify
    calls = []

    def classify_failing_once(received):
        calls.append(received)
        if len(calls) == 1:
            raise MemoryError("test")
        return classify(received)

    poller.classify = classify_failing_once
    summary = poller.run()
    assert ("r0", 5) in sqs.visibility and ("r1", 5) in sqs.visibility
    assert sorted(sqs.deleted) == ["r2", "r3"] and summary.failed == 2 and summary.succeeded == 2


def test_a_failed_receive_is_retried():
    poller, sqs, s3, pipeline, log = make(1, receive_backoff_seconds=0)
    receive = sqs.receive_message
    calls = []

    def receive_failing_once(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise ConnectionError("SQS unreachable")
        return receive(**kw)

    sqs.receive_message = receive_failing_once
    summary = poller.run()
    assert sorted(sqs.deleted) == ["r0", "r1"] and summary.succeeded == 2


def test_the_batch_received_ahead_is_handed_back_even_when_run_is_interrupted():
    def interrupted(n, keys):
        assert sqs.received[1].wait(WAIT)  # the receive ahead came back
        raise KeyboardInterrupt  # e.g. SIGINT without the poller's handlers

    poller, sqs, s3, pipeline, log = make(3, during=interrupted)
    try:
        poller.run()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("run() swallowed a KeyboardInterrupt")
    assert ("r2", 0) in sqs.visibility and ("r3", 0) in sqs.visibility
    assert not sqs.deleted and len(sqs.batches) == 1
