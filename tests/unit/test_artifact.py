"""The model artifact contract: write, verify (tamper refusal), registries, S3 + cache, load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer.artifact_writer import label_from_folder, new_version, write_artifact
from trainer.registry import copy_to_local_registry, upload_artifact
from worker.artifact import (
    SCHEMA_VERSION,
    ArtifactError,
    ArtifactManifest,
    Label,
    read_manifest,
    resolve_artifact,
    verify_artifact,
)
from worker.artifact.loading import load_artifact
from worker.s3uri import S3Uri, s3_client

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ["n02085620-Chihuahua", "n02086240-Shih-Tzu", "n02089078-black-and-tan_coonhound"]
NAME = "tiny"
V1 = "20260101T000000Z"
V2 = "20260102T000000Z"
VARIABLES = "model/variables/variables.data-00000-of-00001"
BUCKET = "dogbreeds-models"


def _labels():
    return [label_from_folder(i, f) for i, f in enumerate(FOLDERS)]


def _fields(version=V1, **over):
    fields = {
        "name": NAME,
        "version": version,
        "backbone": "tiny-gap",
        "weights": {"kind": "random", "location": None, "sha256": None, "imagenet": False, "note": "test"},
        "input_size": [32, 32],
        "metrics": {"val_accuracy": 0.5},
        "hyperparameters": {"lr": 0.001},
        "training": {"epochs": 0},
    }
    fields.update(over)
    return fields


def _tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out)


def _batch(n=5, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One exported artifact (export is the slow part); tests copy it before touching it."""
    base = tmp_path_factory.mktemp("built")
    model = _tiny_model()
    plot = base / "curves.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    manifest = write_artifact(
        base / "art",
        keras_model=model,
        labels=_labels(),
        manifest_fields=_fields(),
        model_card="# tiny\n\nA test model.\n",
        extra_files={"plots/curves.png": plot},
    )
    expected = np.asarray(model(_batch()), dtype=np.float32)
    return base / "art", manifest, expected


@pytest.fixture
def art(built, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(built[0], dst)
    return dst


def _edit_manifest(path: Path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


def _flip_byte(p: Path, at: int | None = None):
    data = bytearray(p.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    p.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- labels / versions


def test_label_from_folder():
    label = label_from_folder(7, "n02089078-black-and-tan_coonhound")
    assert label == Label(index=7, synset="n02089078", breed="black-and-tan coonhound",
                          folder="n02089078-black-and-tan_coonhound")
    assert label_from_folder(1, "n02086240-Shih-Tzu").breed == "Shih-Tzu"
    assert Label.from_dict(label.to_dict()) == label
    with pytest.raises(ValueError):
        label_from_folder(0, "Chihuahua")


def test_new_version_is_sortable_utc_timestamp():
    from datetime import datetime, timedelta, timezone

    t = datetime(2026, 11, 25, 21, 4, 55, tzinfo=timezone.utc)
    assert new_version(t) == "20261125T210455Z"
    assert new_version(t) < new_version(t + timedelta(seconds=1)) < new_version(t + timedelta(days=40))
    assert re.fullmatch(r"\d{8}T\d{6}Z", new_version())


# ----------------------------------------------------------------------------- write / verify / load


def test_write_verify_load_roundtrip(built):
    path, manifest, expected = built
    assert manifest == verify_artifact(path)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.name == NAME and manifest.version == V1
    assert manifest.num_classes == 3 and manifest.input_size == [32, 32]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest.created)
    assert ArtifactManifest.from_dict(json.loads((path / "manifest.json").read_text())) == manifest
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(manifest.files) == [f for f in on_disk if f != "manifest.json"]
    assert {"labels.json", "README.md", "model/saved_model.pb", "plots/curves.png", VARIABLES} <= set(manifest.files)
    assert json.loads((path / "labels.json").read_text())[2] == {
        "index": 2, "synset": "n02089078", "breed": "black-and-tan coonhound",
        "folder": "n02089078-black-and-tan_coonhound"}

    loaded = load_artifact(str(path), runtime="tf")  # a TF-only artifact: chosen explicitly
    assert loaded.labels == _labels() and loaded.manifest == manifest
    probs = loaded.predict(_batch())
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError):
        loaded.predict(np.zeros((1, 16, 16, 3), np.float32))


def test_exported_savedmodel_stores_each_weight_once(built):
    """Keras 3's model.export() saves every variable twice; export_saved_model must not."""
    import tensorflow as tf

    path, _, _ = built
    stored = {k: v for k, v in tf.train.load_checkpoint(str(path / "model" / "variables" / "variables"))
              .get_variable_to_shape_map().items() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    model = _tiny_model()
    assert sorted(map(tuple, stored.values())) == sorted(tuple(v.shape) for v in model.variables)


def test_write_rejects_label_count_mismatch(tmp_path):
    with pytest.raises(ArtifactError, match="3 classes but 4 labels"):
        write_artifact(tmp_path / "x", keras_model=_tiny_model(), labels=_labels() + [label_from_folder(3, "n02086079-Pekinese")],
                       manifest_fields=_fields(), model_card="# x")
    assert not (tmp_path / "x").exists()


def test_tampered_model_byte_is_refused(art):
    _flip_byte(art / VARIABLES)
    with pytest.raises(ArtifactError) as e:
        verify_artifact(art)
    assert VARIABLES in str(e.value) and "sha256 mismatch" in str(e.value)
    assert len(e.value.problems) == 1
    with pytest.raises(ArtifactError, match=re.escape(VARIABLES)):
        load_artifact(str(art))


def test_missing_labels_is_refused(art):
    (art / "labels.json").unlink()
    with pytest.raises(ArtifactError, match=r"labels\.json: missing"):
        verify_artifact(art)


def test_extra_file_in_model_is_refused(art):
    (art / "model" / "assets").mkdir(exist_ok=True)
    (art / "model" / "assets" / "evil.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"model/assets/evil\.txt: not listed"):
        verify_artifact(art)


def test_manifest_edits_are_refused(art):
    _edit_manifest(art, lambda m: m.update(num_classes=4))
    with pytest.raises(ArtifactError, match="has 3 labels but manifest.json num_classes is 4"):
        verify_artifact(art)

    _edit_manifest(art, lambda m: m.update(num_classes=3))
    verify_artifact(art)
    _edit_manifest(art, lambda m: m["files"].update({"README.md": "0" * 64}))
    with pytest.raises(ArtifactError, match=r"README\.md: sha256 mismatch \(expected 0{64}, actual [0-9a-f]{64}\)"):
        verify_artifact(art)


def test_manifest_path_escape_is_refused(art):
    _edit_manifest(art, lambda m: m["files"].update({"../outside": "0" * 64}))
    with pytest.raises(ArtifactError, match="unsafe path"):
        verify_artifact(art)


# ----------------------------------------------------------------------------- local registry


def test_local_registry_latest(built, tmp_path):
    path1 = built[0]
    path2 = tmp_path / "v2"
    write_artifact(path2, model_dir=path1 / "model", labels=_labels(), manifest_fields=_fields(V2),
                   model_card="# tiny v2")
    root = tmp_path / "registry"
    d1 = copy_to_local_registry(path1, root)
    d2 = copy_to_local_registry(path2, root)
    assert (d1, d2) == (root / NAME / V1, root / NAME / V2)
    assert (root / NAME / "latest").read_text().strip() == V2
    assert resolve_artifact(str(root / NAME)) == d2.resolve()
    assert resolve_artifact(str(root / NAME / "latest")) == d2.resolve()
    assert resolve_artifact(str(d1)) == d1.resolve()
    assert verify_artifact(d1).version == V1

    copy_to_local_registry(path1, root, set_latest=False)  # idempotent, pointer untouched
    assert resolve_artifact(str(root / NAME)) == d2.resolve()
    copy_to_local_registry(path1, root)  # explicit rollback
    assert resolve_artifact(str(root / NAME)) == d1.resolve()

    (root / NAME / "latest").write_text("../../etc")
    with pytest.raises(ArtifactError, match="valid version"):
        resolve_artifact(str(root / NAME))
    with pytest.raises(ArtifactError, match="no such"):
        resolve_artifact(str(root / "nope"))


def test_local_registry_refuses_to_overwrite_a_version(built, tmp_path):
    other = tmp_path / "other"
    write_artifact(other, model_dir=built[0] / "model", labels=_labels(), manifest_fields=_fields(V1),
                   model_card="# a different card")
    root = tmp_path / "registry"
    copy_to_local_registry(built[0], root)
    with pytest.raises(ArtifactError, match="immutable"):
        copy_to_local_registry(other, root)


# ----------------------------------------------------------------------------- S3 (moto)


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "DOGBREEDS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = s3_client()
        s3.create_bucket(Bucket=BUCKET)
        yield s3


def _record(s3, operation):
    calls = []
    s3.meta.events.register(f"provide-client-params.s3.{operation}",
                            lambda params, **_: calls.append(params.get("Key")))
    return calls


def test_s3_upload_resolve_load_and_cache(built, aws, tmp_path):
    s3 = aws
    path, manifest, expected = built
    puts = _record(s3, "PutObject")
    mpu = _record(s3, "CreateMultipartUpload")
    uri = upload_artifact(path, f"s3://{BUCKET}/models", s3=s3)
    assert uri == f"s3://{BUCKET}/models/{NAME}/{V1}"
    prefix = f"models/{NAME}/{V1}/"
    keys = puts + mpu
    assert sorted(keys) == sorted([prefix + f for f in manifest.files] + [prefix + "manifest.json", f"models/{NAME}/latest"])
    assert puts[-2:] == [prefix + "manifest.json", f"models/{NAME}/latest"]  # manifest last, then latest
    assert s3.get_object(Bucket=BUCKET, Key=f"models/{NAME}/latest")["Body"].read().decode().strip() == V1

    gets = _record(s3, "GetObject")
    cache = tmp_path / "cache"
    local = resolve_artifact(f"s3://{BUCKET}/models/{NAME}", s3=s3, cache_dir=cache)
    assert local == cache / BUCKET / "models" / NAME / V1
    assert verify_artifact(local) == manifest
    file_gets = [k for k in gets if not k.endswith(("/latest", "/manifest.json"))]
    assert sorted(file_gets) == sorted(prefix + f for f in manifest.files)

    loaded = load_artifact(f"s3://{BUCKET}/models/{NAME}/latest", s3=s3, cache_dir=cache, runtime="tf")
    assert loaded.path == local
    np.testing.assert_allclose(loaded.predict(_batch()), expected, atol=1e-5)

    # Cached reuse: no file is downloaded again; a pinned version needs no S3 call at all.
    gets.clear()
    assert resolve_artifact(f"s3://{BUCKET}/models/{NAME}", s3=s3, cache_dir=cache) == local
    assert [k for k in gets if not k.endswith(("/latest", "/manifest.json"))] == []
    gets.clear()
    assert resolve_artifact(uri, s3=s3, cache_dir=cache) == local
    assert gets == []

    # A tampered cache is downloaded again (and ends up intact).
    _flip_byte(local / VARIABLES)
    gets.clear()
    assert resolve_artifact(uri, s3=s3, cache_dir=cache) == local
    assert prefix + VARIABLES in gets
    verify_artifact(local)
    # ... also when only a file was added to the cached model/.
    (local / "model" / "stray.bin").write_bytes(b"x")
    gets.clear()
    resolve_artifact(f"s3://{BUCKET}/models/{NAME}", s3=s3, cache_dir=cache)
    assert not (local / "model" / "stray.bin").exists() and gets


def test_s3_default_cache_and_errors(built, aws, tmp_path, monkeypatch):
    s3 = aws
    path = built[0]
    upload_artifact(path, f"s3://{BUCKET}/m", s3=s3)
    monkeypatch.setenv("DOGBREEDS_CACHE", str(tmp_path / "envcache"))
    local = resolve_artifact(f"s3://{BUCKET}/m/{NAME}")  # default client and default cache root
    assert local == tmp_path / "envcache" / "artifacts" / BUCKET / "m" / NAME / V1

    with pytest.raises(ArtifactError, match="neither manifest.json nor latest"):
        resolve_artifact(f"s3://{BUCKET}/m/missing", s3=s3, cache_dir=tmp_path / "c")

    # A version is immutable: a different artifact under the same name/version is refused.
    other = tmp_path / "other"
    write_artifact(other, model_dir=path / "model", labels=_labels(), manifest_fields=_fields(V1),
                   model_card="# different")
    with pytest.raises(ArtifactError, match="immutable"):
        upload_artifact(other, f"s3://{BUCKET}/m", s3=s3)

    # Corrupt object in S3 -> refused, nothing installed in the cache.
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=f"m/{NAME}/{V1}/README.md")["Body"].read())
    body[0] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=f"m/{NAME}/{V1}/README.md", Body=bytes(body))
    fresh = tmp_path / "fresh"
    with pytest.raises(ArtifactError, match=r"README\.md: sha256 mismatch"):
        resolve_artifact(f"s3://{BUCKET}/m/{NAME}/{V1}", s3=s3, cache_dir=fresh)
    assert not (fresh / BUCKET / "m" / NAME / V1).exists()


def test_s3uri_and_client_endpoint(monkeypatch):
    u = S3Uri.parse("s3://bucket/models/x/")
    assert (u.bucket, u.key) == ("bucket", "models/x/")
    assert str(u.join("tiny", "v1")) == "s3://bucket/models/x/tiny/v1"
    assert str(S3Uri.parse("s3://bucket").join("a")) == "s3://bucket/a"
    with pytest.raises(ValueError):
        S3Uri.parse("http://bucket/key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    assert s3_client().meta.endpoint_url == "http://127.0.0.1:5999"


def test_s3_load_downloads_only_the_chosen_runtimes_files(fast_colour_artifact, aws, tmp_path, monkeypatch):
    """A worker serving OpenVINO int8 never downloads the TensorFlow SavedModel; one serving TF
    later adds only the SavedModel to the same cached copy; a bad file from S3 is refused."""
    monkeypatch.delenv("DOGBREEDS_RUNTIME", raising=False)
    s3 = aws
    uri = upload_artifact(fast_colour_artifact, f"s3://{BUCKET}/models", s3=s3)
    manifest = read_manifest(fast_colour_artifact)
    prefix = uri.split(f"s3://{BUCKET}/", 1)[1] + "/"
    gets = _record(s3, "GetObject")
    photos = np.random.default_rng(0).uniform(0, 255, (3, *manifest.input_size, 3)).astype(np.float32)

    def fetched() -> set[str]:
        files = {k[len(prefix):] for k in gets if k.startswith(prefix)} - {"manifest.json"}
        gets.clear()
        return files

    cache = tmp_path / "cache"
    lite = load_artifact(uri, s3=s3, cache_dir=cache, runtime="openvino-int8")
    assert lite.runtime == "openvino-int8"
    openvino_files = {f for f in manifest.files if f.startswith("model-openvino-")}  # int8 + its bf16 fallback
    assert fetched() == openvino_files | {"labels.json"}
    assert not (lite.path / "model").exists()
    local_probs = load_artifact(str(fast_colour_artifact), runtime="openvino-int8").predict(photos)
    np.testing.assert_allclose(lite.predict(photos), local_probs, atol=1e-5)

    full = load_artifact(uri, s3=s3, cache_dir=cache, runtime="tf")
    assert full.path == lite.path and full.runtime == "tf"
    assert fetched() == {f for f in manifest.files if f.startswith("model/")}  # only what was missing
    again = load_artifact(uri, s3=s3, cache_dir=cache, runtime="openvino-int8")
    assert again.path == lite.path and fetched() == set()  # all cached now

    # a wrong file in S3 is refused before it reaches the cache
    other = tmp_path / "other-cache"
    load_artifact(uri, s3=s3, cache_dir=other, runtime="tf")
    bin_key = prefix + "model-openvino-int8/model.bin"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=bin_key)["Body"].read())
    body[100] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=bin_key, Body=bytes(body))
    with pytest.raises(ArtifactError, match=r"model-openvino-int8/model\.bin: sha256 mismatch"):
        load_artifact(uri, s3=s3, cache_dir=other, runtime="openvino-int8")
    cached = other / BUCKET / prefix.rstrip("/")
    assert not (cached / "model-openvino-int8" / "model.bin").exists()
    assert not [p for p in cached.rglob("*") if ".partial-" in p.name]


def test_s3_name_uri_without_list_permission_follows_latest(built, aws, tmp_path):
    """s3://.../<name> first probes <name>/manifest.json; without s3:ListBucket, S3 answers a
    missing key with AccessDenied, which must lead on to <name>/latest, not fail."""
    from botocore.exceptions import ClientError

    s3 = aws
    upload_artifact(built[0], f"s3://{BUCKET}/m", s3=s3)

    def deny_missing_keys(params, **_):
        key = params["Key"]
        if not s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount"):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")

    s3.meta.events.register("provide-client-params.s3.GetObject", deny_missing_keys)
    local = resolve_artifact(f"s3://{BUCKET}/m/{NAME}", s3=s3, cache_dir=tmp_path / "c")
    assert local == tmp_path / "c" / BUCKET / "m" / NAME / V1
    with pytest.raises(ClientError, match="AccessDenied"):  # where nothing is there at all, the denial shows
        resolve_artifact(f"s3://{BUCKET}/m/nothing-here", s3=s3, cache_dir=tmp_path / "c")
