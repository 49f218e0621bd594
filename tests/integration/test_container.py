"""The worker's container image (infra/Dockerfile), run for real against a moto server on
127.0.0.1 (the containers share the host network):

(a) the Lambda entry point (python -m awslambdaric worker.handler.lambda_handler) under the AWS
    Lambda Runtime Interface Emulator, fed with the queue's messages by a small event source
    mapping (receive, build the SQS event, invoke, delete what succeeded, leave the
    batchItemFailures), with Lambda's read-only filesystem (only /tmp writable);
(b) the poller entry point (dogbreeds-worker run --until-empty) of the same image.

Two images run these tests (DOGBREEDS_CONTAINER_FLAVOUR): ``full`` (TensorFlow + OpenVINO) serves
a TensorFlow-only model with TensorFlow (opted in: DOGBREEDS_ALLOW_SAVEDMODEL=1); ``lite`` (the
worker-lite extra, no TensorFlow in the image) serves a model published with its OpenVINO variants,
and every manifest must say so. Both serve a signed artifact, pinned by version as the template
pins it, and verify it against the public key they are given (DOGBREEDS_TRUSTED_KEY, inline PEM).

Built and run by `infra/container.sh build` / `infra/container.sh test`, which sets
DOGBREEDS_CONTAINER_IMAGE (the image), DOGBREEDS_CONTAINER_ENGINE (podman; docker works too) and
DOGBREEDS_LAMBDA_RIE (the emulator binary from the aws-sam-cli wheel). Skipped only when no image
is named; anything else missing is a failure. Timings go to $DOGBREEDS_CONTAINER_TIMINGS (JSON)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from infra.local_stack import create_stack, free_port
from tests.conftest import COLOUR_BREEDS, colour_photo, threaded_moto_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
IMAGE = os.environ.get("DOGBREEDS_CONTAINER_IMAGE")
if not IMAGE:
    pytest.skip("no container image: DOGBREEDS_CONTAINER_IMAGE is unset (infra/container.sh build, then test)",
                allow_module_level=True)
ENGINE = os.environ.get("DOGBREEDS_CONTAINER_ENGINE", "podman")
FLAVOUR = os.environ.get("DOGBREEDS_CONTAINER_FLAVOUR", "full")
assert FLAVOUR in ("full", "lite"), f"DOGBREEDS_CONTAINER_FLAVOUR={FLAVOUR!r}: full or lite"
REGION = "us-east-1"
HANDLER = "worker.handler.lambda_handler"
TIMINGS: dict[str, float] = {}


def rie_binary() -> Path:
    configured = os.environ.get("DOGBREEDS_LAMBDA_RIE")
    if configured:
        path = Path(configured)
    else:
        tools = Path(os.environ.get("DOGBREEDS_TOOLS_VENV") or Path(__file__).resolve().parents[2] / ".venv-tools")
        found = sorted(tools.glob("lib/python3*/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"))
        path = found[0] if found else tools / "aws-lambda-rie (not found)"
    assert path.is_file(), f"the Lambda Runtime Interface Emulator is not at {path} (infra/check.sh venv)"
    return path


@dataclass(frozen=True)
class LocalMoto:
    """The moto server the containers talk to (host network: 127.0.0.1 is this machine)."""

    endpoint: str

    def environment(self) -> dict[str, str]:
        """Variables that point boto3 (and the worker in the container) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_DEFAULT_REGION": REGION}


@pytest.fixture(scope="module")
def moto():
    """A thread of the test process is enough: no test here stops the server mid-run."""
    assert shutil.which(ENGINE), f"{ENGINE} is not installed"
    with threaded_moto_server() as endpoint:
        yield LocalMoto(endpoint)


@pytest.fixture(scope="module", autouse=True)
def record_timings():
    yield
    if TIMINGS and os.environ.get("DOGBREEDS_CONTAINER_TIMINGS"):
        Path(os.environ["DOGBREEDS_CONTAINER_TIMINGS"]).write_text(json.dumps(TIMINGS, indent=1) + "\n")
    print("container timings:", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def signing(tmp_path_factory) -> dict[str, Path]:
    from trainer.signing import generate_key_pair

    private, public, _ = generate_key_pair(tmp_path_factory.mktemp("signing") / "signing")
    return {"key": private, "pub": public}


@pytest.fixture(scope="module")
def served_artifact(request, signing, tmp_path_factory) -> Path:
    """The model the image serves, signed: the TensorFlow-only colour model (full image), or the
    colour model published with OpenVINO int8/bf16 variants (lite image: it has no TensorFlow)."""
    from trainer.signing import FileSigner, sign_artifact

    source = request.getfixturevalue("colour_artifact" if FLAVOUR == "full" else "fast_colour_artifact")
    signed = shutil.copytree(source, tmp_path_factory.mktemp("signed") / source.name)
    sign_artifact(signed, FileSigner.from_file(signing["key"]))
    return signed


def clients(moto):
    env = moto.environment()
    kw = dict(endpoint_url=moto.endpoint, region_name=REGION, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return boto3.client("s3", **kw), boto3.client("sqs", **kw)


def deployed_stack(moto, artifact: Path, name: str, max_receive_count: int = 5):
    """The local stand-in of infra/template.yaml, with the model published under models/."""
    from trainer.registry import upload_artifact

    s3, sqs = clients(moto)
    stack = create_stack(s3, sqs, bucket=name, queue=name, max_receive_count=max_receive_count)
    model = upload_artifact(artifact, f"s3://{name}/models", s3=s3)
    assert model == f"s3://{name}/models/{artifact.name}/v1"
    return stack, s3, sqs


def put_photos(s3, bucket: str, tag: str) -> dict[str, str]:
    """Two photos per colour breed under incoming/ (jpg and png), a truncated one, and one that is
    not under incoming/ (no notification). Returns {key: expected breed or 'error'}."""
    expected = {}
    for i, (folder, rgb) in enumerate(COLOUR_BREEDS.items()):
        breed = folder.split("-", 1)[1]
        for j, fmt in enumerate(("JPEG", "PNG")):
            key = f"incoming/{tag}/{breed} {j}.{'jpg' if fmt == 'JPEG' else 'png'}"
            s3.put_object(Bucket=bucket, Key=key, Body=colour_photo(rgb, seed=10 * i + j, fmt=fmt))
            expected[key] = breed
    s3.put_object(Bucket=bucket, Key=f"incoming/{tag}/broken.jpg", Body=colour_photo((9, 9, 9))[:300])
    expected[f"incoming/{tag}/broken.jpg"] = "error"
    s3.put_object(Bucket=bucket, Key=f"elsewhere/{tag}.jpg", Body=colour_photo((9, 9, 9)))
    return expected


def manifest_items(s3, bucket: str) -> dict[str, dict]:
    items = {}
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="manifests/").get("Contents", []):
        document = json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
        for item in document["items"]:
            items[item["key"]] = item
    return items


def check_manifests(s3, bucket: str, expected: dict[str, str]) -> None:
    runtimes = set()
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="manifests/").get("Contents", []):
        runtimes.add(json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())["model"]["runtime"])
    assert runtimes == ({"tf"} if FLAVOUR == "full" else {"openvino-int8"}), runtimes
    items = manifest_items(s3, bucket)
    assert set(items) == set(expected), sorted(items)
    for key, breed in expected.items():
        if breed == "error":
            assert items[key]["status"] == "error" and items[key]["error_code"] == "truncated", items[key]
        else:
            assert items[key]["status"] == "ok" and items[key]["breed"] == breed, items[key]


def queue_counts(sqs, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def worker_environment(moto, bucket: str, model: str, trusted_key: Path) -> dict[str, str]:
    """What infra/template.yaml gives the function (a pinned model version, the trusted public key
    as the TrustedPublicKey parameter passes it), pointed at the moto server."""
    environment = {**moto.environment(), "AWS_REGION": REGION, "DOGBREEDS_MODEL": f"s3://{bucket}/models/{model}/v1",
                   "DOGBREEDS_TRUSTED_KEY": " ".join(trusted_key.read_text().split()),  # a PEM on one line
                   "DOGBREEDS_OUTPUT_BUCKET": bucket, "DOGBREEDS_OUTPUT_PREFIX": "manifests",
                   "DOGBREEDS_CACHE": "/tmp/dogbreeds", "POWERTOOLS_SERVICE_NAME": "dogbreeds-worker",
                   "POWERTOOLS_METRICS_NAMESPACE": "dogbreeds"}
    if FLAVOUR == "full":  # the TensorFlow-only test model: the SavedModel is served only when allowed
        environment["DOGBREEDS_ALLOW_SAVEDMODEL"] = "1"
    return environment


def engine_run(name: str, env: dict[str, str], *args: str) -> list[str]:
    """`podman run` as Lambda runs a function: host network (for the moto server on 127.0.0.1),
    read-only root filesystem, a tmpfs /tmp, the image's unprivileged user."""
    command = [ENGINE, "run", "--rm", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,size=512m"]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    return command + list(args)


def remove_container(name: str) -> None:
    subprocess.run([ENGINE, "rm", "--force", "--time", "5", name], capture_output=True, timeout=120)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the container exited with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def invoke(port: int, event: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations",
                                     data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class EventSourceMapping:
    """What Lambda's SQS event source mapping does, in small: receive up to ``batch_size``
    messages (waiting up to ``window`` seconds to fill the batch), invoke the function with the
    SQS event, delete the messages that did not fail, and leave the ``batchItemFailures`` to come
    back after the visibility timeout (and to reach the DLQ after maxReceiveCount)."""

    def __init__(self, sqs, queue_url: str, invoke_port: int, batch_size: int = 10, window: float = 2.0,
                 visibility_timeout: int = 120):
        self.sqs, self.queue_url, self.port = sqs, queue_url, invoke_port
        self.batch_size, self.window, self.visibility_timeout = batch_size, window, visibility_timeout
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"]
        self.invocations: list[dict] = []

    def receive_batch(self) -> list[dict]:
        batch, deadline = [], time.time() + self.window
        while len(batch) < self.batch_size and time.time() < deadline:
            batch += self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=min(10, self.batch_size - len(batch)), WaitTimeSeconds=1,
                VisibilityTimeout=self.visibility_timeout, MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"]).get("Messages", [])
        return batch

    def event(self, messages: list[dict]) -> dict:
        return {"Records": [{
            "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
            "attributes": m.get("Attributes", {}), "messageAttributes": m.get("MessageAttributes", {}),
            "md5OfBody": m["MD5OfBody"], "eventSource": "aws:sqs", "eventSourceARN": self.queue_arn,
            "awsRegion": REGION} for m in messages]}

    def poll_once(self) -> dict | None:
        messages = self.receive_batch()
        if not messages:
            return None
        started = time.perf_counter()
        response = invoke(self.port, self.event(messages))
        seconds = time.perf_counter() - started
        assert "batchItemFailures" in response, f"the function failed: {response}"
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        done = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages) if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=done[start:start + 10])
        record = {"ids": [m["MessageId"] for m in messages], "failed": failed, "seconds": seconds}
        self.invocations.append(record)
        return record

    def drain(self) -> list[dict]:
        while self.poll_once() is not None:
            pass
        return self.invocations


def test_lambda_entry_point_under_the_runtime_interface_emulator(moto, served_artifact, signing, tmp_path):
    bucket = "dogbreeds-lambda"
    stack, s3, sqs = deployed_stack(moto, served_artifact, bucket)
    expected = put_photos(s3, bucket, "first")
    malformed = sqs.send_message(QueueUrl=stack.queue_url, MessageBody="{not json")["MessageId"]

    rie, port, api_port = rie_binary(), free_port(), free_port()
    name = f"dogbreeds-lambda-{uuid.uuid4().hex[:8]}"
    command = engine_run(name, worker_environment(moto, bucket, served_artifact.name, signing["pub"]),
                         "--volume", f"{rie}:/usr/local/bin/aws-lambda-rie:ro",
                         "--entrypoint", "/usr/local/bin/aws-lambda-rie", IMAGE,
                         "--runtime-interface-emulator-address", f"127.0.0.1:{port}",
                         "--runtime-api-address", f"127.0.0.1:{api_port}",
                         "python", "-m", "awslambdaric", HANDLER)
    output = tmp_path / "lambda-container.log"  # a file, not a pipe: nothing can block the container
    started = time.perf_counter()
    with output.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, timeout=120)
        TIMINGS["lambda_container_start_to_emulator_ready_s"] = round(time.perf_counter() - started, 2)
        esm = EventSourceMapping(sqs, stack.queue_url, port)
        first = esm.poll_once()
        assert first is not None, "no message in the queue"
        TIMINGS["lambda_container_start_to_first_manifests_s"] = round(time.perf_counter() - started, 2)
        TIMINGS["lambda_first_invocation_s"] = round(first["seconds"], 2)
        esm.drain()
        # a second wave: the execution environment (and its loaded model) is reused
        first_wave = len(esm.invocations)
        expected_second = put_photos(s3, bucket, "second")
        second_wave = esm.drain()[first_wave:]
        assert second_wave, "the second wave of photos was not delivered"
        TIMINGS["lambda_warm_invocation_s"] = round(second_wave[0]["seconds"], 2)
    finally:
        remove_container(name)
        process.wait(timeout=60)
        logs = output.read_text()
        print("container output (tail):\n" + logs[-6000:])  # shown by pytest when the test fails

    received = [i for record in esm.invocations for i in record["ids"]]
    failed = set().union(*(record["failed"] for record in esm.invocations))
    assert malformed in received and failed == {malformed}, (failed, logs[-6000:])
    assert len(received) == len(set(received)), "a message was delivered twice"
    check_manifests(s3, bucket, {**expected, **expected_second})
    # every message deleted but the failed one, which waits (invisible) for its retry
    assert queue_counts(sqs, stack.queue_url) == (0, 1), logs[-6000:]
    assert logs.count('"model loaded"') == 1, logs[-6000:]  # one cold start for both waves
    assert logs.count('"model signature verified"') == 1 and "unverified" not in logs, logs[-6000:]


def test_poller_entry_point(moto, served_artifact, signing):
    bucket = "dogbreeds-poller"
    stack, s3, sqs = deployed_stack(moto, served_artifact, bucket, max_receive_count=2)
    expected = put_photos(s3, bucket, "batch")
    sqs.send_message(QueueUrl=stack.queue_url, MessageBody="{not json")

    name = f"dogbreeds-poller-{uuid.uuid4().hex[:8]}"
    command = engine_run(name, {**worker_environment(moto, bucket, served_artifact.name, signing["pub"]),
                               "DOGBREEDS_QUEUE_URL": stack.queue_url},
                         "--entrypoint", "dogbreeds-worker", IMAGE,
                         "run", "--until-empty", "--wait-seconds", "1", "--retry-delay", "0")
    first_manifest: list[float] = []
    stop = threading.Event()

    def watch(started: float) -> None:  # container start -> the first manifest in S3
        while not stop.is_set():
            if s3.list_objects_v2(Bucket=bucket, Prefix="manifests/").get("KeyCount", 0):
                first_manifest.append(time.perf_counter() - started)
                return
            time.sleep(0.1)

    started = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(started,), daemon=True)
    watcher.start()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired as error:
        remove_container(name)
        out, err = process.communicate(timeout=60)
        raise AssertionError(f"the poller did not stop: {err[-4000:]}") from error
    finally:
        stop.set()
        watcher.join(timeout=5)
    TIMINGS["poller_container_run_s"] = round(time.perf_counter() - started, 2)
    if first_manifest:
        TIMINGS["poller_container_start_to_first_manifest_s"] = round(first_manifest[0], 2)

    assert process.returncode == 0, (out + err)[-4000:]
    assert "model signature verified" in out + err, (out + err)[-4000:]
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert summary["failed"] == 2 and summary["images"] == len(expected), summary  # failed twice, then DLQ
    check_manifests(s3, bucket, expected)
    assert first_manifest, "no manifest was seen while the poller ran"
    dead = sqs.receive_message(QueueUrl=stack.dlq_url, MaxNumberOfMessages=10).get("Messages", [])
    assert [m["Body"] for m in dead] == ["{not json"]
    assert queue_counts(sqs, stack.queue_url) == (0, 0)
