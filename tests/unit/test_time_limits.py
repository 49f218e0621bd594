"""Time limits (worker.deadline): the Lambda handler stops taking new work a safety margin before
the invocation's end; the messages finished by then are deleted with their manifests, the others
are returned in batchItemFailures (retried), and none is half-written.

Time is a fake clock that moves only when the code under test works (a photo inferred, a read, a
PUT, a LIST page): no sleeps, no wall clock."""

from __future__ import annotations

import json
from itertools import accumulate

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fakes import FakeClock, LambdaContext, MemoryS3, PixelClassifier, TickingClassifier, label_of, photo
from tests.unit.test_batch_properties import OUT, SETTINGS, World, batches, check_message, decode_faults
from worker import handler, images
from worker.deadline import Deadline, DeadlineReached
from worker.jobs import OutputSettings, QueuedMessage, process_messages
from worker.manifests import read_manifest
from worker.pipeline import Pipeline, PipelineSettings

SAFETY_MS = 5_000
PER_PHOTO_MS = 1_000
SIZES = [2, 3, 1, 2]  # photos of the messages m0..m3, in the order of the event's records


def record(message_id: str, body: str) -> dict:
    return {"messageId": message_id, "receiptHandle": f"r-{message_id}", "body": body, "attributes": {},
            "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:photos", "awsRegion": "us-east-1"}


def jobs_world() -> tuple[MemoryS3, list[dict]]:
    s3 = MemoryS3()
    records, n = [], 0
    for m, size in enumerate(SIZES):
        keys = []
        for _ in range(size):
            key = f"deadline/{n:02d}.png"
            s3.add("photos", key, photo(300 + n))
            keys.append(key)
            n += 1
        records.append(record(f"m{m}", json.dumps({"job_id": f"job-{m}", "bucket": "photos", "keys": keys})))
    return s3, records


@pytest.fixture
def lambda_env(monkeypatch):
    monkeypatch.delenv("DOGBREEDS_OUTPUT_BUCKET", raising=False)
    monkeypatch.setenv("DOGBREEDS_OUTPUT_PREFIX", "manifests")
    monkeypatch.setenv("DOGBREEDS_LAMBDA_SAFETY_MS", str(SAFETY_MS))


@pytest.mark.parametrize("photos_in_time", range(0, sum(SIZES) + 1))
def test_messages_finished_before_the_deadline_get_manifests_and_the_rest_are_retried(lambda_env, monkeypatch,
                                                                                      photos_in_time):
    """The remaining time runs out after ``photos_in_time`` photos are inferred (one per
    micro-batch): exactly the messages whose photos all came before are done."""
    s3, records = jobs_world()
    clock = FakeClock()
    pipeline = Pipeline(TickingClassifier(clock, PER_PHOTO_MS), s3, PipelineSettings(batch_size=1, download_threads=2))
    monkeypatch.setattr(handler, "_pipeline", pipeline)
    context = LambdaContext(clock, budget_ms=SAFETY_MS + photos_in_time * PER_PHOTO_MS)
    try:
        response = handler.lambda_handler({"Records": records}, context)
    finally:
        pipeline.close()
    done = {f"m{m}" for m, end in enumerate(accumulate(SIZES)) if end <= photos_in_time}
    failed = sorted(f["itemIdentifier"] for f in response["batchItemFailures"])
    assert failed == sorted({r["messageId"] for r in records} - done)
    assert sum(len(call) for call in pipeline.classifier.calls) == photos_in_time  # no photo inferred past it
    for r in records:
        key = f"manifests/job-{r['messageId'][1:]}.json"
        if r["messageId"] not in done:  # never half-written
            assert ("photos", key) not in s3.objects
            continue
        doc = read_manifest(s3, "photos", key)
        assert [i.key for i in doc.items] == json.loads(r["body"])["keys"]
        for item in doc.items:
            pixels = images.load_image(s3.current("photos", item.key).body, size=(8, 8))
            assert item.status == "ok" and item.breed == label_of(pixels)[0].breed


def test_an_invocation_with_no_time_left_after_its_cold_start_takes_no_work(lambda_env, monkeypatch):
    s3, records = jobs_world()
    clock = FakeClock()
    pipeline = Pipeline(TickingClassifier(clock), s3, PipelineSettings(batch_size=4, download_threads=2))
    monkeypatch.setattr(handler, "_pipeline", pipeline)
    try:
        response = handler.lambda_handler({"Records": records}, LambdaContext(clock, budget_ms=SAFETY_MS - 1))
    finally:
        pipeline.close()
    assert len(response["batchItemFailures"]) == len(records)
    assert not s3.reads and not s3.puts and not pipeline.classifier.calls


def test_without_a_lambda_context_there_is_no_deadline():
    assert Deadline.of_lambda(object()) is None
    deadline = Deadline.of_lambda(LambdaContext(budget_ms=12_000), safety_ms=2_000)
    assert deadline.seconds_left() == 10.0 and not deadline.expired()
    with pytest.raises(DeadlineReached, match="deadline: a test not started"):
        Deadline.of_lambda(LambdaContext(budget_ms=2_000), safety_ms=2_000).check("a test")


def test_a_read_still_in_flight_at_the_deadline_is_not_waited_for():
    """The wait for a photo read ends at the deadline: the read's messages are retried."""
    import threading

    release = threading.Event()
    s3 = MemoryS3()
    s3.add("photos", "quick.png", photo(1))
    s3.add("photos", "stuck.png", photo(2))
    get_object = s3.get_object

    def slow_get(Bucket, Key, **kw):  # noqa: N803
        if Key == "stuck.png":
            release.wait(30)
        return get_object(Bucket=Bucket, Key=Key, **kw)

    s3.get_object = slow_get
    remaining = [60_000.0]
    deadline = Deadline(lambda: remaining[0], safety_ms=1_000)
    classifier = PixelClassifier()
    pipeline = Pipeline(classifier, s3, PipelineSettings(batch_size=1, download_threads=2))
    messages = [QueuedMessage("quick", json.dumps({"job_id": "quick", "bucket": "photos", "keys": ["quick.png"]})),
                QueuedMessage("stuck", json.dumps({"job_id": "stuck", "bucket": "photos", "keys": ["stuck.png"]}))]
    original = classifier.predict

    def predict_then_run_out(pixels):  # the deadline passes while the stuck read is out
        result = original(pixels)
        remaining[0] = 500.0
        return result

    classifier.predict = predict_then_run_out
    try:
        outcome = process_messages(messages, pipeline, OutputSettings(), deadline)
    finally:
        release.set()
        pipeline.close()
    assert outcome.succeeded_ids == ["quick"] and outcome.failed_ids == ["stuck"]
    assert next(o for o in outcome.outcomes if o.message_id == "stuck").reason.startswith("deadline")
    assert ("photos", "manifests/stuck.json") not in s3.objects


# --------------------------------------------------------------------------- #
# the property: a deadline at every step of random batches
# --------------------------------------------------------------------------- #

def ticking(world: World, clock: FakeClock) -> None:
    """Every S3 call and every photo inferred costs one step of fake time."""
    s3 = world.s3
    s3.get_object = clock.ticking(s3.get_object)
    s3.put_object = clock.ticking(s3.put_object)
    paginator = s3.get_paginator

    def get_paginator(name):
        pages = paginator(name)

        class Ticking:
            def paginate(self, **kw):
                for page in pages.paginate(**kw):
                    clock.tick()
                    yield page

        return Ticking()

    s3.get_paginator = get_paginator
    predict = world.classifier.predict

    def predict_ticking(pixels):  # what the pipeline calls
        clock.tick(1000.0 * len(pixels))
        return predict(pixels)

    world.classifier.predict = predict_ticking


@SETTINGS
@given(batches(), st.integers(0, 14), st.integers(1, 4), st.integers(1, 3))
def test_at_any_deadline_a_message_is_either_done_right_or_retried_and_never_half_written(
        example, steps, batch_size, threads):
    world, specs, bodies, manifest_keys = example
    clock = FakeClock()
    ticking(world, clock)
    deadline = Deadline(lambda: 500.0 + steps * 1000.0 - clock.now_ms, safety_ms=500.0)
    pipeline = Pipeline(world.classifier, world.s3, PipelineSettings(batch_size=batch_size, download_threads=threads))
    messages = [QueuedMessage(f"m{i}", body) for i, body in enumerate(bodies)]
    try:
        with decode_faults(world):
            outcome = process_messages(messages, pipeline, OutputSettings(bucket=OUT), deadline)
    finally:
        pipeline.close()
    assert [o.message_id for o in outcome.outcomes] == [m.message_id for m in messages]
    written_by_a_success = {manifest_keys[i] for i, o in enumerate(outcome.outcomes) if o.ok and i in manifest_keys}
    for i, (spec, o) in enumerate(zip(specs, outcome.outcomes)):
        if o.ok or not o.reason.startswith("deadline"):
            check_message(world, spec, manifest_keys.get(i), o.ok, world.s3)  # as if there were no deadline
            continue
        # stopped by the deadline: retried, and no manifest of its own (unless a twin message wrote it)
        assert manifest_keys.get(i) in written_by_a_success or (OUT, manifest_keys.get(i)) not in world.s3.objects
    stopped = sum(1 for o in outcome.outcomes if o.reason and o.reason.startswith("deadline"))
    event(f"messages stopped by the deadline: {'none' if not stopped else 'all' if stopped == len(messages) else 'some'}")
    if not stopped:
        return
    # no work was submitted past the deadline: what the clock counts after it is at most the reads
    # already submitted (one look-ahead window), the micro-batch started just before, and the
    # manifest PUTs of the messages that were done
    window = PipelineSettings(batch_size=batch_size, download_threads=threads).window
    assert clock.now_ms <= (steps + window + batch_size + len(messages) + 1) * 1000.0


def test_the_property_oracle_sees_a_deadline_stop_work(monkeypatch):
    """A sanity check of the property's setup: with no time at all, every message with photos
    is retried and nothing is read."""
    world = World(versioned=False)
    world.s3.add("photos", "a.png", world.new_photo())
    clock = FakeClock()
    ticking(world, clock)
    pipeline = Pipeline(world.classifier, world.s3, PipelineSettings(batch_size=1, download_threads=1))
    body = json.dumps({"job_id": "j", "bucket": "photos", "keys": ["a.png"]})
    try:
        outcome = process_messages([QueuedMessage("m", body)], pipeline, OutputSettings(bucket=OUT),
                                   Deadline(lambda: 0.0, safety_ms=500.0))
    finally:
        pipeline.close()
    assert outcome.failed_ids == ["m"] and clock.now_ms == 0
