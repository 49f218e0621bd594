"""worker.manifests: canonical JSON documents at deterministic keys (moto S3)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.manifests import (
    MANIFEST_SCHEMA_VERSION,
    Continuation,
    ItemResult,
    JobError,
    Manifest,
    TopK,
    build_manifest,
    manifest_key,
    read_manifest,
    write_manifest,
)

BUCKET = "dog-results"
MODEL = {"name": "vgg16-dogs", "version": "2024.01", "runtime": "onnxruntime"}


def ok_item(key: str, score: float = 0.9, *, bucket: str = "dog-photos", timings=None) -> ItemResult:
    return ItemResult.success(
        bucket, key,
        breed="beagle", synset="n02088364", score=score,
        top_k=[TopK("n02088364", "beagle", score), TopK("n02089973", "English_foxhound", 1 - score)],
        etag="abc", timings_ms=timings or {"download": 12.5, "decode": 3.25, "infer": 40.0},
    )


def err_item(key: str, *, timings=None) -> ItemResult:
    return ItemResult.failure(
        "dog-photos", key, error_code="decode_error", error_message="cannot identify image file",
        timings_ms=timings or {"download": 1.0},
    )


def items():
    return [ok_item("b/2.jpg", 0.123456789), err_item("a/broken.jpg"), ok_item("a/1.jpg", 0.75),
            ok_item("z.jpg", bucket="another-bucket")]


# --------------------------------------------------------------------------- #
# pure functions
# --------------------------------------------------------------------------- #

def test_manifest_key_layout():
    assert manifest_key("results/", "job-1") == "results/job-1.json"
    assert manifest_key("results", "job-1") == "results/job-1.json"
    assert manifest_key("results//", "job-1", jsonl=True) == "results/job-1.jsonl"
    assert manifest_key("", "job-1") == "job-1.json"
    with pytest.raises(ValueError):
        manifest_key("results/", "../escape")


SAFE_JOB_IDS = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@st.composite
def job_id_pairs(draw):
    """Two safe job ids: unrelated, equal, or neighbours (one character changed, added or dropped,
    anywhere, long ids included) that a truncating or normalising key would merge."""
    first = draw(st.one_of(SAFE_JOB_IDS, st.text("ab", min_size=100, max_size=128)))
    at = draw(st.integers(0, len(first) - 1))
    second = draw(st.sampled_from([
        draw(SAFE_JOB_IDS), first, first[:at] + ("b" if first[at] != "b" else "c") + first[at + 1:],
        first[:at] + first[at + 1:], (first + "x")[:128], first.upper(),
    ]))
    if not second or second in (".", ".."):
        second = first
    return first, second


@given(prefix=st.sampled_from(["", "/", "results", "results/", "a/b//"]), ids=job_id_pairs(), jsonl=st.booleans())
def test_manifest_keys_differ_exactly_when_job_ids_differ(prefix, ids, jsonl):
    """Two jobs never share (overwrite) a manifest, and a job always finds its own again. A
    redelivered message keeps its job id (tests/unit/test_messages.py: content-derived ids for S3
    events, the sender's id for job messages), so it rewrites the same key."""
    first, second = ids
    a, b = manifest_key(prefix, first, jsonl=jsonl), manifest_key(prefix, second, jsonl=jsonl)
    assert (a == b) == (first == second)
    assert a.rsplit("/", 1)[-1] == f"{first}.{'jsonl' if jsonl else 'json'}"
    assert not a.startswith("/") and "//" not in a


@given(job_id=st.one_of(st.text(max_size=140), st.sampled_from([".", "..", "a/b", "../x", "x\n", "", "é"])))
def test_an_accepted_job_id_is_exactly_one_key_segment(job_id):
    """Whatever id a message carries, its manifest stays under the output prefix: the id is
    refused, or it becomes one plain key segment (no '/', not '.' or '..', no control characters)."""
    try:
        key = manifest_key("results", job_id)
    except ValueError:
        return
    assert key == f"results/{job_id}.json"
    assert job_id not in ("", ".", "..") and "/" not in job_id and job_id.isprintable() and job_id.isascii()


def test_build_manifest_sorts_items_and_counts():
    m = build_manifest("job-1", "job", MODEL, items())
    assert m.schema_version == MANIFEST_SCHEMA_VERSION == 3
    assert [(it.bucket, it.key) for it in m.items] == [
        ("another-bucket", "z.jpg"), ("dog-photos", "a/1.jpg"), ("dog-photos", "a/broken.jpg"), ("dog-photos", "b/2.jpg"),
    ]
    assert m.counts == {"ok": 3, "error": 1, "no_dog": 0, "uncertain": 0}
    doc = json.loads(m.to_json())
    assert doc["counts"] == {"ok": 3, "error": 1, "no_dog": 0, "uncertain": 0}
    assert doc["job_id"] == "job-1" and doc["source"] == "job" and doc["model"] == MODEL


def test_build_manifest_rejects_unknown_status():
    bad = ItemResult("b", "k.jpg", None, None, "maybe")
    with pytest.raises(ValueError):
        build_manifest("job-1", "job", MODEL, [bad])


def test_to_json_is_deterministic_regardless_of_item_order():
    a = build_manifest("job-1", "s3-event", MODEL, items())
    b = build_manifest("job-1", "s3-event", dict(reversed(list(MODEL.items()))), list(reversed(items())))
    assert a.to_json() == b.to_json()
    # also when a Manifest is constructed directly with unsorted items
    unsorted = [items()[i] for i in (1, 3, 0, 2)]
    assert [(i.bucket, i.key) for i in unsorted] != sorted((i.bucket, i.key) for i in unsorted)
    direct = Manifest(MANIFEST_SCHEMA_VERSION, "job-1", "s3-event", MODEL, unsorted,
                      {"ok": 3, "error": 1, "no_dog": 0, "uncertain": 0})
    assert direct.to_json() == a.to_json()
    # canonical form: sorted keys, compact separators
    text = a.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_to_json_rounds_scores_to_six_decimals():
    m = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", 0.123456789)])
    item = json.loads(m.to_json())["items"][0]
    assert item["score"] == 0.123457
    assert item["top_k"][0] == {"synset": "n02088364", "breed": "beagle", "score": 0.123457}
    assert item["top_k"][1]["score"] == 0.876543
    # tiny float noise does not change the bytes
    noisy = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", 0.123456789 + 1e-12)])
    assert noisy.to_json() == m.to_json()


def test_timings_excluded_by_default_so_redelivery_is_byte_identical():
    first = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", timings={"infer": 41.0}), err_item("b.jpg")])
    again = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", timings={"infer": 97.3}), err_item("b.jpg", timings={"download": 5.0})])
    assert "timings_ms" not in first.to_json()
    assert "timings_ms" not in first.to_jsonl()
    assert first.to_json() == again.to_json()
    # timings stay available in process
    assert first.items[0].timings_ms == {"infer": 41.0}


def test_timings_included_on_request():
    m = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", timings={"infer": 41.23456})], include_timings=True)
    assert json.loads(m.to_json())["items"][0]["timings_ms"] == {"infer": 41.235}
    plain = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg")])
    assert "timings_ms" in json.loads(plain.to_json(include_timings=True))["items"][0]


def test_to_json_has_no_wall_clock_fields():
    doc = json.loads(build_manifest("job-1", "job", MODEL, items()).to_json())
    assert set(doc) == {"schema_version", "job_id", "source", "model", "counts", "items", "continuations", "error"}
    assert doc["continuations"] == [] and doc["error"] is None
    assert set(doc["items"][0]) == {"bucket", "key", "etag", "version_id", "status", "error_code", "error_message",
                                   "breed", "synset", "score", "top_k", "dog_score"}


def test_to_jsonl_one_line_per_item():
    m = build_manifest("job-1", "job", MODEL, items())
    text = m.to_jsonl()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 4
    parsed = [json.loads(line) for line in lines]
    assert [(d["bucket"], d["key"]) for d in parsed] == [(it.bucket, it.key) for it in m.items]
    assert all(d["job_id"] == "job-1" for d in parsed)
    assert [d["status"] for d in parsed].count("error") == 1
    assert build_manifest("job-1", "job", MODEL, []).to_jsonl() == ""


def test_non_finite_scores_are_rejected():
    m = build_manifest("job-1", "job", MODEL, [ok_item("a.jpg", float("nan"))])
    with pytest.raises(ValueError):
        m.to_json()


def test_unicode_keys_round_trip_through_json():
    m = build_manifest("job-1", "job", MODEL, [ok_item("photos/my dogé +1.jpg")])
    assert Manifest.from_json(m.to_json()).items[0].key == "photos/my dogé +1.jpg"


# --------------------------------------------------------------------------- #
# S3 (moto)
# --------------------------------------------------------------------------- #

@pytest.fixture
def s3(mock_s3):
    mock_s3.create_bucket(Bucket=BUCKET)
    return mock_s3


def test_write_read_round_trip(s3):
    m = build_manifest("job-1", "s3-event", MODEL, items())
    key = manifest_key("manifests/", "job-1")
    write_manifest(s3, BUCKET, key, m)

    obj = s3.get_object(Bucket=BUCKET, Key=key)
    assert obj["ContentType"] == "application/json"
    assert obj["Body"].read().decode("utf-8") == m.to_json()

    back = read_manifest(s3, BUCKET, key)
    assert back.to_json() == m.to_json()
    assert back.job_id == "job-1" and back.source == "s3-event" and back.model == MODEL
    assert back.counts == {"ok": 3, "error": 1, "no_dog": 0, "uncertain": 0}
    assert [(it.key, it.status, it.breed, it.error_code) for it in back.items] == [
        (it.key, it.status, it.breed, it.error_code) for it in m.items
    ]
    assert back.items[1].top_k[0] == TopK("n02088364", "beagle", 0.75)


def test_write_uses_a_single_put_object(s3):
    calls = []
    s3.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    write_manifest(s3, BUCKET, "m/job-1.json", build_manifest("job-1", "job", MODEL, items()))
    assert calls == ["PutObject"]


def test_second_write_for_same_job_overwrites(s3):
    prefix = "manifests/"
    first = build_manifest("job-1", "s3-event", MODEL, [ok_item("a.jpg", timings={"infer": 1.0})])
    # the redelivered message: same input, different wall-clock timings
    second = build_manifest("job-1", "s3-event", MODEL, [ok_item("a.jpg", timings={"infer": 99.0})])
    write_manifest(s3, BUCKET, manifest_key(prefix, first.job_id), first)
    body_1 = s3.get_object(Bucket=BUCKET, Key=manifest_key(prefix, "job-1"))["Body"].read()
    write_manifest(s3, BUCKET, manifest_key(prefix, second.job_id), second)

    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert [o["Key"] for o in listing["Contents"]] == ["manifests/job-1.json"]
    body_2 = s3.get_object(Bucket=BUCKET, Key="manifests/job-1.json")["Body"].read()
    assert body_1 == body_2


def test_write_jsonl(s3):
    m = build_manifest("job-1", "job", MODEL, items())
    key = manifest_key("out", "job-1", jsonl=True)
    write_manifest(s3, BUCKET, key, m, jsonl=True)
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    assert key == "out/job-1.jsonl"
    assert obj["ContentType"] == "application/x-ndjson"
    assert len(obj["Body"].read().decode("utf-8").splitlines()) == 4


def test_read_manifest_rejects_unknown_schema_version(s3):
    doc = json.loads(build_manifest("job-1", "job", MODEL, items()).to_json())
    doc["schema_version"] = 99
    s3.put_object(Bucket=BUCKET, Key="m/job-1.json", Body=json.dumps(doc).encode())
    with pytest.raises(ValueError):
        read_manifest(s3, BUCKET, "m/job-1.json")


# --------------------------------------------------------------------------- #
# schema 2: continuation pages and a job error
# --------------------------------------------------------------------------- #

def test_a_split_prefix_job_names_its_pages_in_page_order_and_reads_back(s3):
    pages = [Continuation("big.p0001-0a1b2c3d", "s3://b/manifests/big.p0001-0a1b2c3d.json", 100, "a/000.jpg", "a/099.jpg"),
             Continuation("big.p0002-4e5f6a7b", "s3://b/manifests/big.p0002-4e5f6a7b.json", 7, "a/100.jpg", "a/106.jpg")]
    m = build_manifest("big", "prefix-job", MODEL, [], continuations=pages)
    doc = json.loads(m.to_json())
    assert doc["items"] == [] and doc["counts"] == {"ok": 0, "error": 0, "no_dog": 0, "uncertain": 0}
    assert doc["error"] is None
    assert [c["job_id"] for c in doc["continuations"]] == ["big.p0001-0a1b2c3d", "big.p0002-4e5f6a7b"]
    assert doc["continuations"][1] == {"job_id": "big.p0002-4e5f6a7b", "manifest": "s3://b/manifests/big.p0002-4e5f6a7b.json",
                                       "photos": 7, "first_key": "a/100.jpg", "last_key": "a/106.jpg"}
    write_manifest(s3, BUCKET, "m/big.json", m)
    back = read_manifest(s3, BUCKET, "m/big.json")
    assert back.continuations == pages and back.error is None
    lines = [json.loads(line) for line in m.to_jsonl().splitlines()]
    assert lines == [{"job_id": "big", "continuation": c.to_dict()} for c in pages]


def test_a_job_error_is_written_and_read_back(s3):
    m = build_manifest("huge", "prefix-job", MODEL, [], error=JobError("too_many_objects", "more than 10"))
    assert json.loads(m.to_json())["error"] == {"code": "too_many_objects", "message": "more than 10"}
    assert json.loads(m.to_jsonl()) == {"job_id": "huge", "error": {"code": "too_many_objects", "message": "more than 10"}}
    write_manifest(s3, BUCKET, "m/huge.json", m)
    assert read_manifest(s3, BUCKET, "m/huge.json").error == JobError("too_many_objects", "more than 10")


def test_a_version_2_manifest_still_reads(s3):
    """Version 2 (before the dog check): no dog_score, counts of ok and error only."""
    doc = json.loads(build_manifest("job-1", "job", MODEL, items()).to_json())
    doc["schema_version"] = 2
    doc["counts"] = {"ok": 3, "error": 1}
    for item in doc["items"]:
        del item["dog_score"]
    s3.put_object(Bucket=BUCKET, Key="m/v2.json", Body=json.dumps(doc).encode())
    old = read_manifest(s3, BUCKET, "m/v2.json")
    assert old.schema_version == 2 and len(old.items) == 4 and all(i.dog_score is None for i in old.items)
    assert sorted(i.status for i in old.items) == ["error", "ok", "ok", "ok"] and old.counts == {"ok": 3, "error": 1}


def test_a_version_1_manifest_still_reads(s3):
    doc = json.loads(build_manifest("job-1", "job", MODEL, items()).to_json())
    doc["schema_version"] = 1
    del doc["continuations"], doc["error"]
    s3.put_object(Bucket=BUCKET, Key="m/old.json", Body=json.dumps(doc).encode())
    old = read_manifest(s3, BUCKET, "m/old.json")
    assert old.schema_version == 1 and old.continuations == [] and old.error is None and len(old.items) == 4
