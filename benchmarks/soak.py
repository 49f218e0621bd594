"""`make soak`: thousands of photos through the real worker while it is SIGKILLed and restarted, every
S3 event delivered twice, job messages overlapping the events, worst-case photos among them and
transient S3/SQS faults injected in front of moto; every message's manifest must list exactly its own
photos, each with the label that photo gets classified alone; nothing lost, nothing duplicated.

1. start moto's server as a child process on 127.0.0.1 (``infra.local_stack.MotoServer``) and create the
   stack (bucket, queue, dead-letter queue); the bucket's ``incoming/`` notifications go to a *tap* queue;
2. build the tiny colour model artifact (``benchmarks/tiny_model.py``; or ``--model`` an existing one);
3. start ``python -m worker.cli run`` (short visibility timeout, so killed work is redelivered quickly)
   behind a fault-injecting proxy (``infra.fault_proxy.FaultProxy``: ``--fault-rate`` of the worker's
   requests answer 503/500, reset the connection before or after forwarding, or, for a photo GET, cut the
   body in half once per photo; never more than twice in a row for one request, which boto3 retries);
4. drop ``--messages`` photos into ``incoming/``: S3 notifies the tap queue and the soak sends **each
   notification twice** to the worker's queue (the same body; the copy with a random delay of 0-5 s): a
   duplicate delivery, which must map to the same manifest. ``--bad-fraction`` (10%) are bad photos
   (empty, text, HTML, truncated JPEG, PNG with a broken CRC, or deleted before the worker gets to it),
   ``--worst-fraction`` (5%) worst-case photos (a 2 MP RGBA PNG with alpha, a 16-bit grayscale PNG, a CMYK
   TIFF, a 6 MP progressive JPEG, an animated GIF); every 10th key has spaces, '+' and non-ASCII characters.
   Every ``--job-every`` photos a **job message** names 2-8 photos already dropped (overlapping the events
   and each other; every 5th job is sent twice). Photos are dropped as the worker keeps up (at most
   ``--backlog`` messages waiting: moto's SQS gets slower the deeper its queue);
5. SIGKILL the worker ``--kills`` times, at moments drawn with ``--seed`` (once a random fraction, between
   10% and 80%, of the messages is done, plus a random 0-0.5 s), restarting it straight away;
6. when the queue is empty (nothing visible, delayed or in flight), stop the worker with SIGTERM, classify
   every distinct planted photo alone (the same model, in this process) and read every manifest.

Printed: ``sent`` (messages sent to the worker's queue: events twice, jobs), ``manifests`` (written) of
``expected_manifests`` (one per distinct message: an event and its copy share one), ok / error (entries in
all manifests), ``lost`` (a photo a message names missing from its manifest, or a whole manifest missing),
``duplicated`` (photos with more manifest entries than messages naming them: a redelivered message whose
manifest landed under a second key, a photo listed twice), ``wrong_key`` (an entry for a photo its message
did not name), ``wrong_label`` (an entry that is not what the photo gets classified alone), ``kills``; also
``mismatched`` (an entry that is not what was planted: the breed of its colour or the bad photo's error
code; worst-case photos have no planted label), ``dlq`` (messages dead-lettered), ``unexpected_exits``
(worker deaths the soak did not cause) and the faults injected. ``--json`` prints one JSON object instead.
The exit status is non-zero unless lost, duplicated, wrong_key, wrong_label, mismatched, dlq and
unexpected_exits are all 0 and every planned kill happened.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.tiny_model import COLOUR_BREEDS, breed_name, build_colour_artifact, colour_photo  # noqa: E402
from infra.fault_proxy import FAULTS, FaultProxy, Request  # noqa: E402
from infra.local_stack import MotoServer, create_stack  # noqa: E402

BUCKET = "soak"
QUEUE = "soak-photos"
TAP = "soak-notifications"


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the photos
def _png_with_bad_crc(rgb) -> bytes:
    data = bytearray(colour_photo(rgb, size=(48, 36), seed=1, fmt="PNG"))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    data[idat + 4 + length] ^= 0xFF
    assert zlib.crc32(bytes(data[idat:idat + 4 + length])) != struct.unpack(">I", data[idat + 4 + length:idat + 8
                                                                                        + length])[0]
    return bytes(data)


def bad_kinds() -> list[tuple[str, str, bytes | None, str]]:
    """(kind, suffix, bytes or None for "deleted before processing", expected error code)."""
    jpeg = colour_photo((200, 120, 40), size=(64, 48), seed=2)
    return [
        ("empty", ".jpg", b"", "empty"),
        ("text", ".jpg", b"this is not a photo of a dog\n" * 10, "not_an_image"),
        ("html", ".png", b"<html><body>404 Not Found</body></html>", "not_an_image"),
        ("truncated", ".jpg", jpeg[: len(jpeg) // 2], "truncated"),
        ("bad-crc", ".png", _png_with_bad_crc((40, 200, 60)), "corrupt"),
        ("deleted", ".jpg", None, "not_found"),
    ]


def _smooth(rgb, width: int, height: int) -> np.ndarray:
    """A one-colour photo with gentle gradients (compresses well: the soak stays light on memory)."""
    y = np.linspace(-18, 18, height)[:, None, None]
    x = np.linspace(-10, 10, width)[None, :, None]
    return np.clip(np.array(rgb)[None, None, :] + y + x, 0, 255).astype(np.uint8)


def worst_kinds(rgb) -> list[tuple[str, str, bytes]]:
    """(kind, suffix, bytes): large or odd photos of one colour, each decoded the slow way."""
    from PIL import Image

    def encode(image, fmt, **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        return buffer.getvalue()

    pixels = _smooth(rgb, 1800, 1200)
    alpha = np.linspace(255, 190, 1800)[None, :].repeat(1200, 0).astype(np.uint8)
    gray16 = (pixels.mean(axis=2) * 257).astype(np.uint16)
    others = [(40, 200, 60), (40, 60, 220), rgb]
    frames = [Image.fromarray(_smooth(c, 800, 600)) for c in [rgb, *others]]
    return [
        ("rgba", ".png", encode(Image.fromarray(np.dstack([pixels, alpha])), "PNG")),
        ("gray16", ".png", encode(Image.fromarray(gray16), "PNG")),
        ("cmyk", ".tif", encode(Image.fromarray(pixels).convert("CMYK"), "TIFF", compression="tiff_deflate")),
        ("progressive", ".jpg", encode(Image.fromarray(_smooth(rgb, 3000, 2000)), "JPEG", quality=90,
                                       progressive=True)),
        ("animated", ".gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)),
    ]


@dataclass(frozen=True)
class Planted:
    body: bytes | None  # None: uploaded, then deleted before the worker reads it
    expected: tuple[str, str] | None  # ("ok", breed) or ("error", code); None for a worst-case photo
    kind: str


def plan_photos(n: int, bad_fraction: float, worst_fraction: float, rng: random.Random) -> dict[str, Planted]:
    folders = list(COLOUR_BREEDS)
    good = {folder: [colour_photo(COLOUR_BREEDS[folder], size=(64, 48), seed=s) for s in range(8)]
            for folder in folders}
    kinds = bad_kinds()
    shuffled = rng.sample(range(n), n)
    bad = set(shuffled[:round(n * bad_fraction)])
    worst = set(shuffled[len(bad):len(bad) + round(n * worst_fraction)])
    worst_bodies = {folder: worst_kinds(COLOUR_BREEDS[folder]) for folder in folders} if worst else {}
    plan = {}
    for i in range(n):
        odd = " dog+ü 🐶 " if i % 10 == 3 else "-"  # URL-encoded in the S3 event
        folder = folders[i % len(folders)]
        if i in bad:
            kind, suffix, body, code = kinds[i % len(kinds)]
            plan[f"incoming/{i:06d}{odd}{kind}{suffix}"] = Planted(body, ("error", code), kind)
        elif i in worst:
            kind, suffix, body = worst_bodies[folder][i % 5]
            plan[f"incoming/{i:06d}{odd}{breed_name(folder)}-{kind}{suffix}"] = Planted(body, None, kind)
        else:
            plan[f"incoming/{i:06d}{odd}{breed_name(folder)}.jpg"] = Planted(good[folder][i % 8],
                                                                         ("ok", breed_name(folder)), "good")
    return plan


# --------------------------------------------------------------------------- what is sent
@dataclass
class Traffic:
    """What the soak sent to the worker's queue (shared by its threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: int = 0
    settled: list[str] = field(default_factory=list)  # keys uploaded (and deleted, for "deleted" photos)
    events: list[str] = field(default_factory=list)  # notification bodies, each sent twice
    jobs: dict[str, list[str]] = field(default_factory=dict)  # job id -> keys
    sent: int = 0  # messages sent to the worker's queue
    errors: list[BaseException] = field(default_factory=list)


def upload(s3, sqs, queue_url: str, plan: dict[str, Planted], traffic: Traffic, queued: list[int], backlog: int,
           job_every: int, rng: random.Random, threads: int = 4) -> None:
    try:
        _upload(s3, sqs, queue_url, plan, traffic, queued, backlog, job_every, rng, threads)
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        traffic.errors.append(error)


def _upload(s3, sqs, queue_url, plan, traffic, queued, backlog, job_every, rng, threads) -> None:
    def put(item):
        key, planted = item
        while traffic.uploaded - len(traffic.events) + queued[0] >= backlog:  # not yet forwarded + waiting
            time.sleep(0.05)
        s3.put_object(Bucket=BUCKET, Key=key, Body=planted.body if planted.body is not None else b"soon deleted")
        if planted.body is None:
            s3.delete_object(Bucket=BUCKET, Key=key)
        job = None
        with traffic.lock:
            traffic.uploaded += 1
            traffic.settled.append(key)
            if job_every and traffic.uploaded % job_every == 0:
                number = len(traffic.jobs)
                keys = rng.sample(traffic.settled, min(len(traffic.settled), rng.randint(2, 8)))
                job = (f"soak-job-{number:05d}", keys, 2 if number % 5 == 4 else 1)
                traffic.jobs[job[0]] = keys
        if job is not None:
            job_id, keys, copies = job
            body = json.dumps({"job_id": job_id, "bucket": BUCKET, "keys": keys})
            for _ in range(copies):
                sqs.send_message(QueueUrl=queue_url, MessageBody=body)
            with traffic.lock:
                traffic.sent += copies

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, plan.items()))


def forward(sqs, tap_url: str, queue_url: str, traffic: Traffic, stop: threading.Event, seed: int) -> None:
    """Send every S3 notification of the tap queue twice to the worker's queue: the same body, the
    second copy with a random delay (a duplicate delivery, as S3 and SQS may make)."""
    rng = random.Random(seed)
    try:
        while not stop.is_set():
            got = sqs.receive_message(QueueUrl=tap_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                      VisibilityTimeout=60).get("Messages", [])
            events = [m["Body"] for m in got if "Records" in json.loads(m["Body"])]  # not the s3:TestEvent
            entries = [entry for i, body in enumerate(events) for entry in (
                {"Id": f"first-{i}", "MessageBody": body},
                {"Id": f"copy-{i}", "MessageBody": body, "DelaySeconds": rng.choice([0, 0, 1, 2, 5])})]
            for start in range(0, len(entries), 10):
                response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries[start:start + 10])
                if response.get("Failed"):
                    raise RuntimeError(f"forwarding notifications failed: {response['Failed']}")
            with traffic.lock:
                traffic.events += events
                traffic.sent += len(entries)
            if got:
                sqs.delete_message_batch(QueueUrl=tap_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        traffic.errors.append(error)


def random_faults(rate: float, seed: int):
    """A fault-proxy rule: ``rate`` of the requests fail (503, 500, a reset before or after forwarding;
    photo GETs may also be cut in half, once per photo); one request never fails more than twice in a row
    (boto3 retries up to 8 times)."""
    rng = random.Random(seed)
    streak: Counter = Counter()
    truncated: set[str] = set()

    def rule(request: Request) -> str:
        if rng.random() >= rate or streak[request.identity] >= 2:
            streak.pop(request.identity, None)
            return "pass"
        photo_get = request.is_object_get(f"/{BUCKET}/incoming/")
        action = rng.choice(FAULTS if photo_get and request.key not in truncated else FAULTS[:-1])
        if action == "truncate":
            truncated.add(request.key)
        streak[request.identity] += 1
        return action

    return rule


# --------------------------------------------------------------------------- the worker
class Worker:
    def __init__(self, env: dict, log_path: Path, visibility_timeout: int):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self._offset = self._log.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--wait-seconds", "1", "--visibility-timeout",
             str(visibility_timeout), "--heartbeat", str(max(1.0, visibility_timeout / 3)), "--retry-delay", "1"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process.poll() is None

    def has_worked(self) -> bool:
        """This incarnation has finished at least one message (so it is past loading the model)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            text = f.read()
        return b'"message done"' in text or b'"message failed"' in text

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()


def queue_counts(sqs, url: str) -> tuple[int, int, int]:
    """(visible, in flight, delayed) messages of a queue."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed"])["Attributes"]
    return (int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"]),
            int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)))


def notify_tap(s3, sqs, stack) -> str:
    """Point the bucket's incoming/ notifications at a tap queue the soak reads (it forwards them)."""
    tap_url = sqs.create_queue(QueueName=TAP)["QueueUrl"]
    tap_arn = sqs.get_queue_attributes(QueueUrl=tap_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    config = s3.get_bucket_notification_configuration(Bucket=BUCKET)
    rules = [{**rule, "QueueArn": tap_arn} for rule in config["QueueConfigurations"]]
    for rule in rules:
        rule.pop("Id", None)
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": rules})
    return tap_url


# --------------------------------------------------------------------------- the run
def soak(args) -> dict:
    started = time.perf_counter()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="dogbreeds-soak-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            log("building the tiny colour model artifact")
            model = str(build_colour_artifact(tmp / "colours"))
            os.environ["DOGBREEDS_ALLOW_SAVEDMODEL"] = "1"  # it is TensorFlow-only, and ours: serve it knowingly
        plan = plan_photos(args.messages, args.bad_fraction, args.worst_fraction, rng)
        kill_at = sorted(rng.uniform(0.1, 0.8) for _ in range(args.kills))
        kill_delay = [rng.uniform(0.0, 0.5) for _ in range(args.kills)]
        jobs_planned = args.messages // args.job_every if args.job_every else 0
        expected_sent = 2 * args.messages + jobs_planned + jobs_planned // 5

        with MotoServer() as server:
            os.environ.update(server.environment())
            import boto3
            from botocore.config import Config

            config = Config(max_pool_connections=16, retries={"mode": "standard", "max_attempts": 8})
            s3, sqs = boto3.client("s3", config=config), boto3.client("sqs", config=config)
            stack = create_stack(s3, sqs, bucket=BUCKET, queue=QUEUE, visibility_timeout=args.visibility_timeout)
            tap_url = notify_tap(s3, sqs, stack)
            proxy = FaultProxy(server.endpoint, random_faults(args.fault_rate, args.seed)) if args.fault_rate else None
            endpoint = proxy.__enter__().endpoint if proxy else server.endpoint
            log(f"moto at {server.endpoint}, the worker's endpoint {endpoint}; {len(plan)} photos planned "
                f"({sum(1 for p in plan.values() if p.expected and p.expected[0] == 'error')} bad, "
                f"{sum(1 for p in plan.values() if p.expected is None)} worst-case), {jobs_planned} jobs, "
                f"~{expected_sent} messages; kills at {[round(f, 3) for f in kill_at]}")
            env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "DOGBREEDS_MODEL": model,
                   "DOGBREEDS_QUEUE_URL": stack.queue_url, "PYTHONUNBUFFERED": "1"}
            worker_log = tmp / "worker.log"
            worker = Worker(env, worker_log, args.visibility_timeout)
            traffic, queued, stop_forwarding = Traffic(), [0], threading.Event()
            forwarder = threading.Thread(target=forward, args=(boto3.client("sqs", config=config), tap_url,
                                                               stack.queue_url, traffic, stop_forwarding, args.seed),
                                         daemon=True)
            forwarder.start()
            uploader = threading.Thread(target=upload, args=(s3, boto3.client("sqs", config=config), stack.queue_url,
                                                             plan, traffic, queued, args.backlog, args.job_every,
                                                             random.Random(args.seed + 1)), daemon=True)
            uploader.start()

            kills, kills_in_flight, unexpected_exits, quiet = 0, 0, 0, 0
            try:
                deadline = time.monotonic() + args.timeout
                last_report = 0.0
                while time.monotonic() < deadline:
                    time.sleep(0.25)
                    visible, in_flight, delayed = queue_counts(sqs, stack.queue_url)
                    queued[0] = visible
                    with traffic.lock:
                        sent, forwarded = traffic.sent, len(traffic.events)
                    done = max(0, sent - visible - in_flight - delayed)
                    if traffic.errors:
                        raise RuntimeError(f"sending the messages failed: {traffic.errors[0]!r}")
                    if not worker.alive():
                        unexpected_exits += 1
                        log(f"the worker exited by itself ({worker.process.returncode}); restarting it")
                        worker.stop()
                        if unexpected_exits > 5:
                            log("worker log tail:\n" + worker_log.read_text(errors="replace")[-3000:])
                            raise RuntimeError("the worker keeps exiting by itself; giving up")
                        worker = Worker(env, worker_log, args.visibility_timeout)
                    if kills < len(kill_at) and done >= kill_at[kills] * expected_sent:
                        time.sleep(kill_delay[kills])
                        in_flight = queue_counts(sqs, stack.queue_url)[1]
                        worker.kill()
                        kills += 1
                        kills_in_flight += in_flight > 0
                        log(f"SIGKILL {kills}/{len(kill_at)} at ~{done} messages done, {in_flight} in flight; restarting")
                        worker = Worker(env, worker_log, args.visibility_timeout)
                        continue
                    if time.monotonic() - last_report > 15:
                        last_report = time.monotonic()
                        log(f"{traffic.uploaded} uploaded, {sent} sent, ~{done} done, {visible} queued, "
                            f"{delayed} delayed, {in_flight} in flight")
                    finished = (not uploader.is_alive() and forwarded == len(plan)
                                and visible == 0 and in_flight == 0 and delayed == 0)
                    quiet = quiet + 1 if finished else 0
                    if quiet >= 3:
                        break
                else:
                    log(f"timed out after {args.timeout}s")
                # a SIGTERM that lands while the worker is still loading the model (before its signal handlers
                # are installed) ends it the default way, which is fine with nothing in flight: give it a moment to
                # get going, and accept -SIGTERM only from a worker that never got to work.
                ready_by = time.monotonic() + 20
                while worker.alive() and not worker.has_worked() and time.monotonic() < ready_by:
                    time.sleep(0.25)
                worked = worker.has_worked()
                code = worker.stop()
                if code != 0 and (worked or code != -signal.SIGTERM):
                    unexpected_exits += 1
                    log(f"the worker did not stop cleanly on SIGTERM ({code})")
            finally:
                stop_forwarding.set()
                if worker.alive():  # only after an error: the run above stops it
                    worker.process.kill()
                    worker.process.wait()
                if proxy is not None:
                    proxy.__exit__(None, None, None)
            log("queue drained; classifying every planted photo alone and reading the manifests")
            result = tally(s3, plan, expected_manifests(traffic), labels_alone(model, plan))
            dead = queue_counts(sqs, stack.dlq_url)
            if (unexpected_exits or any(result[k] for k in FAILURES if k in result)) and worker_log.exists():
                log("worker log tail:\n" + worker_log.read_text(errors="replace")[-3000:])
    result.update(sent=traffic.sent, events=len(traffic.events), jobs=len(traffic.jobs), kills=kills,
                  kills_in_flight=kills_in_flight, dlq=sum(dead), unexpected_exits=unexpected_exits,
                  kills_planned=len(kill_at), worst_case=sum(1 for p in plan.values() if p.expected is None),
                  faults={a: n for a, n in proxy.actions().items() if a != "pass"} if proxy else {},
                  seconds=round(time.perf_counter() - started, 1))
    return result


FAILURES = ("lost", "duplicated", "wrong_key", "wrong_label", "mismatched", "dlq", "unexpected_exits")


def expected_manifests(traffic: Traffic) -> dict[str, set[str]]:
    """manifest key -> the photos its message names (an event and its copy: one manifest)."""
    from worker.messages import parse_message

    expected: dict[str, set[str]] = {}
    for body in traffic.events:
        job = parse_message(body)
        expected[f"manifests/{job.job_id}.json"] = {ref.key for ref in job.refs}
    for job_id, keys in traffic.jobs.items():
        expected[f"manifests/{job_id}.json"] = set(keys)
    return expected


def labels_alone(model: str, plan: dict[str, Planted]) -> dict[str, tuple[str, str]]:
    """key -> ("ok", breed), ("no_dog" | "uncertain", None) or ("error", code): each distinct photo
    decoded and classified on its own."""
    from worker import images
    from worker.classifier import Classifier

    classifier = Classifier.load(model, runtime="tf")
    by_body: dict[bytes, tuple[str, str]] = {}

    def alone(body: bytes | None) -> tuple[str, str]:
        if body is None:
            return ("error", "not_found")
        digest = hashlib.sha256(body).digest()
        if digest not in by_body:
            try:
                pixels = images.load_image(body, size=classifier.input_size, fit=classifier.input_fit)
            except images.ImageDecodeError as error:
                by_body[digest] = ("error", error.code)
            else:
                verdict = classifier.predict(pixels[None])[0]  # ok with its breed, or no_dog / uncertain
                by_body[digest] = (verdict.status, verdict.breed.breed if verdict.breed else None)
        return by_body[digest]

    return {key: alone(planted.body) for key, planted in plan.items()}


def tally(s3, plan: dict[str, Planted], expected: dict[str, set[str]], alone: dict[str, tuple[str, str]]) -> dict:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="manifests/"):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def read(key):
        return key, json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    with ThreadPoolExecutor(8) as pool:
        documents = dict(pool.map(read, keys))
    status = Counter()
    entries: Counter = Counter()  # photo -> entries in all manifests
    wanted: Counter = Counter()  # photo -> messages (distinct manifests) naming it
    for photos in expected.values():
        wanted.update(photos)
    lost = wrong_key = wrong_label = mismatched = unexpected = 0
    for key, doc in documents.items():
        items = doc["items"]
        status.update(item["status"] for item in items)
        entries.update(item["key"] for item in items)
        names = expected.get(key)
        if names is None:
            unexpected += 1
            wrong_key += sum(1 for item in items if item["key"] not in plan)
            continue
        for item in items:
            if item["key"] not in names:
                wrong_key += 1
                continue
            got = (item["status"], item["error_code"] if item["status"] == "error" else item["breed"])
            wrong_label += got != alone[item["key"]]
            planted = plan[item["key"]].expected
            mismatched += planted is not None and got != planted
    for key, names in expected.items():
        listed = {item["key"] for item in documents[key]["items"]} if key in documents else set()
        lost += len(names - listed)
    duplicated = sum(1 for photo, n in entries.items() if n > wanted[photo])
    return {"manifests": len(keys), "expected_manifests": len(expected), "ok": status["ok"],
            "error": status["error"], "lost": lost, "duplicated": duplicated, "wrong_key": wrong_key,
            "wrong_label": wrong_label, "mismatched": mismatched, "unexpected_manifests": unexpected,
            "photos_without_entry": sum(1 for key in plan if not entries[key])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000,
                        help="Photos dropped = S3 event notifications (each sent twice to the worker's queue).")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the worker (each followed by a restart).")
    parser.add_argument("--bad-fraction", type=float, default=0.10, help="Share of bad photos.")
    parser.add_argument("--worst-fraction", type=float, default=0.05, help="Share of worst-case photos.")
    parser.add_argument("--job-every", type=int, default=25,
                        help="One job message (2-8 photos already dropped) per this many photos; 0: none.")
    parser.add_argument("--fault-rate", type=float, default=0.02,
                        help="Share of the worker's S3/SQS requests the fault proxy fails; 0: no proxy.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the photos, jobs, delays, faults and kill moments.")
    parser.add_argument("--visibility-timeout", type=int, default=6,
                        help="Seconds before a killed worker's messages are redelivered.")
    parser.add_argument("--backlog", type=int, default=200,
                        help="Photos are dropped while fewer than this many notifications and messages wait "
                             "(moto's SQS slows down with the queue depth).")
    parser.add_argument("--model", help="An existing colour-model artifact folder (default: build one).")
    parser.add_argument("--timeout", type=float, default=3600, help="Give up after this many seconds.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.kills < 0 or args.backlog < 1 or args.job_every < 0 \
            or not 0 <= args.bad_fraction + args.worst_fraction <= 1 or not 0 <= args.fault_rate < 1:
        parser.error("need --messages >= 1, --kills >= 0, --backlog >= 1, --job-every >= 0, "
                     "0 <= --bad-fraction + --worst-fraction <= 1 and 0 <= --fault-rate < 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the worker and moto's server

    result = soak(args)
    failed = any(result[k] for k in FAILURES) or result["kills"] != result["kills_planned"]
    if args.json:
        print(json.dumps(result))
    else:
        rows = [("messages sent", f"{result['sent']} ({result['events']} events x 2, {result['jobs']} jobs, "
                                  f"some twice)"),
                ("manifests written", f"{result['manifests']} of {result['expected_manifests']} expected"),
                ("items ok", result["ok"]), ("items error", result["error"]), ("lost", result["lost"]),
                ("duplicated", result["duplicated"]), ("wrong_key", result["wrong_key"]),
                ("wrong_label", result["wrong_label"]),
                ("kills", f"{result['kills']} ({result['kills_in_flight']} with messages in flight)"),
                ("mismatched", result["mismatched"]), ("dead-lettered", result["dlq"]),
                ("unexpected worker exits", result["unexpected_exits"]),
                ("worst-case photos", result["worst_case"]), ("faults injected", result["faults"]),
                ("wall time", f"{result['seconds']} s")]
        for name, value in rows:
            print(f"{name:<26}{value}")
        print("FAILED" if failed else "OK: nothing lost, nothing duplicated, nothing wrong")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
