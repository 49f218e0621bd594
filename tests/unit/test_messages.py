"""worker.messages: SQS bodies -> jobs; worker.prefix_listing: prefix expansion against moto S3."""

from __future__ import annotations

import json

import pytest

from worker.messages import (
    IMAGE_SUFFIXES,
    ImageRef,
    Job,
    MessageError,
    parse_message,
)
from worker.prefix_listing import expand_prefix_job

BUCKET = "dog-photos"


def s3_record(key: str, *, bucket: str = BUCKET, event: str = "ObjectCreated:Put",
              etag: str = "0123456789abcdef0123456789abcdef", size: int = 1234,
              sequencer: str = "0055AED6DCD90281E5", version_id: str | None = None) -> dict:
    obj = {"key": key, "size": size, "eTag": etag, "sequencer": sequencer}
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2024-01-01T00:00:00.000Z",
        "eventName": event,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "images",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def s3_event(*records: dict) -> str:
    return json.dumps({"Records": list(records)})


# --------------------------------------------------------------------------- #
# S3 event notifications
# --------------------------------------------------------------------------- #

def test_s3_event_url_encoded_key_is_decoded():
    job = parse_message(s3_event(s3_record("photos/my+dog%C3%A9+%2B1.jpg")))
    assert job is not None
    assert job.source == "s3-event"
    assert job.output_prefix is None
    assert job.refs == (
        ImageRef(bucket=BUCKET, key="photos/my dogé +1.jpg",
                 etag="0123456789abcdef0123456789abcdef", version_id=None, size=1234),
    )


def test_s3_event_multiple_records_keep_order_and_version_ids():
    body = s3_event(
        s3_record("a/1.jpg", sequencer="01"),
        s3_record("b/2.png", bucket="other-bucket", sequencer="02", version_id="v2", size=7),
    )
    job = parse_message(body)
    assert [(r.bucket, r.key, r.version_id, r.size) for r in job.refs] == [
        (BUCKET, "a/1.jpg", None, 1234),
        ("other-bucket", "b/2.png", "v2", 7),
    ]


def test_s3_event_non_object_created_records_are_ignored():
    body = s3_event(
        s3_record("gone.jpg", event="ObjectRemoved:Delete"),
        s3_record("kept.jpg", event="ObjectCreated:CompleteMultipartUpload"),
        s3_record("restored.jpg", event="ObjectRestore:Completed"),
    )
    job = parse_message(body)
    assert [r.key for r in job.refs] == ["kept.jpg"]


def test_s3_event_with_only_non_created_records_gives_empty_job():
    job = parse_message(s3_event(s3_record("gone.jpg", event="ObjectRemoved:Delete")))
    assert isinstance(job, Job)
    assert job.source == "s3-event"
    assert job.refs == ()


def test_s3_event_folder_marker_is_skipped():
    job = parse_message(s3_event(s3_record("photos/"), s3_record("photos/x.jpg", sequencer="09")))
    assert [r.key for r in job.refs] == ["photos/x.jpg"]


def test_s3_test_event_is_ignored():
    body = json.dumps({
        "Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-01-01T00:00:00.000Z",
        "Bucket": BUCKET, "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    })
    assert parse_message(body) is None


def test_sns_wrapped_s3_event_is_unwrapped():
    inner = s3_event(s3_record("photos/a%2Bb.jpg"))
    body = json.dumps({"Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
                       "Message": inner})
    job = parse_message(body)
    assert job.source == "s3-event"
    assert [r.key for r in job.refs] == ["photos/a+b.jpg"]
    assert job.job_id == parse_message(inner).job_id


def test_sns_wrapped_test_event_is_ignored():
    inner = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})
    assert parse_message(json.dumps({"Type": "Notification", "Message": inner})) is None


def test_s3_event_job_id_is_deterministic_and_content_derived():
    body = s3_event(s3_record("a.jpg", sequencer="01"), s3_record("b.jpg", sequencer="02"))
    first, second = parse_message(body), parse_message(body)
    assert first.job_id == second.job_id
    assert len(first.job_id) == 16 and all(c in "0123456789abcdef" for c in first.job_id)
    # the same records re-serialised in another order / with other whitespace
    reordered = json.dumps({"Records": [s3_record("b.jpg", sequencer="02"), s3_record("a.jpg", sequencer="01")]},
                           indent=2)
    assert parse_message(reordered).job_id == first.job_id
    # different content -> different job id
    others = {
        parse_message(s3_event(s3_record("a.jpg", sequencer="01"))).job_id,
        parse_message(s3_event(s3_record("a.jpg", sequencer="01"), s3_record("c.jpg", sequencer="02"))).job_id,
        parse_message(s3_event(s3_record("a.jpg", sequencer="03"), s3_record("b.jpg", sequencer="02"))).job_id,
        parse_message(s3_event(s3_record("a.jpg", sequencer="01", etag="f" * 32),
                               s3_record("b.jpg", sequencer="02"))).job_id,
        parse_message(s3_event(s3_record("a.jpg", bucket="elsewhere", sequencer="01"),
                               s3_record("b.jpg", sequencer="02"))).job_id,
    }
    assert first.job_id not in others
    assert len(others) == 5


# --------------------------------------------------------------------------- #
# job messages
# --------------------------------------------------------------------------- #

def test_job_message():
    body = json.dumps({"job_id": "batch-2024.01_a", "bucket": BUCKET,
                       "keys": ["x/1.jpg", "x/my dog+1.jpg", "x/1.jpg"], "output_prefix": "results/"})
    job = parse_message(body)
    assert job == Job(
        job_id="batch-2024.01_a",
        refs=(ImageRef(BUCKET, "x/1.jpg"), ImageRef(BUCKET, "x/my dog+1.jpg")),  # plain keys, deduped
        output_prefix="results/",
        source="job",
    )


def test_job_message_without_output_prefix_uses_default():
    job = parse_message(json.dumps({"job_id": "j1", "bucket": BUCKET, "keys": ["a.jpg"]}))
    assert job.output_prefix is None
    assert job.source == "job"


def test_prefix_job_message():
    job = parse_message(json.dumps({"job_id": "p1", "bucket": BUCKET, "prefix": "dogs/"}))
    assert job.source == "prefix-job"
    assert job.refs == ()
    assert (job.bucket, job.prefix, job.output_prefix) == (BUCKET, "dogs/", None)


# --------------------------------------------------------------------------- #
# malformed bodies -> MessageError with a code, and nothing else
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("not json at all", "malformed_json"),
        ("", "malformed_json"),
        ('{"job_id": "j1", ', "malformed_json"),
        ("[" * 100_000, "malformed_json"),  # would be a RecursionError
        ("[1, 2, 3]", "unknown_message"),
        ('"a string"', "unknown_message"),
        ("null", "unknown_message"),
        ('{"hello": "world"}', "unknown_message"),
        ('{"Type": "Notification", "Message": 5}', "unknown_message"),
        ('{"Type": "Notification", "Message": "not json"}', "malformed_json"),
        ('{"Records": "nope"}', "invalid_s3_event"),
        ('{"Records": [5]}', "invalid_s3_event"),
        ('{"Records": [{"eventSource": "aws:sqs", "eventName": "ObjectCreated:Put"}]}', "invalid_s3_event"),
        ('{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}', "invalid_s3_event"),
        ('{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",'
         ' "s3": {"bucket": {"name": "b"}, "object": {"key": 5}}}]}', "invalid_s3_event"),
        ('{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",'
         ' "s3": {"bucket": {"name": "b"}, "object": {"key": "k.jpg", "size": "big"}}}]}', "invalid_s3_event"),
        ('{"job_id": "j1", "keys": ["a.jpg"]}', "invalid_job"),                        # missing bucket
        ('{"job_id": "j1", "bucket": 7, "keys": ["a.jpg"]}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "keys": "a.jpg"}', "invalid_job"),            # keys not a list
        ('{"job_id": "j1", "bucket": "b", "keys": []}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "keys": ["a.jpg", 3]}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "keys": [""]}', "invalid_job"),
        ('{"job_id": "../etc", "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),      # bad job ids
        ('{"job_id": "a/b", "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),
        ('{"job_id": "..", "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),
        ('{"job_id": "", "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),
        ('{"job_id": "j1\\n", "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),
        ('{"job_id": 12, "bucket": "b", "keys": ["a.jpg"]}', "invalid_job"),
        (json.dumps({"job_id": "x" * 129, "bucket": "b", "keys": ["a.jpg"]}), "invalid_job"),
        ('{"job_id": "j1", "bucket": "b"}', "invalid_job"),                             # neither keys nor prefix
        ('{"job_id": "j1", "bucket": "b", "keys": ["a"], "prefix": "p/"}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "prefix": 3}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "keys": ["a"], "output_prefix": 3}', "invalid_job"),
        ('{"job_id": "j1", "bucket": "b", "keys": ["a"], "output_prefx": "r/"}', "invalid_job"),
    ],
)
def test_malformed_bodies_raise_message_error(body, code):
    with pytest.raises(MessageError) as info:
        parse_message(body)
    assert info.value.code == code
    assert info.value.message
    assert code in str(info.value)


def test_job_id_at_max_length_is_accepted():
    job = parse_message(json.dumps({"job_id": "x" * 128, "bucket": "b", "keys": ["a.jpg"]}))
    assert job.job_id == "x" * 128


@pytest.mark.parametrize("body", [None, 5, b"\xff\xfe"])
def test_non_text_bodies_raise_message_error(body):
    with pytest.raises(MessageError) as info:
        parse_message(body)  # type: ignore[arg-type]
    assert info.value.code == "malformed_json"


# --------------------------------------------------------------------------- #
# prefix expansion (moto)
# --------------------------------------------------------------------------- #

@pytest.fixture
def s3(mock_s3):
    mock_s3.create_bucket(Bucket=BUCKET)
    return mock_s3


class CountingS3:
    """Wraps a client to count list_objects_v2 requests made by the paginator."""

    def __init__(self, client):
        self._client = client
        self.requests = 0
        client.meta.events.register("before-call.s3.ListObjectsV2", self._count)

    def _count(self, **_):
        self.requests += 1

    def get_paginator(self, name):
        return self._client.get_paginator(name)


def test_expand_prefix_job_paginates_filters_and_sorts(s3):
    images = [f"dogs/{i:03d}.jpg" for i in range(23)] + ["dogs/upper.JPEG", "dogs/sub/x.Png", "dogs/y.webp"]
    skipped = ["dogs/readme.txt", "dogs/sub/", "dogs/archive.jpg.zip", "dogs/noext", "cats/c.jpg", "dogsx/z.jpg"]
    for key in reversed(images + skipped):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" * (len(key) % 7 + 1))

    job = parse_message(json.dumps({"job_id": "p1", "bucket": BUCKET, "prefix": "dogs/", "output_prefix": "out/"}))
    counting = CountingS3(s3)
    expanded = expand_prefix_job(job, counting, page_size=5)

    assert counting.requests >= 6  # 29 objects under dogs/ at 5 per page -> pagination happened
    assert [r.key for r in expanded.refs] == sorted(images)
    assert all(r.bucket == BUCKET for r in expanded.refs)
    head = s3.head_object(Bucket=BUCKET, Key="dogs/007.jpg")
    ref = next(r for r in expanded.refs if r.key == "dogs/007.jpg")
    assert ref.etag == head["ETag"].strip('"') and not ref.etag.startswith('"')
    assert ref.size == head["ContentLength"]
    # everything else about the job is unchanged
    assert (expanded.job_id, expanded.source, expanded.output_prefix, expanded.prefix) == ("p1", "prefix-job", "out/", "dogs/")


class StubPaginatorS3:
    """A client whose listing is not in key order (as with S3 Express directory buckets)."""

    def __init__(self, pages):
        self.pages = pages
        self.calls = []

    def get_paginator(self, name):
        assert name == "list_objects_v2"
        stub = self

        class _Paginator:
            def paginate(self, **kwargs):
                stub.calls.append(kwargs)
                return iter(stub.pages)

        return _Paginator()


def test_expand_prefix_job_sorts_keys_even_if_listing_is_unsorted():
    client = StubPaginatorS3([
        {"Contents": [{"Key": "p/c.jpg", "ETag": '"e3"', "Size": 3}, {"Key": "p/a.jpg", "ETag": '"e1"', "Size": 1}]},
        {},  # an empty page has no "Contents"
        {"Contents": [{"Key": "p/b.jpg", "ETag": '"e2"', "Size": 2}]},
    ])
    job = Job(job_id="p5", refs=(), output_prefix=None, source="prefix-job", prefix="p/", bucket=BUCKET)
    expanded = expand_prefix_job(job, client, page_size=2)
    assert expanded.refs == (
        ImageRef(BUCKET, "p/a.jpg", etag="e1", size=1),
        ImageRef(BUCKET, "p/b.jpg", etag="e2", size=2),
        ImageRef(BUCKET, "p/c.jpg", etag="e3", size=3),
    )
    assert client.calls == [{"Bucket": BUCKET, "Prefix": "p/", "PaginationConfig": {"PageSize": 2}}]


def test_expand_prefix_job_custom_suffixes_and_no_filter(s3):
    for key in ["p/a.jpg", "p/b.txt", "p/c.PNG", "p/d/"]:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"1")
    job = Job(job_id="p2", refs=(), output_prefix=None, source="prefix-job", prefix="p/", bucket=BUCKET)
    assert [r.key for r in expand_prefix_job(job, s3, suffixes=(".png",)).refs] == ["p/c.PNG"]
    assert [r.key for r in expand_prefix_job(job, s3, suffixes=None).refs] == ["p/a.jpg", "p/b.txt", "p/c.PNG"]
    assert ".jpg" in IMAGE_SUFFIXES and ".tiff" in IMAGE_SUFFIXES


def test_expand_prefix_job_empty_prefix_listing(s3):
    job = Job(job_id="p3", refs=(), output_prefix=None, source="prefix-job", prefix="nothing/", bucket=BUCKET)
    assert expand_prefix_job(job, s3).refs == ()


def test_expand_prefix_job_max_keys(s3):
    for i in range(4):
        s3.put_object(Bucket=BUCKET, Key=f"m/{i}.jpg", Body=b"1")
    job = Job(job_id="p4", refs=(), output_prefix=None, source="prefix-job", prefix="m/", bucket=BUCKET)
    assert len(expand_prefix_job(job, s3, max_keys=4).refs) == 4
    with pytest.raises(MessageError) as info:
        expand_prefix_job(job, s3, max_keys=3, page_size=2)
    assert info.value.code == "too_many_objects"


def test_expand_prefix_job_rejects_non_prefix_jobs(s3):
    job = parse_message(json.dumps({"job_id": "j1", "bucket": BUCKET, "keys": ["a.jpg"]}))
    with pytest.raises(ValueError):
        expand_prefix_job(job, s3)
