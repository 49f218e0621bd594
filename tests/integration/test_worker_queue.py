"""The worker against moto's server mode (real HTTP on 127.0.0.1): S3 notifications on
incoming/ -> SQS -> poller / Lambda handler -> JSON manifests in S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from infra.local_stack import create_stack
from tests.conftest import COLOUR_BREEDS, ROOT, colour_photo

pytestmark = pytest.mark.integration
BUCKET = "photos"


@pytest.fixture
def stack(moto_server):
    """Bucket with an incoming/ -> queue notification, queue with a DLQ (maxReceiveCount 2)."""
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    created = create_stack(s3, sqs, bucket=BUCKET, queue="photos", max_receive_count=2)
    return {"s3": s3, "sqs": sqs, "queue": created.queue_url, "dlq": created.dlq_url, "endpoint": moto_server}


def make_pipeline(artifact_path, s3, batch_size=4):
    from worker.classifier import Classifier
    from worker.pipeline import Pipeline, PipelineSettings

    return Pipeline(Classifier.load(str(artifact_path)), s3, PipelineSettings(batch_size=batch_size, download_threads=4))


def run_poller(stack, pipeline, **kw):
    from worker.jobs import OutputSettings
    from worker.poller import Poller, PollerSettings

    settings = PollerSettings(stack["queue"], wait_seconds=1, retry_delay=0, until_empty=True, **kw)
    return Poller(stack["sqs"], pipeline, OutputSettings(prefix="manifests"), settings).run()


def manifests_in(s3) -> dict[str, dict]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="manifests/").get("Contents", [])
    return {o["Key"]: json.loads(s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()) for o in listed}


def put_colour_photos(s3, n_per_breed=2):
    expected = {}
    for i, (folder, rgb) in enumerate(COLOUR_BREEDS.items()):
        for j in range(n_per_breed):
            key = f"incoming/{folder.split('-', 1)[1]} photo {j}+{i}.jpg"  # spaces and plus: URL-encoded in events
            s3.put_object(Bucket=BUCKET, Key=key, Body=colour_photo(rgb, seed=100 + j))
            expected[key] = folder.split("-", 1)[1].replace("_", " ")
    return expected


def test_photos_dropped_in_incoming_end_up_in_manifests_with_the_right_breeds(stack, colour_artifact):
    s3 = stack["s3"]
    expected = put_colour_photos(s3)
    s3.put_object(Bucket=BUCKET, Key="incoming/broken.jpg", Body=colour_photo((1, 2, 3))[:300])  # truncated
    s3.put_object(Bucket=BUCKET, Key="elsewhere/ignored.jpg", Body=colour_photo((1, 2, 3)))  # not under incoming/
    pipeline = make_pipeline(colour_artifact, s3)
    summary = run_poller(stack, pipeline)
    pipeline.close()

    found = {item["key"]: item for doc in manifests_in(s3).values() for item in doc["items"]}
    assert set(found) == set(expected) | {"incoming/broken.jpg"}
    for key, breed in expected.items():
        assert found[key]["status"] == "ok" and found[key]["breed"] == breed, found[key]
        assert found[key]["top_k"][0]["breed"] == breed and found[key]["etag"]
    assert found["incoming/broken.jpg"]["status"] == "error"
    assert found["incoming/broken.jpg"]["error_code"] == "truncated"
    assert summary.failed == 0 and summary.images == len(expected) + 1
    # every message deleted (TestEvent included), nothing in the DLQ
    attrs = stack["sqs"].get_queue_attributes(QueueUrl=stack["queue"], AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_a_redelivered_message_overwrites_one_manifest_with_identical_content(stack, colour_artifact):
    s3, sqs = stack["s3"], stack["sqs"]
    put_colour_photos(s3, n_per_breed=1)
    run_poller(stack, make_pipeline(colour_artifact, s3))  # drain the notifications
    before = manifests_in(s3)
    body = json.dumps({"job_id": "job-42", "bucket": BUCKET, "keys": sorted(k for k in
                       [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="incoming/")["Contents"]])})
    pipeline = make_pipeline(colour_artifact, s3)
    sqs.send_message(QueueUrl=stack["queue"], MessageBody=body)
    run_poller(stack, pipeline)
    first = s3.get_object(Bucket=BUCKET, Key="manifests/job-42.json")["Body"].read()
    sqs.send_message(QueueUrl=stack["queue"], MessageBody=body)  # the same message again
    run_poller(stack, pipeline)
    second = s3.get_object(Bucket=BUCKET, Key="manifests/job-42.json")["Body"].read()
    assert first == second
    after = manifests_in(s3)
    assert set(after) - set(before) == {"manifests/job-42.json"}
    assert json.loads(first)["counts"] == {"ok": 3, "error": 0, "no_dog": 0, "uncertain": 0}


def test_a_malformed_message_goes_to_the_dlq_and_others_are_unaffected(stack, colour_artifact):
    s3, sqs = stack["s3"], stack["sqs"]
    s3.put_object(Bucket=BUCKET, Key="batch/a.jpg", Body=colour_photo(COLOUR_BREEDS["n02111889-Samoyed"]))
    sqs.send_message(QueueUrl=stack["queue"], MessageBody="{not json")
    sqs.send_message(QueueUrl=stack["queue"], MessageBody=json.dumps({"job_id": "good", "bucket": BUCKET,
                                                                      "keys": ["batch/a.jpg"]}))
    pipeline = make_pipeline(colour_artifact, s3)
    summary = run_poller(stack, pipeline)
    assert summary.failed == 2  # received twice (maxReceiveCount 2), failed twice
    dead = sqs.receive_message(QueueUrl=stack["dlq"], MaxNumberOfMessages=10).get("Messages", [])
    assert [m["Body"] for m in dead] == ["{not json"]
    good = json.loads(s3.get_object(Bucket=BUCKET, Key="manifests/good.json")["Body"].read())
    assert good["items"][0]["breed"] == "Samoyed"


def test_lambda_handler_reports_exactly_the_failed_message_ids(stack, colour_artifact, monkeypatch):
    from worker import handler

    s3, sqs = stack["s3"], stack["sqs"]
    put_colour_photos(s3, n_per_breed=1)
    sqs.send_message(QueueUrl=stack["queue"], MessageBody=json.dumps({"job_id": "no keys", "bucket": BUCKET}))
    sqs.send_message(QueueUrl=stack["queue"], MessageBody="plain text")
    received = []
    for _ in range(5):  # an event-source-mapping-like poll: gather up to 10 records
        received += sqs.receive_message(QueueUrl=stack["queue"], MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                        VisibilityTimeout=60).get("Messages", [])
        if len(received) >= 6:
            break
    bad = {m["MessageId"] for m in received if not m["Body"].startswith(("{\"Records", "{\"Service"))}
    assert len(bad) == 2
    event = {"Records": [{"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
                          "attributes": {}, "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
                          "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:photos",
                          "awsRegion": "us-east-1"} for m in received]}
    monkeypatch.setenv("DOGBREEDS_MODEL", str(colour_artifact))
    monkeypatch.setattr(handler, "_pipeline", None)
    response = handler.lambda_handler(event, LambdaContext())
    assert {f["itemIdentifier"] for f in response["batchItemFailures"]} == bad
    found = {item["key"]: item["breed"] for doc in manifests_in(s3).values() for item in doc["items"]}
    assert len(found) == 3 and set(found.values()) == {"Chihuahua", "Samoyed", "beagle"}


class LambdaContext:
    function_name = "dogbreeds-worker"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:dogbreeds-worker"
    aws_request_id = "test-request"


def test_the_worker_command_drains_the_queue_and_stops_on_sigterm(stack, colour_artifact):
    s3 = stack["s3"]
    expected = put_colour_photos(s3, n_per_breed=1)
    env = {**os.environ, "DOGBREEDS_MODEL": str(colour_artifact), "DOGBREEDS_QUEUE_URL": stack["queue"]}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", "--wait-seconds", "1"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            done = {i["key"] for d in manifests_in(s3).values() for i in d["items"]}
            if set(expected) <= done:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert set(expected) <= done
    assert '"summary"' in err and "stop requested" in out + err


def test_a_long_prefix_job_is_split_into_pages_sent_back_to_its_queue_by_the_lambda_and_the_poller(
        stack, colour_artifact, monkeypatch):
    """Two prefix jobs of 10 photos with pages of 4: one through the Lambda handler (its record
    names the queue by ARN), one through `dogbreeds-worker run`; the pages go back to the queue,
    the worker classifies them, and each prefix job's manifest names its 3 pages, whose manifests
    together list exactly its photos, each with its breed."""
    from worker import handler

    s3, sqs = stack["s3"], stack["sqs"]
    colours = list(COLOUR_BREEDS.items())
    expected = {}
    for shoot in ("lambda", "poller"):
        for i in range(10):
            folder, rgb = colours[i % 3]
            key = f"shoots/{shoot}/{i:02d} {folder.split('-', 1)[1]}+é.jpg"
            s3.put_object(Bucket=BUCKET, Key=key, Body=colour_photo(rgb, seed=400 + i))
            expected[key] = folder.split("-", 1)[1]
    arn = sqs.get_queue_attributes(QueueUrl=stack["queue"], AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    body = json.dumps({"job_id": "shoot-lambda", "bucket": BUCKET, "prefix": "shoots/lambda/"})
    event = {"Records": [{"messageId": "m-1", "receiptHandle": "r-1", "body": body, "attributes": {},
                          "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": arn,
                          "awsRegion": "us-east-1"}]}
    monkeypatch.setenv("DOGBREEDS_MODEL", str(colour_artifact))
    monkeypatch.setenv("DOGBREEDS_PREFIX_PAGE_KEYS", "4")
    monkeypatch.setattr(handler, "_pipeline", None)
    monkeypatch.setattr(handler, "_sqs", None)
    assert handler.lambda_handler(event, LambdaContext())["batchItemFailures"] == []
    sqs.send_message(QueueUrl=stack["queue"], MessageBody=json.dumps({"job_id": "shoot-poller", "bucket": BUCKET,
                                                                      "prefix": "shoots/poller/"}))
    env = {**os.environ, "DOGBREEDS_MODEL": str(colour_artifact), "DOGBREEDS_QUEUE_URL": stack["queue"]}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--wait-seconds", "1", "--until-empty",
                           "--prefix-page-keys", "4", "--retry-delay", "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    docs = manifests_in(s3)
    for shoot in ("lambda", "poller"):
        parent = docs.pop(f"manifests/shoot-{shoot}.json")
        assert parent["schema_version"] == 3 and parent["items"] == [] and parent["error"] is None
        assert [c["photos"] for c in parent["continuations"]] == [4, 4, 2]
        found = []
        for page in parent["continuations"]:
            doc = docs.pop(page["manifest"].split("/", 3)[3])
            assert doc["job_id"] == page["job_id"] and doc["source"] == "job"
            found += [(item["key"], item["status"], item["breed"]) for item in doc["items"]]
        assert found == [(k, "ok", b) for k, b in sorted(expected.items()) if k.startswith(f"shoots/{shoot}/")]
    assert not docs or all(doc["source"] == "s3-event" for doc in docs.values())  # only the TestEvent's, if any
    attrs = sqs.get_queue_attributes(QueueUrl=stack["queue"], AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
