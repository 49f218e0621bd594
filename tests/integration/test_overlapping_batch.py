"""The batch of issue 12 end to end, on moto's server (real HTTP): six overlapping job messages
(one naming a key twice, one an awkward key) and five S3 events (one delivered twice, one naming
a job's photo again), through `dogbreeds-worker run` and through the Lambda handler. Every
message's manifest lists exactly its own photos, each with the breed that photo gets alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import numpy as np
import pytest

from infra.local_stack import create_stack
from tests.conftest import COLOUR_BREEDS, ROOT, colour_photo
from tests.fakes import s3_event
from worker.messages import parse_message

pytestmark = pytest.mark.integration
BUCKET = "photos"
ODD_KEY = "odd dir/dog photo+1 é (copy).jpg"


@pytest.fixture
def stack(moto_server):
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    created = create_stack(s3, sqs, bucket=BUCKET, queue="photos", max_receive_count=2)
    return {"s3": s3, "sqs": sqs, "queue": created.queue_url, "dlq": created.dlq_url}


def issue_batch(s3) -> tuple[dict[str, str], list[str]]:
    """Photos a..h, the odd key and four event photos; the twelve message bodies."""
    colours = list(COLOUR_BREEDS.values())
    keys = {name: f"batch/{name}.jpg" for name in "abcdefgh"} | {"odd": ODD_KEY}
    keys |= {name: f"events/{name}.jpg" for name in "ijkl"}
    for n, key in enumerate(keys.values()):
        s3.put_object(Bucket=BUCKET, Key=key, Body=colour_photo(colours[n % 3], seed=200 + n))
    jobs = {"j1": ["a", "b"], "j2": ["b", "c"], "j3": ["a"], "j4": ["d", "d"], "j5": ["e", "f", "g", "a"],
            "j6": ["h", "odd"]}
    bodies = [json.dumps({"job_id": job, "bucket": BUCKET, "keys": [keys[k] for k in names]})
              for job, names in jobs.items()]
    events = []
    for n, name in enumerate(["i", "j", "k", "l", "b"]):
        etag = s3.head_object(Bucket=BUCKET, Key=keys[name])["ETag"].strip('"')
        events.append(s3_event(BUCKET, keys[name], etag, sequencer=f"{n:02d}", sns=name == "j"))
    bodies += events + [events[2]]  # the event of k, delivered twice
    return keys, bodies


def breeds_alone(s3, keys, artifact) -> dict[str, str]:
    """The breed each photo gets classified on its own."""
    from worker import images
    from worker.classifier import Classifier

    classifier = Classifier.load(str(artifact))
    alone = {}
    for key in keys.values():
        data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        pixels = images.load_image(data, size=classifier.input_size, fit=classifier.input_fit)
        alone[key] = classifier.classify(np.stack([pixels]))[0][0].breed
    return alone


def check_manifests(s3, bodies, alone, prefix: str) -> None:
    for body in bodies:
        job = parse_message(body)
        doc = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/{job.job_id}.json")["Body"].read())
        wanted = sorted({ref.key for ref in job.refs})
        assert [item["key"] for item in doc["items"]] == wanted, job.job_id
        for item in doc["items"]:
            assert item["status"] == "ok" and item["breed"] == alone[item["key"]], (job.job_id, item)
            assert item["etag"] == s3.head_object(Bucket=BUCKET, Key=item["key"])["ETag"].strip('"')
    # j4 names d twice: one item; the awkward key is read and named as sent
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/j4.json")["Body"].read())["counts"] == {
        "ok": 1, "error": 0, "no_dog": 0, "uncertain": 0}


def test_the_overlapping_batch_through_the_worker_command(stack, colour_artifact):
    s3, sqs = stack["s3"], stack["sqs"]
    keys, bodies = issue_batch(s3)
    for body in bodies:
        sqs.send_message(QueueUrl=stack["queue"], MessageBody=body)
    env = {**os.environ, "DOGBREEDS_MODEL": str(colour_artifact), "DOGBREEDS_QUEUE_URL": stack["queue"]}
    process = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--wait-seconds", "1", "--until-empty",
                              "--retry-delay", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stderr.strip().splitlines()[-1])["summary"]
    assert summary["failed"] == 0 and summary["succeeded"] == summary["messages"] == len(bodies) + 1  # + TestEvent
    check_manifests(s3, bodies, breeds_alone(s3, keys, colour_artifact), "manifests")
    attrs = sqs.get_queue_attributes(QueueUrl=stack["queue"], AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert not sqs.receive_message(QueueUrl=stack["dlq"], MaxNumberOfMessages=10).get("Messages")


def test_the_overlapping_batch_through_the_lambda_handler(stack, colour_artifact, monkeypatch):
    from worker import handler

    s3 = stack["s3"]
    keys, bodies = issue_batch(s3)
    event = {"Records": [{"messageId": f"message-{i}", "receiptHandle": f"receipt-{i}", "body": body,
                          "attributes": {}, "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                          "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:photos", "awsRegion": "us-east-1"}
                         for i, body in enumerate(bodies)]}
    monkeypatch.setenv("DOGBREEDS_MODEL", str(colour_artifact))
    monkeypatch.setenv("DOGBREEDS_OUTPUT_PREFIX", "lambda")
    monkeypatch.setattr(handler, "_pipeline", None)
    response = handler.lambda_handler(event, LambdaContext())
    assert response == {"batchItemFailures": []}
    check_manifests(s3, bodies, breeds_alone(s3, keys, colour_artifact), "lambda")


class LambdaContext:
    function_name = "dogbreeds-worker"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:dogbreeds-worker"
    aws_request_id = "test-request"
