"""Faults against moto's server mode: the real worker command (``python -m worker.cli run``) in a
subprocess, SIGKILLed mid-batch and restarted; transient S3/SQS errors injected by a small HTTP proxy in
front of moto; a tampered model artifact; and which messages reach the dead-letter queue.

The promise under test: every photo of every message ends up in exactly one final manifest entry, and
faults that boto3 or one redelivery can absorb send nothing to the DLQ (only the malformed messages get
there; a fault that outlasts every delivery would dead-letter its message too, see README: Reliability).

:class:`FaultProxy` is a threaded HTTP/1.1 server on 127.0.0.1 that forwards every request to moto and,
when its ``rule`` says so, instead answers 503 SlowDown / 500 InternalError, resets the connection
(before forwarding, or after forwarding so the response is lost), cuts a GetObject body in half, or holds
a request until the test releases it (a deterministic "kill point"); it lives in ``infra/fault_proxy.py``
(the soak uses it too). The worker's ``AWS_ENDPOINT_URL`` points at the proxy; the test's own boto3
clients talk to moto directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from infra.fault_proxy import FAULTS, FaultProxy, Request
from infra.local_stack import create_stack
from tests.conftest import COLOUR_BREEDS, ROOT, colour_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "faults"
COLOURS = list(COLOUR_BREEDS.items())  # (folder, rgb)


# --------------------------------------------------------------------------- stack, photos, worker
@pytest.fixture
def stack(moto_server):
    """Bucket with incoming/ -> queue notifications; the queue dead-letters after 3 receives."""
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    created = create_stack(s3, sqs, bucket=BUCKET, queue="faults", max_receive_count=3, suffixes=None)
    return {"s3": s3, "sqs": sqs, "queue": created.queue_url, "dlq": created.dlq_url, "endpoint": moto_server}


def put_jobs(s3, sqs, queue: str, n_jobs: int, per_job: int, prefix: str = "photos") -> dict[str, dict[str, str]]:
    """Upload photos and send one job message per job; returns job_id -> {key: expected breed}."""
    jobs = {}
    for j in range(n_jobs):
        job_id, expected = f"job-{j:02d}", {}
        for p in range(per_job):
            folder, rgb = COLOURS[(j + p) % len(COLOURS)]
            key = f"{prefix}/{job_id}/p{p:02d}.jpg"
            s3.put_object(Bucket=BUCKET, Key=key, Body=colour_photo(rgb, size=(64, 48), seed=j * 100 + p))
            expected[key] = folder.split("-", 1)[1]
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": job_id, "bucket": BUCKET,
                                                                 "keys": list(expected)}))
        jobs[job_id] = expected
    return jobs


def manifests(s3, prefix: str = "manifests/") -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def queue_counts(sqs, queue: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


_STARTED: list["Worker"] = []


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """A test that fails half-way still leaves no worker process behind."""
    yield
    while _STARTED:
        worker = _STARTED.pop()
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        worker._log.close()


class Worker:
    """``python -m worker.cli run`` in a subprocess, output to a log file."""

    def __init__(self, log: Path, endpoint: str, model: str, queue: str, *args: str, extra_env=None):
        self.log_path = log
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "DOGBREEDS_MODEL": model, "DOGBREEDS_QUEUE_URL": queue,
               "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self._log = open(log, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", "--wait-seconds", "1", *args],
                                        cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        _STARTED.append(self)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]

    def kill(self) -> int:
        self.process.send_signal(signal.SIGKILL)
        return self.wait(30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(60)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


def wait_until(predicate, timeout: float, worker: Worker | None = None, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"the worker exited ({worker.process.returncode}) while waiting for {what}:\n{worker.tail()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{worker.tail()}" if worker else ""))


def check_final_manifests(s3, jobs: dict[str, dict[str, str]]) -> dict[str, bytes]:
    """Every job has exactly one manifest at its key, listing each of its photos exactly once, all ok with
    the expected breed, and no photo appears in any other manifest."""
    docs = manifests(s3)
    assert sorted(docs) == sorted(f"manifests/{j}.json" for j in jobs)
    seen = Counter()
    for job_id, expected in jobs.items():
        doc = json.loads(docs[f"manifests/{job_id}.json"])
        keys = [item["key"] for item in doc["items"]]
        seen.update(keys)
        assert sorted(keys) == sorted(expected), job_id
        bad = [(i["key"], i["status"], i.get("error_code"), i["breed"]) for i in doc["items"]
               if i["status"] != "ok" or i["breed"] != expected[i["key"]]]
        assert not bad, f"{job_id}: {bad}"
        assert doc["counts"] == {"ok": len(expected), "error": 0, "no_dog": 0, "uncertain": 0}
    assert max(seen.values()) == 1, [k for k, c in seen.items() if c > 1]
    return docs


def drained(sqs, queue):
    return queue_counts(sqs, queue) == (0, 0)


# --------------------------------------------------------------------------- (a) SIGKILL mid-batch
@pytest.mark.parametrize("kill_point", ["while-fetching", "after-manifests-before-delete"])
def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(stack, colour_artifact, tmp_path, kill_point):
    """Two deterministic kill points, each held open by the proxy until the SIGKILL: a photo download in
    the middle of a batch (nothing written yet), and the DeleteMessageBatch call after every manifest of
    the batch was written (so the restarted worker redoes work that was already saved)."""
    s3, sqs, queue = stack["s3"], stack["sqs"], stack["queue"]
    jobs = put_jobs(s3, sqs, queue, n_jobs=12, per_job=20)
    held = []

    def hold_once(request: Request) -> str:
        if held:
            return "pass"
        if kill_point == "while-fetching" and request.is_object_get(f"/{BUCKET}/photos/") \
                and request.key.endswith("/p05.jpg"):
            held.append(request)
        elif kill_point == "after-manifests-before-delete" and request.operation == "DeleteMessageBatch":
            held.append(request)
        return "hold" if held else "pass"

    args = ("--visibility-timeout", "5", "--heartbeat", "1.5", "--retry-delay", "1")
    with FaultProxy(stack["endpoint"], hold_once) as proxy:
        first = Worker(tmp_path / "first.log", proxy.endpoint, str(colour_artifact), queue, *args)
        wait_until(proxy.holding.is_set, 120, first, "the kill point")
        time.sleep(0.5)  # let the rest of the batch pile up behind the held request
        written_before = manifests(s3)
        visible, in_flight = queue_counts(sqs, queue)
        assert first.kill() == -signal.SIGKILL
        proxy.release.set()
        assert in_flight > 0, "the kill must interrupt messages in flight"
        if kill_point == "while-fetching":
            assert written_before == {}, "the batch was still downloading"
        else:  # every job message of the batch has its manifest (the batch may also hold the S3 TestEvent);
            # the worker also holds the next batch (classified, waiting for the held delete to write its
            # manifests) and the one received ahead: up to 10 messages each, none with a manifest yet
            assert 0 < len(written_before) <= in_flight <= len(written_before) + 1 + 2 * 10

        second = Worker(tmp_path / "second.log", proxy.endpoint, str(colour_artifact), queue, *args)
        wait_until(lambda: len(manifests(s3)) == len(jobs) and drained(sqs, queue), 120, second, "all manifests")
        assert second.stop() == 0, second.tail()

    docs = check_final_manifests(s3, jobs)
    for key, body in written_before.items():
        assert docs[key] == body, f"{key} was rewritten with different content on redelivery"
    assert not sqs.receive_message(QueueUrl=stack["dlq"], WaitTimeSeconds=0).get("Messages")
    # nothing was deleted before the kill, so the restarted worker did (or redid) every job
    redone = {json.loads(line).get("job_id") for line in second.output().splitlines() if '"message done"' in line}
    assert redone - {None} == set(jobs), second.tail()


# --------------------------------------------------------------------------- (b) transient S3/SQS faults
def scheduled_faults(every: int = 3, max_in_a_row: int = 2, max_truncations: int = 2):
    """A deterministic schedule per kind of request (SQS operation, photo GET, other S3 call): its 1st,
    (1+every)th, (1+2*every)th, ... request fails, cycling through 503 SlowDown, 500, a reset before
    forwarding and a reset after forwarding (the response is lost). Photo GETs also get bodies cut in half
    (at most ``max_truncations``, never twice for one photo). The same request never fails more than
    ``max_in_a_row`` times in a row (boto3 retries up to 8 times), and only one ReceiveMessage response is
    lost (each loss counts as a receive towards the DLQ's maxReceiveCount, as in real SQS)."""
    seen, used, streak = Counter(), Counter(), Counter()
    truncated: set[str] = set()
    once: set[str] = set()

    def rule(request: Request) -> str:
        op = "photo GET" if request.is_object_get(f"/{BUCKET}/photos/") else request.operation
        seen[op] += 1
        if seen[op] % every != 1 or streak[request.identity] >= max_in_a_row:
            streak.pop(request.identity, None)
            return "pass"
        kinds = FAULTS if op == "photo GET" else FAULTS[:-1]
        action = kinds[used[op] % len(kinds)]
        used[op] += 1
        if action == "truncate" and (request.key in truncated or len(truncated) >= max_truncations):
            action = "503"
        if action == "truncate":
            truncated.add(request.key)
        if action == "drop-response" and op == "ReceiveMessage":
            action = "503" if op in once else action
            once.add(op)
        streak[request.identity] += 1
        return action

    return rule


def test_transient_s3_and_sqs_errors_are_retried_and_fail_no_item(stack, colour_artifact, tmp_path):
    s3, sqs, queue = stack["s3"], stack["sqs"], stack["queue"]
    jobs = put_jobs(s3, sqs, queue, n_jobs=8, per_job=6)
    with FaultProxy(stack["endpoint"], scheduled_faults()) as proxy:
        worker = Worker(tmp_path / "worker.log", proxy.endpoint, str(colour_artifact), queue,
                        "--visibility-timeout", "5", "--heartbeat", "1.5", "--retry-delay", "1", "--batch-size", "4")
        wait_until(lambda: len(manifests(s3)) == len(jobs) and drained(sqs, queue), 150, worker, "all manifests")
        assert worker.stop() == 0, worker.tail()

    check_final_manifests(s3, jobs)
    assert not sqs.receive_message(QueueUrl=stack["dlq"], WaitTimeSeconds=0).get("Messages")
    actions = proxy.actions()
    for fault in FAULTS:
        assert actions[fault] >= 1, f"no {fault} was injected: {actions}"
    faulted_ops = {op for _, op, _, action in proxy.log if action in ("503", "500", "reset", "drop-response")}
    assert {"ReceiveMessage", "DeleteMessageBatch", "S3 GET", "S3 PUT"} <= faulted_ops, faulted_ops
    # 503/500/resets are absorbed by boto3's own retries (same request again, later passed). Only a body
    # cut in half -- which no HTTP-level retry sees -- may fail a message, which the queue then redelivers.
    failed = worker.output().count('"message failed"')
    print(f"faults injected: {dict(actions)}; failed messages (redelivered): {failed}")
    assert failed <= actions["truncate"], f"{failed} failed messages for {actions['truncate']} truncations"
    passed = {(op, key) for _, op, key, action in proxy.log if action == "pass"}
    unretried = [(n, op, key) for n, op, key, action in proxy.log
                 if action in ("503", "500", "reset") and (op, key) not in passed]
    assert not unretried, unretried


# --------------------------------------------------------------------------- (c) tampered model artifact
TAMPERS = {
    "model/variables/variables.data-00000-of-00001": lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1])
    + b[len(b) // 2 + 1:],
    "model/saved_model.pb": lambda b: b[:-10] + bytes([b[-10] ^ 0x40]) + b[-9:],
    "labels.json": lambda b: b.replace(b'"Chihuahua"', b'"@@tmp"').replace(b'"beagle"', b'"Chihuahua"')
    .replace(b'"@@tmp"', b'"beagle"'),  # two breeds swapped: valid, and a wrong model
}


def test_a_tampered_model_artifact_is_refused_never_served(stack, colour_artifact, tmp_path):
    from trainer.registry import upload_artifact

    s3, sqs, queue = stack["s3"], stack["sqs"], stack["queue"]
    model = upload_artifact(colour_artifact, f"s3://{BUCKET}/models", s3=s3)
    assert model == f"s3://{BUCKET}/models/colours/v1"
    red = f"photos/{COLOURS[0][0]}.jpg"
    s3.put_object(Bucket=BUCKET, Key=red, Body=colour_photo(COLOURS[0][1], seed=1))
    model_uri = f"s3://{BUCKET}/models/colours"  # follows models/colours/latest

    def send(job_id):
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": job_id, "bucket": BUCKET, "keys": [red]}))

    # control: the untampered artifact from S3 is served
    send("control")
    worker = Worker(tmp_path / "control.log", stack["endpoint"], model_uri, queue, "--until-empty",
                    extra_env={"DOGBREEDS_CACHE": str(tmp_path / "cache-control")})
    assert worker.wait(120) == 0, worker.tail()
    control = json.loads(s3.get_object(Bucket=BUCKET, Key="manifests/control.json")["Body"].read())
    assert control["items"][0]["breed"] == "Chihuahua"

    send("after-tamper")
    for i, (rel, tamper) in enumerate(TAMPERS.items()):
        key = f"models/colours/v1/{rel}"
        original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        tampered = tamper(original)
        assert tampered != original and len(tampered) == len(original)
        s3.put_object(Bucket=BUCKET, Key=key, Body=tampered)
        try:
            worker = Worker(tmp_path / f"tampered-{i}.log", stack["endpoint"], model_uri, queue, "--until-empty",
                            extra_env={"DOGBREEDS_CACHE": str(tmp_path / f"cache-{i}")})
            code = worker.wait(120)
        finally:
            s3.put_object(Bucket=BUCKET, Key=key, Body=original)
        out = worker.output()
        assert code != 0, f"served a tampered artifact ({rel}):\n{out[-2000:]}"
        assert f"{rel}: sha256 mismatch" in out and "ArtifactError" in out, out[-2000:]
        assert "message done" not in out
        assert queue_counts(sqs, queue) == (1, 0), "the job was not even received"
        assert sorted(manifests(s3)) == ["manifests/control.json"]


# --------------------------------------------------------------------------- (d) what reaches the DLQ
def test_only_malformed_messages_reach_the_dlq(stack, colour_artifact, tmp_path):
    """Good messages, a good message whose photos are all bad, transiently failing messages and malformed
    messages, with maxReceiveCount 3: the DLQ ends up with exactly the malformed ones. The transient
    failures: photo downloads whose body is cut off mid-way twice (no HTTP-level retry sees that), and a
    photo answering 500 for longer than boto3 retries (two GetObject calls' worth of attempts). Each such
    message fails, is redelivered and then succeeds."""
    from worker.settings import BOTO_CONFIG

    retries = BOTO_CONFIG.retries
    attempts_per_call = retries.get("total_max_attempts") or retries["max_attempts"] + 1
    s3, sqs, queue = stack["s3"], stack["sqs"], stack["queue"]
    jobs = put_jobs(s3, sqs, queue, n_jobs=2, per_job=3)
    flaky = {"flaky/a.jpg": COLOURS[1], "flaky/b.jpg": COLOURS[2], "flaky/c.jpg": COLOURS[0]}
    for key, (_, rgb) in flaky.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=colour_photo(rgb, seed=5))
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": "flaky-job", "bucket": BUCKET,
                                                             "keys": ["photos/job-00/p00.jpg", "flaky/a.jpg"]}))
    jobs["flaky-job"] = {"photos/job-00/p00.jpg": jobs["job-00"]["photos/job-00/p00.jpg"],
                         "flaky/a.jpg": COLOURS[1][0].split("-", 1)[1]}
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": "flaky-job-2", "bucket": BUCKET,
                                                             "keys": ["flaky/b.jpg"]}))
    jobs["flaky-job-2"] = {"flaky/b.jpg": COLOURS[2][0].split("-", 1)[1]}
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": "erroring-job", "bucket": BUCKET,
                                                             "keys": ["flaky/c.jpg"]}))
    jobs["erroring-job"] = {"flaky/c.jpg": COLOURS[0][0].split("-", 1)[1]}
    s3.put_object(Bucket=BUCKET, Key="bad/notes.txt", Body=b"not a photo\n")
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"job_id": "all-bad", "bucket": BUCKET,
                                                             "keys": ["bad/notes.txt", "bad/missing.jpg"]}))
    s3.put_object(Bucket=BUCKET, Key="incoming/flaky event.jpg", Body=colour_photo(COLOURS[0][1], seed=6))
    malformed = ["{not json", "plain text", json.dumps({"job_id": "no-keys", "bucket": BUCKET}),
                 json.dumps({"job_id": "../escape", "bucket": BUCKET, "keys": ["a.jpg"]}),
                 json.dumps({"job_id": "typo", "bucket": BUCKET, "keys": ["a.jpg"], "output_prefx": "x"}),
                 json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}),
                 json.dumps({"hello": "world"})]
    for body in malformed:
        sqs.send_message(QueueUrl=queue, MessageBody=body)

    cut: Counter = Counter()

    def flaky_downloads(request: Request) -> str:
        if request.method == "GET" and not request.is_sqs and "flaky" in request.key:
            limit = 2 * attempts_per_call if request.key.endswith("/c.jpg") else 2
            if cut[request.key] < limit:
                cut[request.key] += 1
                return "500" if request.key.endswith("/c.jpg") else "truncate"
        return "pass"

    def done():  # the main queue only empties once the malformed messages have moved to the DLQ
        return len(manifests(s3)) == len(jobs) + 2 and drained(sqs, queue)

    with FaultProxy(stack["endpoint"], flaky_downloads) as proxy:
        worker = Worker(tmp_path / "worker.log", proxy.endpoint, str(colour_artifact), queue,
                        "--visibility-timeout", "10", "--heartbeat", "3", "--retry-delay", "1")
        wait_until(done, 120, worker, "the DLQ and the manifests")
        time.sleep(1.5)  # anything else on its way to the DLQ would get there now
        assert worker.stop() == 0, worker.tail()

    dead = []
    for _ in range(10):
        got = sqs.receive_message(QueueUrl=stack["dlq"], MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=60).get("Messages", [])
        if not got:
            break
        dead += [m["Body"] for m in got]
    assert sorted(dead) == sorted(malformed)
    assert cut == {"/faults/flaky/a.jpg": 2, "/faults/flaky/b.jpg": 2, "/faults/incoming/flaky event.jpg": 2,
                   "/faults/flaky/c.jpg": 2 * attempts_per_call}
    failed = [json.loads(line) for line in worker.output().splitlines() if '"message failed"' in line]
    transient = Counter(f.get("job_id") for f in failed if (f.get("reason") or "").startswith("transient"))
    assert {"flaky-job", "flaky-job-2", "erroring-job"} <= set(transient), f"the flaky ones fail first: {transient}"
    assert len(transient) == 4, transient  # ... and the S3 event one; no other message failed transiently

    docs = manifests(s3)
    all_bad = json.loads(docs.pop("manifests/all-bad.json"))
    assert [(i["key"], i["error_code"]) for i in all_bad["items"]] == [("bad/missing.jpg", "not_found"),
                                                                        ("bad/notes.txt", "not_an_image")]
    (event_key,) = [k for k in docs if k.removesuffix(".json") not in {f"manifests/{j}" for j in jobs}]
    event = json.loads(docs.pop(event_key))
    assert [(i["key"], i["status"], i["breed"]) for i in event["items"]] == [("incoming/flaky event.jpg", "ok",
                                                                             "Chihuahua")]
    for job_id, expected in jobs.items():
        doc = json.loads(docs[f"manifests/{job_id}.json"])
        assert {i["key"]: (i["status"], i["breed"]) for i in doc["items"]} == {k: ("ok", b) for k, b in
                                                                               expected.items()}
