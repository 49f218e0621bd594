"""Continuation pages (worker.continuations): a prefix job longer than one page is split into job
messages of one page each, sent back to its queue with deterministic ids, and its manifest names
them; the pages' manifests together list exactly the prefix's photos, each with its own label."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock, LambdaContext, MemoryS3, MemorySQS, PixelClassifier, label_of, photo
from worker import handler, images
from worker.continuations import (
    MAX_PAGE_BODY_BYTES,
    ContinuationSender,
    _chunks,
    page_job_id,
    split_pages,
)
from worker.deadline import Deadline
from worker.jobs import OutputSettings, QueuedMessage, process_messages
from worker.manifests import read_manifest
from worker.messages import ImageRef, Job, is_safe_job_id, parse_message
from worker.pipeline import Pipeline, PipelineSettings
from worker.poller import Poller, PollerSettings
from worker.sqs import queue_url_of_arn

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/photos"
PAGE = 4


def prefix_world(n: int = 10) -> MemoryS3:
    """``n`` photos under shoot/ (2.5 pages of 4 for n=10), plus a non-photo and a photo elsewhere."""
    s3 = MemoryS3()
    for i in range(n):
        s3.add("photos", f"shoot/{i:03d} dog é+.png", photo(500 + i))
    s3.add("photos", "shoot/notes.txt", b"not listed: not a photo suffix")
    s3.add("photos", "elsewhere/x.png", photo(499))
    return s3


def prefix_message(message_id: str = "parent", job_id: str = "big") -> QueuedMessage:
    return QueuedMessage(message_id, json.dumps({"job_id": job_id, "bucket": "photos", "prefix": "shoot/"}))


def run(s3, sqs, messages, page_keys=PAGE, deadline=None, **output):
    pipeline = Pipeline(PixelClassifier(), s3, PipelineSettings(batch_size=3, download_threads=2))
    sender = ContinuationSender(sqs, lambda _message_id: QUEUE, backoff=0)
    try:
        return process_messages(messages, pipeline, OutputSettings(page_keys=page_keys, **output), deadline, sender)
    finally:
        pipeline.close()


def listed_keys(s3) -> list[str]:
    return sorted(k for (b, k) in s3.objects if b == "photos" and k.startswith("shoot/") and k.endswith(".png"))


def test_a_prefix_of_two_and_a_half_pages_becomes_three_pages_named_by_its_manifest():
    s3, sqs = prefix_world(10), MemorySQS([])
    outcome = run(s3, sqs, [prefix_message()])
    assert outcome.succeeded_ids == ["parent"]
    assert not s3.reads, "the prefix job reads no photo itself"
    assert [url for url, _ in sqs.sent] == [QUEUE] * 3
    pages = [json.loads(body) for _, body in sqs.sent]
    keys = listed_keys(s3)
    assert [p["keys"] for p in pages] == [keys[0:4], keys[4:8], keys[8:10]]
    assert all(p["bucket"] == "photos" and set(p) == {"job_id", "bucket", "keys"} for p in pages)
    assert [p["job_id"][:len("big.p0001")] for p in pages] == ["big.p0001", "big.p0002", "big.p0003"]
    doc = read_manifest(s3, "photos", "manifests/big.json")
    assert doc.items == [] and doc.error is None and doc.source == "prefix-job"
    assert [(c.job_id, c.photos, c.first_key, c.last_key, c.manifest) for c in doc.continuations] == [
        (p["job_id"], len(p["keys"]), p["keys"][0], p["keys"][-1], f"s3://photos/manifests/{p['job_id']}.json")
        for p in pages]


def test_a_prefix_of_one_page_or_less_is_classified_in_its_own_message():
    s3, sqs = prefix_world(PAGE), MemorySQS([])
    outcome = run(s3, sqs, [prefix_message()])
    assert outcome.succeeded_ids == ["parent"] and sqs.sent == []
    doc = read_manifest(s3, "photos", "manifests/big.json")
    assert [i.key for i in doc.items] == listed_keys(s3) and doc.continuations == []


def test_a_redelivered_prefix_job_sends_the_same_pages_under_the_same_ids():
    s3, sqs = prefix_world(10), MemorySQS([])
    run(s3, sqs, [prefix_message("first delivery")])
    first_manifest = s3.current("photos", "manifests/big.json").body
    run(s3, sqs, [prefix_message("second delivery")])
    assert len(sqs.sent) == 6
    assert [body for _, body in sqs.sent[:3]] == [body for _, body in sqs.sent[3:]]
    assert s3.current("photos", "manifests/big.json").body == first_manifest  # same bytes


def test_the_pages_become_manifests_that_together_list_exactly_the_prefix_with_each_photo_labelled_alone():
    s3, sqs = prefix_world(10), MemorySQS([])
    run(s3, sqs, [prefix_message()])
    pages = [QueuedMessage(f"page-{i}", body) for i, body in enumerate(body for _, body in sqs.sent)]
    outcome = run(s3, MemorySQS([]), pages)
    assert outcome.failed_ids == []
    parent = read_manifest(s3, "photos", "manifests/big.json")
    seen = []
    for continuation in parent.continuations:
        doc = read_manifest(s3, "photos", continuation.manifest.split("/", 3)[3])
        assert doc.job_id == continuation.job_id and len(doc.items) == continuation.photos
        for item in doc.items:
            pixels = images.load_image(s3.current("photos", item.key).body, size=(8, 8))
            assert item.status == "ok" and item.breed == label_of(pixels)[0].breed
        seen += [item.key for item in doc.items]
    assert seen == listed_keys(s3)  # each photo once, in listing order


def test_through_the_poller_the_pages_come_back_from_the_queue_and_are_classified():
    s3 = prefix_world(10)
    parent = {"MessageId": "parent", "ReceiptHandle": "r-parent", "Body": prefix_message().body}
    sqs = MemorySQS([[parent]], requeue=True)
    pipeline = Pipeline(PixelClassifier(), s3, PipelineSettings(batch_size=3, download_threads=2))
    poller = Poller(sqs, pipeline, OutputSettings(page_keys=PAGE),
                    PollerSettings(QUEUE, wait_seconds=0, max_total=4, until_empty=True, queue_backoff_seconds=0))
    try:
        summary = poller.run()
    finally:
        pipeline.close()
    assert summary.succeeded == 4 and summary.failed == 0
    assert sorted(sqs.deleted) == sorted(["r-parent"] + [f"r-sent-{i}" for i in range(3)])
    assert {url for url, _ in sqs.sent} == {QUEUE}
    parent_doc = read_manifest(s3, "photos", "manifests/big.json")
    keys = [i.key for c in parent_doc.continuations
            for i in read_manifest(s3, "photos", c.manifest.split("/", 3)[3]).items]
    assert keys == listed_keys(s3)


def test_the_lambda_handler_sends_the_pages_to_the_queue_its_record_came_from(monkeypatch):
    s3, sqs = prefix_world(10), MemorySQS([])
    pipeline = Pipeline(PixelClassifier(), s3, PipelineSettings(batch_size=3, download_threads=2))
    monkeypatch.setattr(handler, "_pipeline", pipeline)
    monkeypatch.setattr(handler, "_sqs", sqs)
    monkeypatch.setenv("DOGBREEDS_PREFIX_PAGE_KEYS", str(PAGE))
    monkeypatch.delenv("DOGBREEDS_OUTPUT_BUCKET", raising=False)
    monkeypatch.setenv("DOGBREEDS_OUTPUT_PREFIX", "manifests")
    arn = "arn:aws:sqs:eu-west-1:210987654321:dog-photos"
    record = {"messageId": "parent", "receiptHandle": "r", "body": prefix_message().body, "attributes": {},
              "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": arn,
              "awsRegion": "eu-west-1"}
    try:
        response = handler.lambda_handler({"Records": [record]}, LambdaContext(FakeClock()))
    finally:
        pipeline.close()
    assert response["batchItemFailures"] == []
    assert [url for url, _ in sqs.sent] == ["https://sqs.eu-west-1.amazonaws.com/210987654321/dog-photos"] * 3


def test_pages_that_cannot_be_sent_fail_the_prefix_job_and_its_retry_sends_them_all():
    s3 = prefix_world(10)
    sqs = MemorySQS([], failing_sends=None)  # every send answered Failed, every try
    outcome = run(s3, sqs, [prefix_message()])
    assert outcome.failed_ids == ["parent"] and "continuation page(s) not sent" in outcome.outcomes[0].reason
    assert ("photos", "manifests/big.json") not in s3.objects and sqs.sent == []
    sqs.failing_sends = 2  # two entries fail once, then succeed on the retry of the send
    assert run(s3, sqs, [prefix_message()]).succeeded_ids == ["parent"]
    assert len(sqs.sent) == 3 and ("photos", "manifests/big.json") in s3.objects


def test_a_deadline_while_sending_pages_fails_the_prefix_job_and_a_retry_sends_the_same_pages():
    s3, sqs = prefix_world(25), MemorySQS([])  # 25 pages of 1: three send_message_batch calls
    calls = []
    send = sqs.send_message_batch

    def counted(**kw):
        calls.append(len(kw["Entries"]))
        return send(**kw)

    sqs.send_message_batch = counted
    outcome = run(s3, sqs, [prefix_message()], page_keys=1,
                  deadline=Deadline(lambda: 0.0 if calls else 1e9, safety_ms=0))
    assert outcome.failed_ids == ["parent"] and outcome.outcomes[0].reason.startswith("deadline")
    assert calls == [10] and ("photos", "manifests/big.json") not in s3.objects
    first = [body for _, body in sqs.sent]
    assert run(s3, sqs, [prefix_message()], page_keys=1).succeeded_ids == ["parent"]
    assert [body for _, body in sqs.sent[10:]][:10] == first and len(sqs.sent) == 35


def test_a_listing_over_the_limit_is_a_job_error_at_once_not_a_retry():
    s3, sqs = prefix_world(10), MemorySQS([])
    outcome = run(s3, sqs, [prefix_message()], max_prefix_keys=6)
    assert outcome.succeeded_ids == ["parent"] and sqs.sent == [] and not s3.reads
    doc = read_manifest(s3, "photos", "manifests/big.json")
    assert doc.items == [] and doc.continuations == [] and doc.error.code == "too_many_objects"
    assert "more than 6" in doc.error.message


def test_a_changed_listing_keeps_the_ids_of_unchanged_pages_and_renames_changed_ones():
    s3, sqs = prefix_world(10), MemorySQS([])
    run(s3, sqs, [prefix_message()])
    before = [json.loads(body)["job_id"] for _, body in sqs.sent]
    s3.add("photos", "shoot/009 zz.png", photo(600))  # lands on the third page
    run(s3, sqs, [prefix_message()])
    after = [json.loads(body)["job_id"] for _, body in sqs.sent[3:]]
    assert after[:2] == before[:2] and after[2] != before[2] and after[2].startswith("big.p0003-")


# --------------------------------------------------------------------------- #
# properties of the split
# --------------------------------------------------------------------------- #

key_text = st.text(alphabet=st.sampled_from(list("ab c+%é/ü😀-_()\"\\")), min_size=1, max_size=40)
long_keys = st.integers(200, 1000).map(lambda n: "k" * n)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(key_text, long_keys), max_size=60, unique=True), st.integers(1, 12),
       st.sampled_from(["big", "x" * 128, "a.b-c_d" * 18]), st.sampled_from([None, "results/deep"]),
       st.sampled_from([MAX_PAGE_BODY_BYTES, 3_000]))
def test_pages_partition_the_sorted_listing_with_safe_deterministic_ids(keys, page_keys, job_id, output_prefix,
                                                                        max_bytes):
    refs = tuple(ImageRef("photos", k) for k in sorted(keys))
    job = Job(job_id, refs, output_prefix, "prefix-job", prefix="", bucket="photos")
    pages = split_pages(job, page_keys, max_bytes)
    assert [k for p in pages for k in p.keys] == sorted(keys)  # in order, each key once
    assert all(1 <= len(p.keys) <= page_keys for p in pages)
    assert all(len(p.body().encode()) <= max_bytes for p in pages)
    if max_bytes == MAX_PAGE_BODY_BYTES:  # no key list is near the byte limit: pages are full but the last
        assert len(pages) == math.ceil(len(keys) / page_keys)
    ids = [p.job_id for p in pages]
    assert len(set(ids)) == len(ids) and all(is_safe_job_id(i) and len(i) <= 128 for i in ids)
    assert split_pages(job, page_keys, max_bytes) == pages  # deterministic
    for page in pages:  # a page is an ordinary job message
        parsed = parse_message(page.body())
        assert parsed.job_id == page.job_id and [r.key for r in parsed.refs] == list(page.keys)
        assert parsed.output_prefix == output_prefix
    sqs = MemorySQS([])  # asserts SQS's limits: 10 entries and 256 KiB per call
    ContinuationSender(sqs, lambda _: QUEUE).send("m", pages)
    assert [body for _, body in sqs.sent] == [p.body() for p in pages]


@given(st.lists(st.integers(1, 200_000), max_size=40))
def test_send_calls_stay_within_ten_entries_and_256_kib(sizes):
    entries = [{"Id": str(i), "MessageBody": "x" * n} for i, n in enumerate(sizes)]
    chunks = _chunks(entries)
    assert [e for chunk in chunks for e in chunk] == entries
    assert all(1 <= len(c) <= 10 and sum(len(e["MessageBody"]) for e in c) <= 262_144 for c in chunks)


def test_a_long_parent_id_is_shortened_to_a_safe_unique_child_id():
    a, b = "j" * 126 + "ab", "j" * 126 + "cd"
    ida, idb = page_job_id(a, 1, "photos", ["k"]), page_job_id(b, 1, "photos", ["k"])
    assert len(ida) == len(idb) == 128 and ida != idb and is_safe_job_id(ida)
    assert page_job_id("big", 12345, "photos", ["k"]).startswith("big.p12345-")


@pytest.mark.parametrize("arn, url", [
    ("arn:aws:sqs:us-east-1:123456789012:photos", "https://sqs.us-east-1.amazonaws.com/123456789012/photos"),
    ("arn:aws-cn:sqs:cn-north-1:123456789012:q", "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"),
])
def test_queue_url_of_arn(arn, url):
    assert queue_url_of_arn(arn) == url


@pytest.mark.parametrize("arn", ["", "arn:aws:s3:::bucket", "arn:aws:sqs:us-east-1:123456789012", "photos"])
def test_queue_url_of_a_bad_arn_is_refused(arn):
    with pytest.raises(ValueError):
        queue_url_of_arn(arn)
