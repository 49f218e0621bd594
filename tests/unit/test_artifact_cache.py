"""The cache layout under ``$DOGBREEDS_CACHE``: one sub-folder per kind (``artifacts``,
``features``, ``weights``), so an artifact from a bucket named like another kind never lands
among (or replaces) the trainer's features or weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import features, weights
from trainer.artifact_writer import label_from_folder, write_artifact
from trainer.registry import upload_artifact
from worker.artifact import resolve_artifact, verify_artifact
from worker.artifact.store import cache_path, cache_root
from worker.s3uri import s3_client

KINDS = ("features", "weights", "artifacts")
# S3 bucket names: 3-63 of lowercase letters, digits, '.' and '-', starting and ending alphanumeric
BUCKETS = st.one_of(st.sampled_from(KINDS + ("s3", "cache", "dogbreeds")),
                    st.from_regex(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z"))
SEGMENT = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z").filter(lambda s: s not in (".", ".."))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    root = tmp_path / "dogbreeds-cache"
    monkeypatch.setenv("DOGBREEDS_CACHE", str(root))
    return root


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bucket=BUCKETS, key=st.lists(SEGMENT, min_size=1, max_size=4).map("/".join))
def test_artifact_cache_paths_stay_in_the_artifacts_folder(cache_env, bucket, key):
    path = cache_path(bucket, key)
    assert cache_root() == cache_env / "artifacts"
    assert _inside(path, cache_env / "artifacts") and path != cache_env / "artifacts"
    for other in (features.default_cache(), weights.cache_dir()):
        assert not _inside(path, other) and not _inside(other, path)


def test_a_bucket_named_features_or_weights_does_not_collide(cache_env, tmp_path, monkeypatch):
    from moto import mock_aws

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    # what the trainer keeps there: a feature array and a converted weights file
    feature = features.default_cache() / "vgg16-block5_pool-0123.npy"
    weight = weights.cache_dir() / "vgg16.npz"
    for f in (feature, weight):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"the trainer's " + f.name.encode())

    model = tmp_path / "saved"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"never loaded: the cache only moves bytes")
    art = tmp_path / "art"
    write_artifact(art, model_dir=model, labels=[label_from_folder(0, "n02085620-Chihuahua")],
                   manifest_fields={"name": "tiny", "version": "v1", "backbone": "none", "input_size": [8, 8]},
                   model_card="# tiny")
    with mock_aws():
        s3 = s3_client()
        for bucket in KINDS:
            s3.create_bucket(Bucket=bucket)
            upload_artifact(art, f"s3://{bucket}/", s3=s3)  # keys tiny/v1/..., as close to the cache root as can be
            local = resolve_artifact(f"s3://{bucket}/tiny", s3=s3)  # the default cache root
            assert local == cache_env / "artifacts" / bucket / "tiny" / "v1"
            verify_artifact(local)
            assert not _inside(local, features.default_cache()) and not _inside(local, weights.cache_dir())
    assert feature.read_bytes() == b"the trainer's " + feature.name.encode()
    assert weight.read_bytes() == b"the trainer's " + weight.name.encode()
    assert sorted(p.name for p in cache_env.iterdir()) == sorted(KINDS)
