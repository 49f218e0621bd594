"""`make soak`: thousands of photos through the real worker while it is SIGKILLed and restarted; nothing
may be lost and nothing duplicated.

1. start moto's server as a child process on 127.0.0.1 (``infra.local_stack.MotoServer``) and create the
   stack (bucket, ``incoming/`` -> queue notifications, a dead-letter queue);
2. build the tiny colour model artifact (``benchmarks/tiny_model.py``; or ``--model`` an existing one);
3. start ``python -m worker.cli run`` (short visibility timeout, so killed work is redelivered quickly) and
   drop ``--messages`` photos into ``incoming/``: **each photo is one S3 event notification message**
   (the path users take; event keys are URL-encoded, and a redelivered event must map to the same manifest
   key through its content-derived job id). Photos are dropped as the worker keeps up (at most
   ``--backlog`` messages waiting: moto's SQS gets slower the deeper its queue). ``--bad-fraction`` of them (10%) are bad: empty, text, HTML,
   truncated JPEG, PNG with a broken CRC, or deleted before the worker gets to it; every 10th key has
   spaces, '+' and non-ASCII characters in it;
4. SIGKILL the worker ``--kills`` times, at moments drawn with ``--seed`` (once a random fraction, between
   10% and 80%, of the messages is done, plus a random 0-0.5 s), restarting it straight away;
5. when the queue is empty (nothing visible, nothing in flight), stop the worker with SIGTERM, read every
   manifest and count, per photo, its final manifest entries.

Printed: messages sent, manifests written, items ok, items error, lost (photos with no manifest entry),
duplicated (photos with more than one entry across all manifests -- a redelivered message whose manifest
landed under a second key counts here), kills; also ``mismatched`` (an entry that is not what was planted:
wrong breed, wrong error code, ok for a bad photo or the reverse, or an entry for a key never dropped), ``dlq`` (messages dead-lettered) and
``unexpected_exits`` (worker deaths the soak did not cause). ``--json`` prints one JSON object instead.
The exit status is non-zero unless lost, duplicated, mismatched, dlq and unexpected_exits are all 0 and
every planned kill happened.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.tiny_model import COLOUR_BREEDS, breed_name, build_colour_artifact, colour_photo  # noqa: E402
from infra.local_stack import MotoServer, create_stack  # noqa: E402

BUCKET = "soak"
QUEUE = "soak-photos"


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


def plan_photos(n: int, bad_fraction: float, rng: random.Random):
    """key -> (bytes or None, expected): expected is ("ok", breed) or ("error", code)."""
    folders = list(COLOUR_BREEDS)
    good = {folder: [colour_photo(COLOUR_BREEDS[folder], size=(64, 48), seed=s) for s in range(8)]
            for folder in folders}
    kinds = bad_kinds()
    bad = set(rng.sample(range(n), round(n * bad_fraction)))
    plan = {}
    for i in range(n):
        odd = " dog+ü 🐶 " if i % 10 == 3 else "-"  # URL-encoded in the S3 event
        if i in bad:
            kind, suffix, body, code = kinds[i % len(kinds)]
            plan[f"incoming/{i:06d}{odd}{kind}{suffix}"] = (body, ("error", code))
        else:
            folder = folders[i % len(folders)]
            plan[f"incoming/{i:06d}{odd}{breed_name(folder)}.jpg"] = (good[folder][i % 8], ("ok", breed_name(folder)))
    return plan


def upload(s3, plan: dict, progress: list[int], errors: list[BaseException], queued: list[int], backlog: int,
           threads: int = 4) -> None:
    try:
        _upload(s3, plan, progress, queued, backlog, threads)
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        errors.append(error)


def _upload(s3, plan: dict, progress: list[int], queued: list[int], backlog: int, threads: int) -> None:
    lock = threading.Lock()

    def put(item):
        key, (body, _) = item
        while queued[0] >= backlog:  # updated by the main loop every 0.25 s
            time.sleep(0.05)
        s3.put_object(Bucket=BUCKET, Key=key, Body=body if body is not None else b"soon deleted")
        if body is None:
            s3.delete_object(Bucket=BUCKET, Key=key)
        with lock:
            progress[0] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, plan.items()))


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


def queue_counts(sqs, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                                                    "ApproximateNumberOfMessagesNotVisible"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"]), \
        int(attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"])


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
        plan = plan_photos(args.messages, args.bad_fraction, rng)
        kill_at = sorted(rng.uniform(0.1, 0.8) for _ in range(args.kills))
        kill_delay = [rng.uniform(0.0, 0.5) for _ in range(args.kills)]

        with MotoServer() as server:
            os.environ.update(server.environment())
            import boto3
            from botocore.config import Config

            config = Config(max_pool_connections=16, retries={"mode": "standard", "max_attempts": 8})
            s3, sqs = boto3.client("s3", config=config), boto3.client("sqs", config=config)
            stack = create_stack(s3, sqs, bucket=BUCKET, queue=QUEUE, visibility_timeout=args.visibility_timeout)
            log(f"moto at {server.endpoint}; {len(plan)} photos planned, "
                f"{sum(1 for _, (s, _) in plan.values() if s == 'error')} bad; kills at {[round(f, 3) for f in kill_at]}")
            env = {**os.environ, "DOGBREEDS_MODEL": model, "DOGBREEDS_QUEUE_URL": stack.queue_url,
                   "PYTHONUNBUFFERED": "1"}
            worker_log = tmp / "worker.log"
            worker = Worker(env, worker_log, args.visibility_timeout)
            uploaded, upload_errors, queued = [0], [], [0]
            uploader = threading.Thread(target=upload, args=(s3, plan, uploaded, upload_errors, queued, args.backlog),
                                        daemon=True)
            uploader.start()

            kills, kills_in_flight, unexpected_exits, quiet = 0, 0, 0, 0
            try:
                deadline = time.monotonic() + args.timeout
                last_report = 0.0
                while time.monotonic() < deadline:
                    time.sleep(0.25)
                    visible, in_flight = queue_counts(sqs, stack.queue_url)
                    queued[0] = visible
                    done = max(0, uploaded[0] - visible - in_flight)
                    if upload_errors:
                        raise RuntimeError(f"uploading the photos failed: {upload_errors[0]!r}")
                    if not worker.alive():
                        unexpected_exits += 1
                        log(f"the worker exited by itself ({worker.process.returncode}); restarting it")
                        worker.stop()
                        if unexpected_exits > 5:
                            log("worker log tail:\n" + worker_log.read_text(errors="replace")[-3000:])
                            raise RuntimeError("the worker keeps exiting by itself; giving up")
                        worker = Worker(env, worker_log, args.visibility_timeout)
                    if kills < len(kill_at) and done >= kill_at[kills] * len(plan):
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
                        log(f"{uploaded[0]} uploaded, ~{done} done, {visible} queued, {in_flight} in flight")
                    finished = not uploader.is_alive() and visible == 0 and in_flight == 0
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
                if worker.alive():  # only after an error: the run above stops it
                    worker.process.kill()
                    worker.process.wait()
            log("queue drained; reading the manifests")
            result = tally(s3, plan)
            dead = queue_counts(sqs, stack.dlq_url)
            if (unexpected_exits or result["lost"] or result["duplicated"] or result["mismatched"]) \
                    and worker_log.exists():
                log("worker log tail:\n" + worker_log.read_text(errors="replace")[-3000:])
    result.update(kills=kills, kills_in_flight=kills_in_flight, dlq=sum(dead), unexpected_exits=unexpected_exits,
                  kills_planned=len(kill_at), seconds=round(time.perf_counter() - started, 1))
    return result


def tally(s3, plan: dict) -> dict:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="manifests/"):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def read(key):
        return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    with ThreadPoolExecutor(8) as pool:
        documents = list(pool.map(read, keys))
    entries: dict[str, list[dict]] = {}
    for doc in documents:
        for item in doc["items"]:
            entries.setdefault(item["key"], []).append(item)
    status = Counter()
    lost = duplicated = mismatched = 0
    for key, (_, (want_status, want)) in plan.items():
        found = entries.get(key, [])
        status.update(item["status"] for item in found)
        lost += not found
        duplicated += len(found) > 1
        for item in found[:1]:
            got = item["breed"] if item["status"] == "ok" else item["error_code"]
            mismatched += (item["status"], got) != (want_status, want)
    strangers = sorted(set(entries) - set(plan))
    return {"sent": len(plan), "manifests": len(keys), "ok": status["ok"], "error": status["error"], "lost": lost,
            "duplicated": duplicated, "mismatched": mismatched + len(strangers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="Photos dropped = S3 event messages sent.")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the worker (each followed by a restart).")
    parser.add_argument("--bad-fraction", type=float, default=0.10, help="Share of bad photos.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the bad photos and the kill moments.")
    parser.add_argument("--visibility-timeout", type=int, default=6,
                        help="Seconds before a killed worker's messages are redelivered.")
    parser.add_argument("--backlog", type=int, default=200,
                        help="Photos are dropped while fewer than this many messages wait in the queue "
                             "(moto's SQS slows down with the queue depth).")
    parser.add_argument("--model", help="An existing colour-model artifact folder (default: build one).")
    parser.add_argument("--timeout", type=float, default=3600, help="Give up after this many seconds.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.kills < 0 or not 0 <= args.bad_fraction <= 1 or args.backlog < 1:
        parser.error("need --messages >= 1, --kills >= 0, --backlog >= 1 and 0 <= --bad-fraction <= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the worker and moto's server

    result = soak(args)
    failed = any(result[k] for k in ("lost", "duplicated", "mismatched", "dlq", "unexpected_exits")) \
        or result["kills"] != result["kills_planned"]
    if args.json:
        print(json.dumps(result))
    else:
        rows = [("messages sent", result["sent"]), ("manifests written", result["manifests"]),
                ("items ok", result["ok"]), ("items error", result["error"]), ("lost", result["lost"]),
                ("duplicated", result["duplicated"]),
                ("kills", f"{result['kills']} ({result['kills_in_flight']} with messages in flight)"),
                ("mismatched", result["mismatched"]), ("dead-lettered", result["dlq"]),
                ("unexpected worker exits", result["unexpected_exits"]), ("wall time", f"{result['seconds']} s")]
        for name, value in rows:
            print(f"{name:<26}{value}")
        print("FAILED" if failed else "OK: nothing lost, nothing duplicated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
