"""Fast in-memory stand-ins for S3, SQS and a model, so the batch logic can be run hundreds of
times a second (property tests) with faults injected at every step.

* :class:`MemoryS3`: versioned objects, ``get_object`` with ``VersionId``/``IfMatch`` (a 412
  ``PreconditionFailed`` as S3 answers it), ``put_object``, the ``list_objects_v2`` paginator;
  ``get_faults``/``put_faults`` map a key to an exception raised on its read / write.
* :class:`MemorySQS`: hands out prepared batches, records deletes and visibility changes, can
  answer entries as ``Failed``; ``send_message_batch`` records what is sent (and, with
  ``requeue``, hands it out in a later receive).
* :class:`FakeClock` / :class:`LambdaContext`: time that passes only when the code under test
  does something (a read, a photo inferred, a PUT, ...), and a Lambda context whose remaining
  time is read from it: deadlines without sleeps.
* :class:`PixelClassifier`: the label, the dog score and the verdict are pure functions of the
  pixels (a CRC of the decoded photo), so a photo gets the same answer alone or in any batch,
  and a mix-up shows.
* :func:`photo`: a tiny PNG whose pixels are unique to its id (decoded exactly, no resampling
  at :data:`PHOTO_SIZE`).
"""

from __future__ import annotations

import hashlib
import io
import threading
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image

from worker.classifier import BreedScore, Prediction, verdict

PHOTO_SIZE = (8, 8)  # (width, height): the fake model's input size, so decoding never resamples
BREEDS = ("Chihuahua", "Samoyed", "beagle", "pug", "basenji", "whippet", "Saluki", "dingo", "dhole", "komondor",
          "kuvasz", "Brittany spaniel", "keeshond")


@lru_cache(maxsize=None)
def photo(photo_id: int) -> bytes:
    """An 8x8 RGB PNG whose pixels are a function of ``photo_id`` (distinct ids, distinct pixels)."""
    pixels = np.random.default_rng(photo_id).integers(0, 256, (PHOTO_SIZE[1], PHOTO_SIZE[0], 3), dtype=np.uint8)
    pixels[0, 0] = (photo_id >> 16) & 255, (photo_id >> 8) & 255, photo_id & 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def photo_id_of(pixels: np.ndarray) -> int:
    r, g, b = (int(v) for v in pixels[0, 0])
    return (r << 16) | (g << 8) | b


def label_of(pixels: np.ndarray) -> list[BreedScore]:
    """The fake model: top-2 breeds, a pure function of the pixels."""
    digest = zlib.crc32(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    first, second = digest % len(BREEDS), (digest // len(BREEDS)) % len(BREEDS)
    if second == first:
        second = (first + 1) % len(BREEDS)
    score = 0.5 + (digest % 499) / 1000
    return [BreedScore(f"n{first:08d}", BREEDS[first], score), BreedScore(f"n{second:08d}", BREEDS[second], 1 - score)]


def dog_score_of(pixels: np.ndarray) -> float:
    """The fake model's dog score, in [0, 1), a pure function of the pixels (not of the label)."""
    digest = zlib.crc32(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()[::-1])
    return (digest % 1000) / 1000


def prediction_of(pixels: np.ndarray, dog_threshold: float | None = None) -> Prediction:
    """The fake model's verdict: :func:`label_of`, :func:`dog_score_of` and the worker's own
    status rule (``no_dog`` below ``dog_threshold``; None: no dog check, no dog score)."""
    top = label_of(pixels)
    dog = None if dog_threshold is None else dog_score_of(pixels)
    return Prediction(verdict(top[0].score, dog, dog_threshold=dog_threshold, min_score=None), top, dog)


class PixelClassifier:
    """Stands in for :class:`worker.classifier.Classifier`. ``faults`` maps a photo id to
    ``(exception, times)``: a call whose batch holds that photo raises, ``times`` times (None:
    always). ``calls`` counts the photos of every call. ``dog_threshold``: the fake's dog check
    (None: none, every photo ``ok``)."""

    input_size, input_fit = PHOTO_SIZE, "crop"
    model_info = {"name": "pixels", "version": "v1", "runtime": "fake"}

    def __init__(self, faults: dict[int, tuple[BaseException, int | None]] | None = None,
                 dog_threshold: float | None = None):
        self.faults = dict(faults or {})
        self.dog_threshold = dog_threshold
        self.lock = threading.Lock()
        self.calls: list[list[int]] = []

    def classify(self, pixels: np.ndarray) -> list[list[BreedScore]]:
        return [p.top_k for p in self.predict(pixels)]

    def predict(self, pixels: np.ndarray) -> list[Prediction]:
        ids = [photo_id_of(p) for p in pixels]
        with self.lock:
            self.calls.append(ids)
            raising = None
            for photo_id in ids:
                if photo_id in self.faults:
                    error, times = self.faults[photo_id]
                    if times is None or times > 0:
                        raising = error
                        if times is not None:
                            self.faults[photo_id] = (error, times - 1)
        if raising is not None:
            raise raising
        return [prediction_of(p, self.dog_threshold) for p in pixels]


def client_error(code: str, status: int, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} (fake)"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@dataclass
class Version:
    version_id: str | None
    etag: str
    body: bytes


class _Body:
    def __init__(self, data: bytes):
        self._data = data

    def read(self, *_):
        return self._data

    def close(self):
        pass


class _Paginator:
    def __init__(self, s3: "MemoryS3"):
        self.s3 = s3

    def paginate(self, Bucket, Prefix="", PaginationConfig=None):  # noqa: N803 - boto3's names
        if Bucket in self.s3.list_faults:
            raise self.s3.list_faults[Bucket]
        size = (PaginationConfig or {}).get("PageSize") or 1000
        with self.s3.lock:
            keys = sorted(k for (b, k) in self.s3.objects if b == Bucket and k.startswith(Prefix))
            contents = [{"Key": k, "ETag": f'"{self.s3.objects[(Bucket, k)][-1].etag}"',
                         "Size": len(self.s3.objects[(Bucket, k)][-1].body)} for k in keys]
        for start in range(0, max(1, len(contents)), size):
            yield {"Contents": contents[start:start + size]}


class MemoryS3:
    """A versioned in-memory S3 with the calls the worker makes."""

    def __init__(self, versioned: bool = False):
        self.versioned = versioned
        self.objects: dict[tuple[str, str], list[Version]] = {}
        self.lock = threading.Lock()
        self.reads: Counter = Counter()  # (bucket, key, version id asked for) -> get_object calls
        self.get_faults: dict[tuple[str, str], BaseException] = {}
        self.put_faults: dict[tuple[str, str], BaseException] = {}
        self.list_faults: dict[str, BaseException] = {}
        self.puts: list[tuple[str, str]] = []

    def add(self, bucket: str, key: str, body: bytes) -> Version:
        with self.lock:
            versions = self.objects.setdefault((bucket, key), [])
            version_id = f"v{len(versions) + 1}-{hashlib.md5(key.encode()).hexdigest()[:6]}" if self.versioned else None
            version = Version(version_id, hashlib.md5(body).hexdigest(), body)
            if self.versioned:
                versions.append(version)
            else:
                versions[:] = [version]
            return version

    def current(self, bucket: str, key: str) -> Version | None:
        with self.lock:
            versions = self.objects.get((bucket, key))
            return versions[-1] if versions else None

    def get_object(self, Bucket, Key, VersionId=None, IfMatch=None, **kw):  # noqa: N803
        with self.lock:
            self.reads[(Bucket, Key, VersionId)] += 1
            fault = self.get_faults.get((Bucket, Key))
            versions = list(self.objects.get((Bucket, Key), ()))
        if fault is not None:
            raise fault
        if not versions:
            raise client_error("NoSuchKey", 404, "GetObject")
        if VersionId is not None:
            found = [v for v in versions if v.version_id == VersionId]
            if not found:
                raise client_error("NoSuchVersion", 404, "GetObject")
            version = found[0]
        else:
            version = versions[-1]
        if IfMatch is not None and IfMatch.strip('"') != version.etag:
            raise client_error("PreconditionFailed", 412, "GetObject")
        response = {"Body": _Body(version.body), "ETag": f'"{version.etag}"', "ContentLength": len(version.body)}
        if version.version_id is not None:
            response["VersionId"] = version.version_id
        return response

    def put_object(self, Bucket, Key, Body, **kw):  # noqa: N803
        fault = self.put_faults.get((Bucket, Key))
        if fault is not None:
            raise fault
        with self.lock:
            self.puts.append((Bucket, Key))
        self.add(Bucket, Key, bytes(Body))
        return {}

    def get_paginator(self, name: str):
        assert name == "list_objects_v2"
        return _Paginator(self)


class MemorySQS:
    """Hands out prepared receive batches (then empty ones). ``failing_deletes`` maps a receipt
    handle to how many delete attempts answer it as ``Failed`` (None: always);
    ``failing_visibility`` the same for visibility changes; ``failing_sends`` how many
    send_message_batch entries answer ``Failed`` (None: all). ``sent`` records (queue URL, body)
    of every message sent; with ``requeue`` each send call's messages become a later receive."""

    def __init__(self, batches: list[list[dict]], failing_deletes: dict | None = None,
                 failing_visibility: dict | None = None, failing_sends: int | None = 0, requeue: bool = False):
        self.sent: list[tuple[str, str]] = []
        self.failing_sends = failing_sends
        self.requeue = requeue
        self.batches = deque(batches)
        self.lock = threading.Lock()
        self.deleted: list[str] = []
        self.visibility: list[tuple[str, int]] = []
        self.failing_deletes = dict(failing_deletes or {})
        self.failing_visibility = dict(failing_visibility or {})
        self.delete_attempts: Counter = Counter()

    def receive_message(self, **kw):
        with self.lock:
            return {"Messages": self.batches.popleft() if self.batches else []}

    def _fails(self, table: dict, receipt: str) -> bool:
        if receipt not in table:
            return False
        times = table[receipt]
        if times is None:
            return True
        if times > 0:
            table[receipt] = times - 1
            return True
        return False

    def delete_message_batch(self, QueueUrl, Entries):  # noqa: N803
        ok, failed = [], []
        with self.lock:
            for entry in Entries:
                self.delete_attempts[entry["ReceiptHandle"]] += 1
                if self._fails(self.failing_deletes, entry["ReceiptHandle"]):
                    failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError",
                                   "Message": "fake"})
                else:
                    self.deleted.append(entry["ReceiptHandle"])
                    ok.append({"Id": entry["Id"]})
        return {"Successful": ok, "Failed": failed}

    def change_message_visibility_batch(self, QueueUrl, Entries):  # noqa: N803
        ok, failed = [], []
        with self.lock:
            for entry in Entries:
                if self._fails(self.failing_visibility, entry["ReceiptHandle"]):
                    failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError",
                                   "Message": "fake"})
                else:
                    self.visibility.append((entry["ReceiptHandle"], entry["VisibilityTimeout"]))
                    ok.append({"Id": entry["Id"]})
        return {"Successful": ok, "Failed": failed}


    def send_message_batch(self, QueueUrl, Entries):  # noqa: N803
        assert 1 <= len(Entries) <= 10, len(Entries)
        assert sum(len(e["MessageBody"].encode()) for e in Entries) <= 262_144
        ok, failed, batch = [], [], []
        with self.lock:
            for entry in Entries:
                if self.failing_sends is None or self.failing_sends > 0:
                    if self.failing_sends is not None:
                        self.failing_sends -= 1
                    failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError", "Message": "fake"})
                    continue
                n = len(self.sent)
                self.sent.append((QueueUrl, entry["MessageBody"]))
                batch.append({"MessageId": f"sent-{n}", "ReceiptHandle": f"r-sent-{n}", "Body": entry["MessageBody"]})
                ok.append({"Id": entry["Id"], "MessageId": f"sent-{n}"})
            if self.requeue and batch:
                self.batches.append(batch)
        return {"Successful": ok, "Failed": failed}


class FakeClock:
    """Milliseconds that pass only when :meth:`tick` is called (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now_ms = 0.0

    def tick(self, ms: float = 1000.0) -> None:
        with self.lock:
            self.now_ms += ms

    def ticking(self, call, ms: float = 1000.0):
        """``call``, costing ``ms`` of fake time each time it is made."""
        def timed(*args, **kw):
            self.tick(ms)
            return call(*args, **kw)
        return timed


class LambdaContext:
    """A Lambda context whose remaining time is ``budget_ms`` less the fake clock's time."""

    function_name = "dogbreeds-worker"
    memory_limit_in_mb = 3008
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:dogbreeds-worker"
    aws_request_id = "test-request"

    def __init__(self, clock: FakeClock | None = None, budget_ms: float = 900_000.0):
        self.clock, self.budget_ms = clock or FakeClock(), budget_ms

    def get_remaining_time_in_millis(self) -> int:
        return int(self.budget_ms - self.clock.now_ms)


class TickingClassifier(PixelClassifier):
    """A :class:`PixelClassifier` whose every photo inferred costs ``ms_per_photo`` of fake time."""

    def __init__(self, clock: FakeClock, ms_per_photo: float = 1000.0, faults=None, dog_threshold=None):
        super().__init__(faults, dog_threshold)
        self.clock, self.ms_per_photo = clock, ms_per_photo

    def predict(self, pixels):  # what the pipeline calls
        self.clock.tick(self.ms_per_photo * len(pixels))
        return super().predict(pixels)


def s3_event(bucket: str, key: str, etag: str | None, version_id: str | None = None, sequencer: str = "01",
             sns: bool = False) -> str:
    """The body S3 sends for one ``ObjectCreated:Put`` (the key URL-encoded as S3 does it),
    optionally wrapped in an SNS notification."""
    import json
    from urllib.parse import quote_plus

    obj = {"key": quote_plus(key, safe="/"), "size": 1, "sequencer": sequencer}
    if etag is not None:
        obj["eTag"] = etag
    if version_id is not None:
        obj["versionId"] = version_id
    body = json.dumps({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                                    "eventName": "ObjectCreated:Put",
                                    "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket},
                                           "object": obj}}]})
    if sns:
        body = json.dumps({"Type": "Notification", "MessageId": "sns-1", "Message": body})
    return body
