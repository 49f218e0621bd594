"""worker.jobs.process_messages: one manifest per job, written concurrently; a failed write fails
only its own message."""

from __future__ import annotations

import json
import threading
import time

from worker.jobs import MANIFEST_WRITERS, OutputSettings, QueuedMessage, process_messages
from worker.manifests import ItemResult


class SlowS3:
    """put_object takes a while and records how many calls overlap; one key can be made to fail."""

    def __init__(self, fail_key: str | None = None):
        self.lock, self.active, self.most, self.keys = threading.Lock(), 0, 0, []
        self.fail_key = fail_key

    def put_object(self, Bucket, Key, Body, **kw):  # noqa: N803 - boto3's names
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.2)
            if Key == self.fail_key:
                raise ConnectionError("PUT failed")
            with self.lock:
                self.keys.append(Key)
        finally:
            with self.lock:
                self.active -= 1


class StubClassifier:
    model_info = {"name": "stub", "version": "v1", "runtime": "tf"}


class StubPipeline:
    classifier = StubClassifier()

    def __init__(self, s3):
        self.s3 = s3

    def classify(self, refs):
        return [ItemResult.success(r.bucket, r.key, breed="beagle", synset="n02088364", score=0.9, top_k=[],
                                   etag=None, version_id=None, timings_ms={"infer": 1.0}) for r in refs]


def job_message(i: int) -> QueuedMessage:
    return QueuedMessage(f"m{i}", json.dumps({"job_id": f"job-{i}", "bucket": "photos", "keys": [f"{i}.jpg"]}))


def test_manifests_of_a_batch_are_written_concurrently():
    s3 = SlowS3()
    outcome = process_messages([job_message(i) for i in range(10)], StubPipeline(s3), OutputSettings())
    assert [o.ok for o in outcome.outcomes] == [True] * 10
    assert sorted(s3.keys) == sorted(f"manifests/job-{i}.json" for i in range(10))
    assert 1 < s3.most <= MANIFEST_WRITERS  # overlapping PUTs, bounded


def test_a_failed_manifest_write_fails_only_its_message():
    s3 = SlowS3(fail_key="manifests/job-3.json")
    outcome = process_messages([job_message(i) for i in range(6)], StubPipeline(s3), OutputSettings())
    assert outcome.failed_ids == ["m3"] and len(outcome.succeeded_ids) == 5
    assert next(o for o in outcome.outcomes if o.message_id == "m3").reason.startswith("write: ")
