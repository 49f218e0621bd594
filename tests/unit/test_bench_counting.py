"""What the fleet and throughput benchmarks count: completed messages from the pollers' logs, and the
worker's S3/SQS calls as the request clock sees them (heartbeat renewals vs hand-backs, manifest PUTs
with the sha256 of their bytes)."""

from __future__ import annotations

import hashlib
import io
import json
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.common import RequestClock
from benchmarks.fleet import completions, extra_completions


def done_line(message_id: str, manifest: str | None = "s3://b/manifests/j.json") -> str:
    return json.dumps({"level": "INFO", "message": "message done", "message_id": message_id, "manifest": manifest})


def test_completions_are_message_done_lines_that_wrote_a_manifest():
    text = "\n".join([
        done_line("a"),
        "not json at all, e.g. a warning printed by a library",
        json.dumps({"message": "message failed", "message_id": "b", "manifest": None}),
        done_line("c", manifest=None),  # an s3:TestEvent, deleted without a manifest
        '{"message": "message done", "message_id": "d", "manifest": "s3://b/m/d.json"',  # a truncated line
        done_line("e"),
    ])
    assert [r["message_id"] for r in completions(text)] == ["a", "e"]


@given(st.lists(st.sampled_from("abcdef"), max_size=40))
def test_extra_completions_count_every_completion_beyond_a_messages_first(ids):
    records = completions("\n".join(done_line(i) for i in ids))
    extra = extra_completions(records)
    assert sum(extra.values()) == len(ids) - len(set(ids))
    assert all(n >= 1 for n in extra.values()) and set(extra) == {i for i in ids if ids.count(i) > 1}


def model(name: str):
    return SimpleNamespace(name=name)


def test_the_clock_tells_heartbeat_renewals_from_hand_backs():
    clock = RequestClock("manifests", visibility_timeout=30)
    entries = [{"Id": "0", "ReceiptHandle": "r0", "VisibilityTimeout": 30},
               {"Id": "1", "ReceiptHandle": "r1", "VisibilityTimeout": 30},
               {"Id": "2", "ReceiptHandle": "r2", "VisibilityTimeout": 0},  # received ahead, handed back on stop
               {"Id": "3", "ReceiptHandle": "r3", "VisibilityTimeout": 10}]  # failed: retry after 10 s
    clock._before(params={"QueueUrl": "q", "Entries": entries}, model=model("ChangeMessageVisibilityBatch"), context={})
    clock._before(params={"QueueUrl": "q", "ReceiptHandle": "r", "VisibilityTimeout": 30},
                  model=model("ChangeMessageVisibility"), context={})
    assert (clock.renewals, clock.hand_backs) == (3, 2)
    assert clock.calls == {"ChangeMessageVisibilityBatch": 1, "ChangeMessageVisibility": 1}


def test_the_clock_records_manifest_puts_with_the_hash_of_their_bytes():
    clock = RequestClock("manifests/", visibility_timeout=None)
    body = b'{"job_id": "j"}'
    for key, payload in [("manifests/j.json", io.BytesIO(body)), ("manifests/k.json", body),
                         ("incoming/photo.jpg", b"jpeg")]:
        context: dict = {}
        clock._before(params={"Bucket": "b", "Key": key, "Body": payload}, model=model("PutObject"), context=context)
        clock._after(http_response=SimpleNamespace(status_code=200), parsed={}, model=model("PutObject"), context=context)
    failed: dict = {}
    clock._before(params={"Bucket": "b", "Key": "manifests/x.json", "Body": body}, model=model("PutObject"), context=failed)
    clock._after(http_response=SimpleNamespace(status_code=503), parsed={}, model=model("PutObject"), context=failed)
    digest = hashlib.sha256(body).hexdigest()
    assert [(key, sha) for _, key, sha in clock.manifests] == [("manifests/j.json", digest), ("manifests/k.json", digest)]


def test_the_clock_starts_at_the_first_receive_that_brought_messages():
    clock = RequestClock("manifests", visibility_timeout=30)
    clock._after(http_response=SimpleNamespace(status_code=200), parsed={}, model=model("ReceiveMessage"), context={})
    assert clock.first_receive is None  # an empty long poll is not the start
    clock._after(http_response=SimpleNamespace(status_code=200), parsed={"Messages": [{}, {}]},
                 model=model("ReceiveMessage"), context={})
    first = clock.first_receive
    clock._after(http_response=SimpleNamespace(status_code=200), parsed={"Messages": [{}]},
                 model=model("ReceiveMessage"), context={})
    assert first is not None and clock.first_receive == first and clock.messages_received == 3


def test_benchmark_predictions_are_the_breed_scores_not_the_dog_score(dog_check_artifact, tmp_path):
    """benchmarks/throughput.py and cost.py take top-1 as argmax over a child's saved predictions:
    the dog score column of a model with a dog check must not be among them (it beat every breed
    on most dog photos: 38% "top-1" for a 90% model)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from benchmarks.common import ROOT, parse_result
    from tests.conftest import COLOUR_BREEDS, colour_photo

    paths = []
    for i, rgb in enumerate(COLOUR_BREEDS.values()):
        path = tmp_path / f"{i}.jpg"
        Image.open(io.BytesIO(colour_photo(rgb, seed=500 + i))).save(path)
        paths.append(str(path))
    base = tmp_path / "probs"
    base.with_suffix(".json").write_text(json.dumps(paths))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "common.py"), "bare", "--model",
                           str(dog_check_artifact["path"]), "--runtime", "openvino-bf16", "--batches", "",
                           "--probs", str(base)], capture_output=True, text=True, timeout=300, check=True)
    assert parse_result(done.stdout)["runtime"] == "openvino-bf16"
    probs = np.load(f"{base}.openvino-bf16.npy")
    assert probs.shape == (len(paths), len(COLOUR_BREEDS))
    assert probs.argmax(1).tolist() == list(range(len(COLOUR_BREEDS)))
