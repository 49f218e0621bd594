"""worker.poller.Poller: the next receive and the previous batch's manifests overlap the
classification of the current batch; messages received ahead are covered by the heartbeat and
handed back on stop; a message is deleted only after its manifest is written."""

from __future__ import annotations

import json
import threading
import time
from collections import deque

from worker.jobs import OutputSettings
from worker.manifests import ItemResult
from worker.poller import Poller, PollerSettings

CLASSIFY_S = 0.3
PUT_S = 0.2


class Timeline:
    def __init__(self):
        self.lock, self.events = threading.Lock(), []
        self.t0 = time.perf_counter()

    def add(self, kind: str, what, start: float, end: float) -> None:
        with self.lock:
            self.events.append((kind, what, start - self.t0, end - self.t0))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


class FakeSQS:
    """Hands out prepared batches; records receives, deletes and visibility changes."""

    def __init__(self, batches: list[list[dict]], timeline: Timeline):
        self.batches, self.timeline = deque(batches), timeline
        self.deleted: list[str] = []
        self.visibility: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def receive_message(self, **kw):
        start = time.perf_counter()
        with self.lock:
            batch = self.batches.popleft() if self.batches else []
        self.timeline.add("receive", [m["MessageId"] for m in batch], start, time.perf_counter())
        return {"Messages": batch}

    def delete_message_batch(self, QueueUrl, Entries):  # noqa: N803 - boto3's names
        with self.lock:
            self.deleted += [e["ReceiptHandle"] for e in Entries]
        now = time.perf_counter()
        self.timeline.add("delete", [e["ReceiptHandle"] for e in Entries], now, now)
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}

    def change_message_visibility_batch(self, QueueUrl, Entries):  # noqa: N803
        now = time.perf_counter()
        with self.lock:
            self.visibility += [(e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries]
        self.timeline.add("visibility", [(e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries], now, now)
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}


class SlowS3:
    def __init__(self, timeline: Timeline):
        self.timeline = timeline

    def put_object(self, Bucket, Key, Body, **kw):  # noqa: N803
        start = time.perf_counter()
        time.sleep(PUT_S)
        self.timeline.add("put", Key, start, time.perf_counter())


class StubClassifier:
    model_info = {"name": "stub", "version": "v1", "runtime": "tf"}


class SlowPipeline:
    """Classifies every photo as a beagle, taking CLASSIFY_S per call (the inference)."""

    classifier = StubClassifier()

    def __init__(self, s3, timeline: Timeline, on_classify=None):
        self.s3, self.timeline, self.on_classify = s3, timeline, on_classify

    def prefetch(self, refs):
        now = time.perf_counter()
        self.timeline.add("prefetch", [r.key for r in refs], now, now)
        return len(refs)

    def discard_prefetched(self, refs=None):
        now = time.perf_counter()
        self.timeline.add("discard", None, now, now)

    def classify(self, refs):
        start = time.perf_counter()
        if self.on_classify:
            self.on_classify(refs)
        time.sleep(CLASSIFY_S)
        self.timeline.add("classify", [r.key for r in refs], start, time.perf_counter())
        return [ItemResult.success(r.bucket, r.key, breed="beagle", synset="n02088364", score=0.9, top_k=[],
                                   etag=None, version_id=None, timings_ms={"infer": 1.0}) for r in refs]


def message(i: int) -> dict:
    return {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}",
            "Body": json.dumps({"job_id": f"job-{i}", "bucket": "photos", "keys": [f"{i}.jpg"]})}


def batches(n_batches: int, per_batch: int = 2) -> list[list[dict]]:
    return [[message(b * per_batch + j) for j in range(per_batch)] for b in range(n_batches)]


def make(n_batches: int, *, pipelined: bool = True, on_classify=None, **settings):
    timeline = Timeline()
    sqs = FakeSQS(batches(n_batches), timeline)
    pipeline = SlowPipeline(SlowS3(timeline), timeline, on_classify)
    poller = Poller(sqs, pipeline, OutputSettings(),
                    PollerSettings("queue", wait_seconds=0, until_empty=True, pipelined=pipelined, **settings))
    return poller, sqs, timeline


def test_receive_ahead_and_manifests_behind_overlap_classification():
    poller, sqs, timeline = make(3)
    summary = poller.run()
    assert (summary.messages, summary.succeeded, summary.failed, summary.images) == (6, 6, 0, 6)
    classify, receives, puts = timeline.of("classify"), timeline.of("receive"), timeline.of("put")
    assert len(classify) == 3
    # the receive of batch 2 ran while batch 1 was classified, and its photos were prefetched then
    assert receives[1][1] == ["m2", "m3"] and receives[1][2] < classify[0][3]
    prefetched = {tuple(e[1]): e[2] for e in timeline.of("prefetch")}
    assert prefetched[("2.jpg", "3.jpg")] < classify[0][3] and ("0.jpg", "1.jpg") not in prefetched
    # batch 1's manifests were written while batch 2 was classified
    first_puts = [p for p in puts if p[1] in ("manifests/job-0.json", "manifests/job-1.json")]
    assert all(p[2] < classify[1][3] and p[3] > classify[1][2] for p in first_puts)
    # every message deleted once, each after its own manifest was written
    assert sorted(sqs.deleted) == [f"r{i}" for i in range(6)]
    put_end = {p[1]: p[3] for p in puts}
    for kind, receipts, at, _ in timeline.of("delete"):
        for receipt in receipts:
            assert put_end[f"manifests/job-{receipt[1:]}.json"] <= at
    # three classifications of 0.3 s and three manifest rounds of 0.2 s: overlapped, not summed
    last_delete = max(e[2] for e in timeline.of("delete"))
    assert last_delete < 3 * (CLASSIFY_S + PUT_S)


def test_not_pipelined_runs_one_stage_at_a_time():
    poller, sqs, timeline = make(2, pipelined=False)
    poller.run()
    classify, receives, puts = timeline.of("classify"), timeline.of("receive"), timeline.of("put")
    assert receives[1][2] >= max(p[3] for p in puts if p[1] in ("manifests/job-0.json", "manifests/job-1.json"))
    assert classify[1][2] >= receives[1][3]
    assert sorted(sqs.deleted) == [f"r{i}" for i in range(4)] and not timeline.of("prefetch")


def test_stop_finishes_the_batch_in_hand_and_hands_back_the_batch_received_ahead():
    poller = None

    def stop_during_first(refs):
        if refs[0].key == "0.jpg":
            time.sleep(0.1)  # let the receive ahead come back
            poller.stop()

    poller, sqs, timeline = make(3, on_classify=stop_during_first)
    summary = poller.run()
    assert sorted(sqs.deleted) == ["r0", "r1"]  # the batch in hand: manifests written, deleted
    assert [p[1] for p in timeline.of("put")] and len(timeline.of("classify")) == 1
    assert ("r2", 0) in sqs.visibility and ("r3", 0) in sqs.visibility  # visible again at once
    assert timeline.of("discard")  # and their prefetched photos dropped
    assert summary.succeeded == 2 and poller.in_flight.snapshot() == []
    assert len(sqs.batches) == 1  # the third batch was never received


def test_the_heartbeat_renews_the_messages_received_ahead():
    poller, sqs, timeline = make(2, heartbeat_seconds=0.05, visibility_timeout=30)
    poller.run()
    first_classify_end = timeline.of("classify")[0][3]
    renewed_early = {receipt for _, entries, at, _ in timeline.of("visibility") if at < first_classify_end
                     for receipt, timeout in entries if timeout == 30}
    # while batch 1 (r0, r1) was classified, batch 2 (r2, r3), received ahead, was renewed too
    assert {"r0", "r1", "r2", "r3"} <= renewed_early
    assert poller.in_flight.snapshot() == []  # nothing left to renew once deleted
