"""worker.handler.lambda_handler returns exactly the failed message ids: a photo's transient
fault or failing inference fails the messages naming that photo, a malformed body fails itself,
and everything else in the event, photos shared with failing messages included, succeeds."""

from __future__ import annotations

import json

import pytest

from tests.fakes import MemoryS3, PixelClassifier, client_error, photo, photo_id_of, s3_event
from worker import handler, images
from worker.manifests import read_manifest
from worker.pipeline import Pipeline, PipelineSettings


class LambdaContext:
    function_name = "dogbreeds-worker"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:dogbreeds-worker"
    aws_request_id = "test-request"


@pytest.fixture
def world(monkeypatch):
    s3 = MemoryS3()
    for n, name in enumerate(["a", "b", "slow", "crashes"]):
        s3.add("photos", f"{name}.png", photo(50 + n))
    s3.get_faults[("photos", "slow.png")] = client_error("SlowDown", 503, "GetObject")
    crashing = photo_id_of(images.load_image(photo(53), size=(8, 8)))
    classifier = PixelClassifier({crashing: (RuntimeError("inference runtime error"), None)})
    pipeline = Pipeline(classifier, s3, PipelineSettings(batch_size=4, download_threads=2))
    monkeypatch.setattr(handler, "_pipeline", pipeline)
    monkeypatch.delenv("DOGBREEDS_OUTPUT_BUCKET", raising=False)
    monkeypatch.setenv("DOGBREEDS_OUTPUT_PREFIX", "manifests")
    yield s3
    pipeline.close()


def record(message_id: str, body: str) -> dict:
    return {"messageId": message_id, "receiptHandle": f"r-{message_id}", "body": body, "attributes": {},
            "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:photos", "awsRegion": "us-east-1"}


def job(job_id: str, *names: str) -> str:
    return json.dumps({"job_id": job_id, "bucket": "photos", "keys": [f"{n}.png" for n in names]})


def test_the_handler_reports_exactly_the_messages_whose_photos_must_be_retried(world):
    s3 = world
    event = {"Records": [
        record("ok", job("ok", "a", "b")),
        record("throttled", job("throttled", "a", "slow")),  # a is shared with "ok"
        record("crash", job("crash", "b", "crashes")),
        record("malformed", "{not json"),
        record("event", s3_event("photos", "a.png", s3.current("photos", "a.png").etag)),
        record("event-again", s3_event("photos", "a.png", s3.current("photos", "a.png").etag)),
    ]}
    response = handler.lambda_handler(event, LambdaContext())
    assert sorted(f["itemIdentifier"] for f in response["batchItemFailures"]) == ["crash", "malformed", "throttled"]
    assert [i.key for i in read_manifest(s3, "photos", "manifests/ok.json").items] == ["a.png", "b.png"]
    assert all(("photos", f"manifests/{name}.json") not in s3.objects for name in ("throttled", "crash"))
