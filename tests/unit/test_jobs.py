"""worker.jobs.process_messages: one manifest per job, written concurrently; a failed write fails
only its own message."""

from __future__ import annotations

import json
import threading
import time

from worker.jobs import MANIFEST_WRITERS, OutputSettings, QueuedMessage, process_messages
from worker.manifests import ItemResult
from worker.pipeline import Answer


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

    def answer(self, requests, deadline=None):
        return [Answer(r, ItemResult.success(r.ref.bucket, r.ref.key, breed="beagle", synset="n02088364", score=0.9,
                                             top_k=[], etag=None, version_id=None, timings_ms={"infer": 1.0}))
                for r in requests]


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


# --------------------------------------------------------------------------- #
# The batch of issue 12: one photo named by several messages of one batch
# --------------------------------------------------------------------------- #

ODD_KEY = "odd dir/dog photo+1 é (copy).jpg"


def issue_12_batch(s3):
    """Six overlapping job messages and five S3 events (one delivered twice, one naming b again)."""
    from tests.fakes import photo, s3_event

    keys = {name: f"batch/{name}.png" for name in "abcdefgh"} | {"odd": ODD_KEY}
    keys |= {name: f"incoming/{name}.png" for name in ("i", "j", "k", "l")}
    for n, key in enumerate(keys.values()):
        s3.add("photos", key, photo(1000 + n))
    jobs = {"j1": "ab", "j2": "bc", "j3": "a", "j4": "dd", "j5": "efga"}
    bodies = [(f"m-{job}", json.dumps({"job_id": job, "bucket": "photos", "keys": [keys[k] for k in names]}))
              for job, names in jobs.items()]
    bodies.append(("m-j6", json.dumps({"job_id": "j6", "bucket": "photos", "keys": [keys["h"], ODD_KEY]})))
    for name in ("i", "j", "k", "l", "b"):
        key = keys[name]
        bodies.append((f"m-ev-{name}", s3_event("photos", key, s3.current("photos", key).etag, sns=name == "j")))
    bodies.append(("m-ev-k-again", s3_event("photos", keys["k"], s3.current("photos", keys["k"]).etag)))
    return keys, [QueuedMessage(mid, body) for mid, body in bodies]


def expected_keys(body: str) -> list[str]:
    from worker.messages import parse_message

    return sorted({ref.key for ref in parse_message(body).refs})


def test_every_manifest_of_an_overlapping_batch_lists_its_own_photos_with_their_own_labels():
    from tests.fakes import MemoryS3, PixelClassifier, label_of
    from worker import images
    from worker.manifests import read_manifest
    from worker.pipeline import Pipeline, PipelineSettings

    s3 = MemoryS3()
    keys, messages = issue_12_batch(s3)
    pipeline = Pipeline(PixelClassifier(), s3, PipelineSettings(batch_size=4, download_threads=3))
    try:
        outcome = process_messages(messages, pipeline, OutputSettings())
    finally:
        pipeline.close()
    assert outcome.failed_ids == []
    # each photo named in the batch was read once, however many messages named it
    assert set(s3.reads.values()) == {1} and len(s3.reads) == len(keys) and outcome.images == len(keys)
    by_id = {o.message_id: o for o in outcome.outcomes}
    for message in messages:
        manifest_uri = by_id[message.message_id].manifest
        doc = read_manifest(s3, "photos", manifest_uri.split("/", 3)[3])
        assert [item.key for item in doc.items] == expected_keys(message.body), message.message_id
        for item in doc.items:
            pixels = images.load_image(s3.current("photos", item.key).body, size=(8, 8))
            assert item.status == "ok" and item.breed == label_of(pixels)[0].breed, (message.message_id, item.key)


class PoisonPipeline(StubPipeline):
    """Raises (a bug outside the per-photo isolation) whenever it is asked for poison.png."""

    def __init__(self, s3):
        super().__init__(s3)
        self.calls = []

    def answer(self, requests, deadline=None):
        self.calls.append(sorted({r.message_id for r in requests}))
        if any(r.ref.key == "poison.png" for r in requests):
            raise RuntimeError("a bug")
        return super().answer(requests)


def test_an_exception_in_the_shared_classification_fails_only_the_messages_whose_own_classification_raises():
    s3 = SlowS3()
    poisoned = QueuedMessage("m-poison", json.dumps({"job_id": "p", "bucket": "photos", "keys": ["poison.png"]}))
    pipeline = PoisonPipeline(s3)
    outcome = process_messages([job_message(0), poisoned, job_message(1)], pipeline, OutputSettings())
    assert outcome.failed_ids == ["m-poison"] and outcome.succeeded_ids == ["m0", "m1"]
    assert pipeline.calls[0] == ["m-poison", "m0", "m1"]  # one shared pass first, then message by message
    assert sorted(s3.keys) == ["manifests/job-0.json", "manifests/job-1.json"]
