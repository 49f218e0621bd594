"""The worker reads the object an S3 event names, on moto: its ``VersionId`` when the event has
one (a versioned bucket: the old bytes are still there, they are classified), else ``IfMatch``
on the event's ETag (an unversioned bucket: an object overwritten since is ``changed``, the 412
is never a transient fault retried for ever); the manifest says which ETag/version it read.
A job's keys name no version: they are read as they are and the manifest says what was read."""

from __future__ import annotations

import hashlib

import boto3
import pytest
from moto import mock_aws

from tests.fakes import PixelClassifier, label_of, photo
from worker import images
from worker.messages import ImageRef
from worker.pipeline import PhotoRequest, Pipeline, PipelineSettings, S3Reader, fetch_and_decode

BUCKET = "photos"


@pytest.fixture
def s3(aws_env):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def put(s3, key: str, body: bytes) -> tuple[str, str | None]:
    response = s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return response["ETag"].strip('"'), response.get("VersionId")


def answer(s3, requests):
    pipeline = Pipeline(PixelClassifier(), s3, PipelineSettings(batch_size=4, download_threads=2))
    try:
        return {(a.request.message_id, a.request.position): a for a in pipeline.answer(requests)}
    finally:
        pipeline.close()


def label(body: bytes) -> str:
    return label_of(images.load_image(body, size=(8, 8)))[0].breed


def test_moto_answers_if_match_on_get_object_with_a_412(s3):
    etag, _ = put(s3, "a.png", photo(1))
    assert s3.get_object(Bucket=BUCKET, Key="a.png", IfMatch=f'"{etag}"')["Body"].read() == photo(1)
    with pytest.raises(s3.exceptions.ClientError) as raised:
        s3.get_object(Bucket=BUCKET, Key="a.png", IfMatch='"0123456789abcdef0123456789abcdef"')
    assert raised.value.response["Error"]["Code"] == "PreconditionFailed"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_an_object_overwritten_after_its_event_is_changed_in_an_unversioned_bucket(s3):
    old_etag, _ = put(s3, "a.png", photo(1))
    new_etag, _ = put(s3, "a.png", photo(2))
    fetched = fetch_and_decode(S3Reader(s3), ImageRef(BUCKET, "a.png", etag=old_etag), (8, 8), images.DecodeLimits())
    assert fetched.error[0] == "changed" and fetched.failure is None  # permanent: never retried
    event = ImageRef(BUCKET, "a.png", etag=old_etag)
    answers = answer(s3, [PhotoRequest("event", 0, event, exact=True),
                          PhotoRequest("job", 0, ImageRef(BUCKET, "a.png"))])
    changed, current = answers[("event", 0)].item, answers[("job", 0)].item
    assert (changed.status, changed.error_code, changed.etag) == ("error", "changed", old_etag)
    assert (current.status, current.breed, current.etag) == ("ok", label(photo(2)), new_etag)


def test_the_event_of_the_current_object_is_classified_with_the_etag_read(s3):
    etag, _ = put(s3, "dog photo+1 é.png", photo(3))
    answers = answer(s3, [PhotoRequest("event", 0, ImageRef(BUCKET, "dog photo+1 é.png", etag=etag), exact=True)])
    item = answers[("event", 0)].item
    assert (item.status, item.breed, item.etag) == ("ok", label(photo(3)), hashlib.md5(photo(3)).hexdigest())


def test_a_versioned_bucket_classifies_the_version_its_event_names(s3):
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    old_etag, old_version = put(s3, "a.png", photo(4))
    new_etag, new_version = put(s3, "a.png", photo(5))
    assert old_version and new_version and old_version != new_version
    answers = answer(s3, [
        PhotoRequest("old", 0, ImageRef(BUCKET, "a.png", etag=old_etag, version_id=old_version), exact=True),
        PhotoRequest("new", 0, ImageRef(BUCKET, "a.png", etag=new_etag, version_id=new_version), exact=True),
        PhotoRequest("job", 0, ImageRef(BUCKET, "a.png")),
    ])
    old, new, job = (answers[(m, 0)].item for m in ("old", "new", "job"))
    assert (old.breed, old.etag, old.version_id) == (label(photo(4)), old_etag, old_version)
    assert (new.breed, new.etag, new.version_id) == (label(photo(5)), new_etag, new_version)
    assert (job.breed, job.etag, job.version_id) == (label(photo(5)), new_etag, new_version)
