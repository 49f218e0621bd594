"""Properties of the batch logic (worker.jobs + worker.pipeline, and the poller around them),
on random batches: job messages, prefix jobs and S3 events (some SNS-wrapped, some delivered
twice, some naming an object overwritten since) over overlapping and repeated awkward keys
(spaces, ``+``, ``%``, unicode, up to S3's 1,024 bytes), missing objects and bad photos, with
faults injected at every step: get_object, decode, inference, manifest PUT, listing, delete.

Invariants, for every message of every batch:

* a message succeeds exactly when none of its photos hit a fault that must be retried and its
  manifest PUT worked (fault isolation: nobody else's fault fails it);
* a successful message's manifest lists exactly its message's photos (a job's keys once each,
  an event's records, a prefix's listing) and each item is what that photo gets classified
  alone: the verdict of its own pixels (ok with its label, or no_dog, with its dog score), or
  its own error code, with the ETag/version read;
* a deleted message has that manifest; a message that failed is not deleted.

The oracle is computed from the generated world (the objects, their versions, the faults)
without the worker's code: the fake model's label and dog score are pure functions of the pixels.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import MemoryS3, MemorySQS, PixelClassifier, client_error, photo, prediction_of, s3_event
from worker import images
from worker.jobs import OutputSettings, QueuedMessage, process_messages
from worker.manifests import read_manifest
from worker.messages import IMAGE_SUFFIXES, parse_message
from worker.pipeline import Pipeline, PipelineSettings
from worker.poller import Poller, PollerSettings

BUCKETS = ("photos", "more photos".replace(" ", "-"))
OUT = "out"  # manifests go to their own bucket, so prefix listings never see them
PREFIXES = ("", "p/", "q r/", "é/")
FAIL = "fail"
DOG_THRESHOLD = 0.25  # the fake model's dog check: about a quarter of the photos are answered no_dog

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- #
# the world: objects, messages and faults
# --------------------------------------------------------------------------- #

awkward_names = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab c+%é/ü😀-_()&=~'")), min_size=1, max_size=12),
    st.integers(950, 1000).map(lambda n: "a" * n),  # long: the key is up to 1,024 UTF-8 bytes
    st.integers(450, 500).map(lambda n: "é" * n),
    st.sampled_from(["odd dir/dog photo+1 é (copy)", "a%20b", "a+b", "%", "+", " "]),
).filter(lambda name: not name.startswith("/"))


@st.composite
def keys(draw):
    name = draw(st.sampled_from(PREFIXES)) + draw(awkward_names) + draw(st.sampled_from([".png", ".png", ".jpg",
                                                                                         ".txt"]))
    if len(name.encode()) > 1024:
        name = name.encode()[-1024:].decode("utf-8", "ignore").lstrip("/")
    return name


class World:
    """The objects and faults of one example; ``expect`` is the oracle."""

    def __init__(self, versioned: bool):
        self.s3 = MemoryS3(versioned=versioned)
        self.versioned = versioned
        self.next_photo = 1
        self.decode_faults: dict[bytes, BaseException] = {}
        self.infer_always: set[int] = set()  # photo ids whose inference fails even alone
        self.classifier = PixelClassifier(dog_threshold=DOG_THRESHOLD)

    def __repr__(self) -> str:
        objects = {f"{b}/{k}": [(v.version_id, v.etag[:6], len(v.body)) for v in vs] for (b, k), vs in self.s3.objects.items()}
        return (f"World(objects={objects}, get_faults={list(self.s3.get_faults)}, list_faults={list(self.s3.list_faults)}, "
                f"put_faults={list(self.s3.put_faults)}, decode_faults={list(self.decode_faults.values())}, "
                f"infer_faults={self.classifier.faults})")

    def new_photo(self) -> bytes:
        self.next_photo += 1
        return photo(self.next_photo)

    # -- the oracle -------------------------------------------------------- #
    def expect_item(self, bucket: str, key: str, etag: str | None, version_id: str | None, exact: bool):
        """(bucket, key, status, code, breed, etag, version) of this photo classified alone,
        or FAIL when its message must be retried."""
        if (bucket, key) in self.s3.get_faults:
            return FAIL
        versions = self.s3.objects.get((bucket, key))
        if not versions:
            return (bucket, key, "error", "not_found", None, etag, version_id)
        if exact and version_id:
            found = [v for v in versions if v.version_id == version_id]
            if not found:
                return (bucket, key, "error", "not_found", None, etag, version_id)
            version = found[0]
        elif exact and etag and versions[-1].etag != etag:
            return (bucket, key, "error", "changed", None, etag, version_id)
        else:
            version = versions[-1]
        fault = self.decode_faults.get(version.body)
        if isinstance(fault, MemoryError):
            return FAIL
        if fault is not None:
            return (bucket, key, "error", "internal_error", None, version.etag, version.version_id)
        try:
            pixels = images.load_image(version.body, size=self.classifier.input_size)
        except images.ImageDecodeError as error:
            return (bucket, key, "error", error.code, None, version.etag, version.version_id)
        if int.from_bytes(bytes(pixels[0, 0]), "big") in self.infer_always:
            return FAIL
        answer = prediction_of(pixels, DOG_THRESHOLD)
        breed = answer.breed.breed if answer.breed else None
        return (bucket, key, answer.status, None, breed, version.etag, version.version_id, answer.dog_score)

    def expect(self, spec) -> list | str:
        """The items of a message's manifest (sorted), or FAIL."""
        kind = spec[0]
        if kind == "malformed":
            return FAIL
        if kind == "job":
            _, _, bucket, names = spec
            refs = [(bucket, k, None, None, False) for k in dict.fromkeys(names)]  # a key named twice: one item
        elif kind == "prefix":
            _, _, bucket, prefix = spec
            if bucket in self.s3.list_faults:
                return FAIL
            listed = sorted(k for (b, k) in self.s3.objects if b == bucket and k.startswith(prefix)
                            and k.lower().endswith(IMAGE_SUFFIXES))
            refs = [(bucket, k, self.s3.objects[(bucket, k)][-1].etag, None, False) for k in listed]
        else:  # an S3 event: its records, once each
            refs = [(b, k, e, v, True) for (b, k, e, v) in dict.fromkeys(spec[1])]
        items = [self.expect_item(*ref) for ref in refs]
        if FAIL in items:
            return FAIL
        return sorted(items, key=_sortable)


def _sortable(item: tuple) -> tuple:
    return tuple("" if v is None else str(v) for v in item)


def manifest_items(doc) -> list[tuple]:
    return sorted(((i.bucket, i.key, i.status, i.error_code, i.breed, i.etag, i.version_id)
                   + ((i.dog_score,) if i.status != "error" else ()) for i in doc.items),
                  key=_sortable)


@st.composite
def batches(draw):
    """A world and a batch of message bodies naming its objects (with their specs)."""
    world = World(versioned=draw(st.booleans()))
    s3 = world.s3
    names = draw(st.lists(keys(), min_size=1, max_size=7, unique=True))
    objects = []  # (bucket, key)
    for name in names:
        bucket = draw(st.sampled_from(BUCKETS))
        kind = draw(st.sampled_from(["photo", "photo", "photo", "overwritten", "truncated", "text", "missing"]))
        if kind == "missing":
            objects.append((bucket, name))
            continue
        if kind in ("photo", "overwritten"):
            s3.add(bucket, name, world.new_photo())
            if kind == "overwritten":
                s3.add(bucket, name, world.new_photo())
        elif kind == "truncated":
            s3.add(bucket, name, world.new_photo()[:-30])
        else:
            s3.add(bucket, name, f"not a photo: {name}".encode())
        objects.append((bucket, name))

    # faults at every step
    for bucket, name in objects:
        step = draw(st.sampled_from([None] * 6 + ["get", "get-connection", "decode", "decode-memory", "infer-once",
                                                   "infer-always", "infer-memory"]))
        versions = s3.objects.get((bucket, name), [])
        if step == "get":
            s3.get_faults[(bucket, name)] = client_error("SlowDown", 503, "GetObject")
        elif step == "get-connection":
            s3.get_faults[(bucket, name)] = ConnectionResetError("connection reset by peer")
        elif step in ("decode", "decode-memory") and versions:
            world.decode_faults[versions[-1].body] = (MemoryError() if step == "decode-memory"
                                                      else RuntimeError("a decoding bug"))
        elif step and step.startswith("infer") and versions:
            photo_id = _photo_id(versions[-1].body)
            if photo_id is not None:
                error = MemoryError() if step == "infer-memory" else RuntimeError("runtime error")
                world.classifier.faults[photo_id] = (error, 1 if step == "infer-once" else None)
                if step != "infer-once":
                    world.infer_always.add(photo_id)
    for bucket in BUCKETS:
        if draw(st.integers(0, 9)) == 0:
            s3.list_faults[bucket] = client_error("InternalError", 500, "ListObjectsV2")

    specs, bodies = [], []
    for n in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["job", "job", "prefix", "event", "event", "again", "malformed"]))
        if kind == "again" and bodies:
            i = draw(st.integers(0, len(bodies) - 1))
            specs.append(specs[i])
            bodies.append(bodies[i])
            continue
        if kind == "job":
            bucket = draw(st.sampled_from(BUCKETS))
            picked = draw(st.lists(st.sampled_from([k for b, k in objects if b == bucket] or ["nothing.png"]),
                                   min_size=1, max_size=5))
            spec = ("job", f"job-{n}", bucket, picked)
            body = json.dumps({"job_id": f"job-{n}", "bucket": bucket, "keys": picked, "output_prefix": "manifests"})
        elif kind == "prefix":
            bucket, prefix = draw(st.sampled_from(BUCKETS)), draw(st.sampled_from(PREFIXES))
            spec = ("prefix", f"job-{n}", bucket, prefix)
            body = json.dumps({"job_id": f"job-{n}", "bucket": bucket, "prefix": prefix})
        elif kind in ("event", "again"):
            records = []
            for _ in range(draw(st.integers(1, 2))):
                bucket, name = draw(st.sampled_from(objects))
                versions = s3.objects.get((bucket, name)) or [None]
                version = draw(st.sampled_from(versions))  # the current one, or one overwritten since
                etag = version.etag if version else "0" * 32
                version_id = version.version_id if version else ("v-gone" if world.versioned else None)
                records.append((bucket, name, etag, version_id))
            spec = ("event", records)
            body = _event(records, sns=draw(st.booleans()))
        else:
            spec, body = ("malformed",), "{not json"
        specs.append(spec)
        bodies.append(body)

    manifest_keys = {}
    for i, body in enumerate(bodies):
        try:
            job = parse_message(body)
        except Exception:  # noqa: BLE001 - malformed
            continue
        manifest_keys[i] = f"manifests/{job.job_id}.json"
    for key in set(manifest_keys.values()):
        if draw(st.integers(0, 11)) == 0:
            s3.put_faults[(OUT, key)] = ConnectionError("PUT failed")
    return world, specs, bodies, manifest_keys


def _event(records, sns: bool) -> str:
    bodies = [json.loads(s3_event(b, k, e, v, sequencer=f"{i:02d}")) for i, (b, k, e, v) in enumerate(records)]
    body = json.dumps({"Records": [r for doc in bodies for r in doc["Records"]]})
    return json.dumps({"Type": "Notification", "MessageId": "sns", "Message": body}) if sns else body


def _photo_id(body: bytes) -> int | None:
    try:
        pixels = images.load_image(body, size=(8, 8))
    except images.ImageDecodeError:
        return None
    return int.from_bytes(bytes(pixels[0, 0]), "big")


@contextmanager
def decode_faults(world: World):
    load_image = images.load_image

    def faulty(data, **kw):
        fault = world.decode_faults.get(bytes(data))
        if fault is not None:
            raise fault
        return load_image(data, **kw)

    with mock.patch("worker.pipeline.images.load_image", faulty):
        yield


def check_message(world, spec, manifest_key, ok, s3) -> None:
    expected = world.expect(spec)
    if expected == FAIL or (OUT, manifest_key) in s3.put_faults:
        assert not ok, f"should have failed: {spec}"
        return
    assert ok, f"should have succeeded: {spec}"
    doc = read_manifest(s3, OUT, manifest_key)
    assert manifest_items(doc) == expected, spec


# --------------------------------------------------------------------------- #
# the properties
# --------------------------------------------------------------------------- #

@SETTINGS
@given(batches(), st.integers(1, 5), st.integers(1, 4))
def test_every_message_of_a_batch_gets_exactly_its_own_photos_with_their_own_labels(example, batch_size, threads):
    world, specs, bodies, manifest_keys = example
    s3 = world.s3
    pipeline = Pipeline(world.classifier, s3, PipelineSettings(batch_size=batch_size, download_threads=threads))
    messages = [QueuedMessage(f"m{i}", body) for i, body in enumerate(bodies)]
    try:
        with decode_faults(world):
            outcome = process_messages(messages, pipeline, OutputSettings(bucket=OUT))
    finally:
        pipeline.close()
    assert [o.message_id for o in outcome.outcomes] == [m.message_id for m in messages]
    # every object (version) named in the batch is read at most once, however many messages name it
    assert all(n == 1 for (bucket, _, _), n in s3.reads.items() if bucket != OUT)
    for i, (spec, o) in enumerate(zip(specs, outcome.outcomes)):
        check_message(world, spec, manifest_keys.get(i), o.ok, s3)
        if o.ok:
            assert o.manifest == f"s3://{OUT}/{manifest_keys[i]}"


@SETTINGS
@given(batches(), st.lists(st.integers(1, 10), min_size=1, max_size=4), st.booleans(), st.data())
def test_through_the_poller_a_deleted_message_has_its_manifest_and_a_failed_one_is_not_deleted(
        example, receive_sizes, pipelined, data):
    world, specs, bodies, manifest_keys = example
    s3 = world.s3
    received = [{"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": body} for i, body in enumerate(bodies)]
    groups, rest = [], list(received)
    for size in receive_sizes:  # the messages in a few receive batches (at most 10 each)
        groups.append(rest[:size])
        rest = rest[size:]
    while rest:
        groups.append(rest[:10])
        rest = rest[10:]
    failing_deletes = {m["ReceiptHandle"]: data.draw(st.sampled_from([1, None])) for m in received
                       if data.draw(st.integers(0, 7)) == 0}
    sqs = MemorySQS([g for g in groups if g], failing_deletes=failing_deletes)
    pipeline = Pipeline(world.classifier, s3, PipelineSettings(batch_size=3, download_threads=2))
    poller = Poller(sqs, pipeline, OutputSettings(bucket=OUT),
                    PollerSettings("queue", wait_seconds=0, retry_delay=9, max_total=len(received), pipelined=pipelined,
                                   queue_backoff_seconds=0))
    try:
        with decode_faults(world):
            summary = poller.run()
    finally:
        pipeline.close()
    handed_back = {receipt for receipt, delay in sqs.visibility if delay == 9}
    for i, spec in enumerate(specs):
        receipt = f"r{i}"
        deleted = receipt in sqs.deleted
        failed = receipt in handed_back
        assert deleted != failed or (not deleted and failing_deletes.get(receipt, 0) is None), (spec, receipt)
        check_message(world, spec, manifest_keys.get(i), not failed, s3)
    assert summary.undeleted == sum(1 for r, times in failing_deletes.items() if times is None and r not in handed_back)
    assert poller.in_flight.snapshot() == []


# --------------------------------------------------------------------------- #
# the oracle itself, on hand-made cases
# --------------------------------------------------------------------------- #

def test_the_oracle_on_an_overwritten_object_in_an_unversioned_bucket():
    world = World(versioned=False)
    first = world.s3.add("photos", "a.png", world.new_photo())
    world.s3.add("photos", "a.png", world.new_photo())
    [item] = world.expect(("event", [("photos", "a.png", first.etag, None)]))
    assert item[2:4] == ("error", "changed")


@pytest.mark.parametrize("names, expected", [(["a.png", "a.png"], 1), (["a.png", "b.png", "a.png"], 2)])
def test_a_job_naming_a_key_twice_gets_one_item_for_it(names, expected):
    world = World(versioned=False)
    for name in set(names):
        world.s3.add("photos", name, world.new_photo())
    body = json.dumps({"job_id": "twice", "bucket": "photos", "keys": names})
    pipeline = Pipeline(world.classifier, world.s3, PipelineSettings(batch_size=2, download_threads=2))
    try:
        outcome = process_messages([QueuedMessage("m", body)], pipeline, OutputSettings())
    finally:
        pipeline.close()
    doc = read_manifest(world.s3, "photos", "manifests/twice.json")
    assert [i.key for i in doc.items] == sorted(set(names))
    assert sum(doc.counts.values()) == expected and doc.counts["error"] == doc.counts["uncertain"] == 0
    assert outcome.succeeded_ids == ["m"] and all(n == 1 for n in world.s3.reads.values())
