"""Publishing races on S3 (moto): a version's manifest.json is written once (a conditional PUT,
If-None-Match: *), and ``latest`` never moves back to an older version, whatever the order in
which racing publishers read and write it (conditional PUTs on latest's ETag, retried)."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.artifact_writer import label_from_folder, new_version, write_artifact
from trainer.registry import advance_latest, upload_artifact, version_order
from worker.artifact import ArtifactError

BUCKET = "registry"
LATEST = "models/tiny/latest"
V1, V2 = "20260101T000000Z", "20260102T000000Z"


def fake_artifact(root: Path, version: str, card: str = "# tiny") -> Path:
    """A complete artifact whose model is never loaded here (publishing only moves bytes)."""
    model = root / f"saved-{version}-{abs(hash(card))}"
    model.mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"not a real graph " + card.encode())
    dest = root / f"tiny-{version}-{abs(hash(card))}"
    write_artifact(dest, model_dir=model, labels=[label_from_folder(0, "n02085620-Chihuahua")],
                   manifest_fields={"name": "tiny", "version": version, "backbone": "none", "input_size": [8, 8]},
                   model_card=card)
    return dest


@pytest.fixture
def s3(aws_env):
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def client():
    return boto3.client("s3", region_name="us-east-1")


def latest(s3) -> str:
    return s3.get_object(Bucket=BUCKET, Key=LATEST)["Body"].read().decode()


def before_put(s3, key: str, action) -> None:
    """Run ``action`` once, just before ``s3`` PUTs ``key`` (a deterministic race)."""
    fired = []

    def hook(params, **_):
        if params.get("Key") == key and not fired:
            fired.append(True)
            action()

    s3.meta.events.register("provide-client-params.s3.PutObject", hook)


def test_version_order():
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stamps = [new_version(t + timedelta(seconds=s)) for s in (0, 1, 59, 3600, 86400 * 40)]
    assert sorted(stamps, key=version_order) == stamps
    assert sorted(["v10", "v9", "v1", "v2a", "v2"], key=version_order) == ["v1", "v2", "v2a", "v9", "v10"]


def test_the_manifest_put_is_conditional_and_a_racing_version_is_never_replaced(s3, tmp_path):
    ours, theirs = fake_artifact(tmp_path, V1, "# ours"), fake_artifact(tmp_path, V1, "# theirs")
    manifest_key = f"models/tiny/{V1}/manifest.json"
    puts = []
    s3.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: puts.append(dict(params)))
    other = client()
    # the other publisher's upload of the same version completes between our check and our manifest PUT
    before_put(s3, manifest_key, lambda: upload_artifact(theirs, f"s3://{BUCKET}/models", s3=other))
    with pytest.raises(ArtifactError, match="immutable"):
        upload_artifact(ours, f"s3://{BUCKET}/models", s3=s3)
    assert [p.get("IfNoneMatch") for p in puts if p["Key"] == manifest_key] == ["*"]
    stored = s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read()
    assert stored == (theirs / "manifest.json").read_bytes()  # theirs stands, ours did not overwrite it
    # the same artifact published twice (a retry) is not an error
    assert upload_artifact(theirs, f"s3://{BUCKET}/models", s3=s3) == f"s3://{BUCKET}/models/tiny/{V1}"


@pytest.mark.parametrize("first", ["old-publisher-reads-first", "new-publisher-reads-first"])
def test_latest_goes_to_the_newer_of_two_racing_publishers(s3, tmp_path, first):
    old, new = fake_artifact(tmp_path, V1), fake_artifact(tmp_path, V2)
    racing, interrupting = (old, new) if first == "old-publisher-reads-first" else (new, old)
    other = client()
    # `racing` has read latest (absent) when `interrupting` publishes entirely; then `racing` writes
    before_put(s3, LATEST, lambda: upload_artifact(interrupting, f"s3://{BUCKET}/models", s3=other))
    upload_artifact(racing, f"s3://{BUCKET}/models", s3=s3)
    assert latest(s3) == V2


def test_an_older_version_published_later_leaves_latest(s3, tmp_path):
    upload_artifact(fake_artifact(tmp_path, V2), f"s3://{BUCKET}/models", s3=s3)
    upload_artifact(fake_artifact(tmp_path, V1), f"s3://{BUCKET}/models", s3=s3)
    assert latest(s3) == V2
    s3.put_object(Bucket=BUCKET, Key=LATEST, Body=b"../../etc")  # garbage is replaced, still conditionally
    assert advance_latest(s3, BUCKET, LATEST, V1) == V1 and latest(s3) == V1


class Turnstile:
    """Serialises the publishers' reads and writes of ``latest`` in the order a schedule gives:
    a turn is granted only when every publisher still running waits at such a call, so the
    interleaving is the schedule's, not the threads' timing."""

    def __init__(self, publishers: int, schedule: list[int]):
        self.condition = threading.Condition()
        self.schedule = list(schedule)
        self.active, self.waiting = set(range(publishers)), set()
        self.turn: int | None = None
        self.history: list[str] = []  # every value latest was set to, in order

    def _grant(self) -> None:
        if self.turn is None and self.waiting and self.waiting == self.active:
            while self.schedule and self.schedule[0] not in self.waiting:
                self.schedule.pop(0)
            self.turn = self.schedule.pop(0) if self.schedule else min(self.waiting)
            self.condition.notify_all()

    def enter(self, i: int) -> None:
        with self.condition:
            self.waiting.add(i)
            self._grant()
            assert self.condition.wait_for(lambda: self.turn == i, timeout=30), "turnstile stuck"

    def leave(self, i: int, written: str | None) -> None:
        with self.condition:
            if written is not None:
                self.history.append(written)
            self.waiting.discard(i)
            self.turn = None
            self._grant()

    def finish(self, i: int) -> None:
        with self.condition:
            self.active.discard(i)
            self._grant()


@pytest.fixture(scope="module")
def racers():
    """moto, a bucket, and four S3 clients whose GETs and PUTs of ``latest`` go through the
    turnstile of the current example (``racers["turnstile"]``)."""
    from moto import mock_aws

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    state: dict = {"turnstile": None}

    def before(params, context, i, **_):  # a GET or PUT of latest waits for its turn
        if params["url_path"].endswith("/latest"):
            context["latest"] = True
            body = params.get("body")
            context["written"] = body.decode() if params["method"] == "PUT" and isinstance(body, bytes) else None
            state["turnstile"].enter(i)

    def after(http_response, model, context, i, **_):
        if context.get("latest"):
            ok_put = model.name == "PutObject" and http_response.status_code == 200
            state["turnstile"].leave(i, context["written"] if ok_put else None)

    with mock_aws():
        setup = client()
        setup.create_bucket(Bucket=BUCKET)
        state["setup"], state["clients"] = setup, []
        for i in range(4):
            s3 = client()
            s3.meta.events.register("before-call.s3.*", lambda i=i, **kw: before(i=i, **kw))
            s3.meta.events.register("after-call.s3.*", lambda i=i, **kw: after(i=i, **kw))
            state["clients"].append(s3)
        yield state
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(versions=st.lists(st.sampled_from([V1, V2, "20260103T000000Z", "20251231T235959Z"]), min_size=2, max_size=4),
       schedule=st.lists(st.integers(0, 3), max_size=24), start=st.sampled_from([None, "20250101T000000Z"]))
def test_latest_never_moves_back_whatever_the_interleaving(racers, versions, schedule, start):
    """Property: N publishers advance latest concurrently, their GETs and conditional PUTs of
    latest interleaved in any order: latest ends at the newest version and never went back."""
    setup = racers["setup"]
    setup.delete_object(Bucket=BUCKET, Key=LATEST)
    if start:
        setup.put_object(Bucket=BUCKET, Key=LATEST, Body=start.encode())
    turnstile = racers["turnstile"] = Turnstile(len(versions), [i for i in schedule if i < len(versions)])
    errors = []

    def publisher(i: int) -> None:
        try:
            advance_latest(racers["clients"][i], BUCKET, LATEST, versions[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            turnstile.finish(i)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(len(versions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    newest = max(versions + ([start] if start else []), key=version_order)
    assert latest(setup) == newest
    values = ([start] if start else []) + turnstile.history
    assert values == sorted(values, key=version_order), values  # never moved back
