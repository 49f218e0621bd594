"""Shared fixtures: a moto server on 127.0.0.1 (real HTTP), tiny trained models as artifacts,
synthetic and sample photos."""

from __future__ import annotations

import io
import os
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "photos"
COLOUR_BREEDS = {  # a tiny model learns these: a photo's dominant colour -> a breed
    "n02085620-Chihuahua": (220, 40, 40),
    "n02111889-Samoyed": (40, 200, 60),
    "n02088364-beagle": (40, 60, 220),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def savedmodel_opt_in(request, monkeypatch):
    """``colour_artifact`` is a TensorFlow-only model (no OpenVINO variants), which the worker
    serves only when told to (worker.runtimes: a SavedModel is a program). The tests that serve it
    opt in explicitly, as an operator would: ``DOGBREEDS_ALLOW_SAVEDMODEL=1`` (inherited by the
    worker processes they start)."""
    if "colour_artifact" in request.fixturenames:
        monkeypatch.setenv("DOGBREEDS_ALLOW_SAVEDMODEL", "1")
    else:
        monkeypatch.delenv("DOGBREEDS_ALLOW_SAVEDMODEL", raising=False)


@pytest.fixture
def aws_env(monkeypatch):
    """Fake credentials and a region, no real AWS reachable."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def mock_s3(aws_env):
    """An S3 client on moto's in-process mock (no server)."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


@contextmanager
def threaded_moto_server() -> Iterator[str]:
    """moto's server mode in a thread of this process on 127.0.0.1:<free port>, started clean and
    stopped on exit; yields its endpoint. A thread is enough for every test that does not need to
    kill the server (none does today); moto's backends live in this process, hence the reset."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset).close()  # state left by mock_aws or an earlier server: start clean
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def moto_server(aws_env, monkeypatch):
    """moto in server mode on 127.0.0.1:<free port>; AWS_ENDPOINT_URL points boto3 at it."""
    with threaded_moto_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint


def colour_photo(rgb: tuple[int, int, int], size=(120, 90), seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A noisy photo of one dominant colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def colour_artifact(tmp_path_factory) -> Path:
    """A tiny model trained (in the test session) to tell the three colour 'breeds' apart,
    written as a real artifact."""
    import keras

    from trainer import artifact_writer
    from worker import images

    keras.utils.set_random_seed(0)
    folders = list(COLOUR_BREEDS)
    x, y = [], []
    for label, folder in enumerate(folders):
        for seed in range(30):
            x.append(images.load_image(colour_photo(COLOUR_BREEDS[folder], seed=seed), size=(32, 32)))
            y.append(label)
    x = np.stack(x).astype(np.float32)
    y = keras.utils.to_categorical(y, len(folders))
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(folders), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=60, verbose=0)
    assert model.evaluate(x, y, verbose=0)[1] == 1.0
    dest = tmp_path_factory.mktemp("artifacts") / "colours"
    artifact_writer.write_artifact(
        dest, keras_model=model,
        labels=[artifact_writer.label_from_folder(i, f) for i, f in enumerate(folders)],
        manifest_fields={"name": "colours", "version": "v1", "backbone": "none", "input_size": [32, 32],
                         "weights": {"kind": "random", "imagenet": False}},
        model_card="# colours\nA test model: dominant colour -> breed.\n",
    )
    return dest


FAST_SIZE = 32


def colour_data(n_per_class: int, seed0: int = 0):
    from worker import images

    x, y = [], []
    for label, folder in enumerate(COLOUR_BREEDS):
        for seed in range(seed0, seed0 + n_per_class):
            x.append(images.load_image(colour_photo(COLOUR_BREEDS[folder], seed=seed), size=(FAST_SIZE, FAST_SIZE)))
            y.append(label)
    return np.stack(x), np.array(y)


@pytest.fixture(scope="session")
def fast_colour_artifact(tmp_path_factory) -> Path:
    """A tiny conv net (VGG preprocessing layer, two convolutions, GeM pooling as the VGG16
    transfer model has, dense head) trained on the colour 'breeds', published with its OpenVINO
    int8 and bf16 variants as publish does it."""
    pytest.importorskip("openvino")  # the train / worker-lite extras
    pytest.importorskip("nncf")  # the train extra (int8 quantisation at publish time)
    import keras

    from trainer import artifact_writer, fast_runtimes
    from trainer.pooling import global_pooling
    from trainer.preprocessing import build_preprocessing

    keras.utils.set_random_seed(0)
    x, y = colour_data(20)
    model = keras.Sequential([
        keras.Input((FAST_SIZE, FAST_SIZE, 3)),
        build_preprocessing("vgg", "vgg16"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        global_pooling("gem"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(len(COLOUR_BREEDS), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.astype(np.float32), y, epochs=40, batch_size=30, verbose=0)
    root = tmp_path_factory.mktemp("fast")
    saved = root / "saved"
    artifact_writer.export_saved_model(model, saved)
    heldout, labels = colour_data(10, seed0=100)
    files, entries = fast_runtimes.build_openvino_variants(saved, root / "variants", calibration=x, heldout=heldout,
                                                           heldout_labels=labels, threads=1)
    dest = root / "colours-fast"
    artifact_writer.write_artifact(
        dest, model_dir=saved, labels=[artifact_writer.label_from_folder(i, f) for i, f in enumerate(COLOUR_BREEDS)],
        manifest_fields={"name": "colours-fast", "version": "v1", "backbone": "tiny", "input_size": [FAST_SIZE, FAST_SIZE],
                         "runtimes": {"tf": {"path": "model", "precision": "fp32"}, **entries}},
        model_card="# colours-fast\nA tiny test model with OpenVINO variants.\n", extra_files=files)
    return dest


GREYS = [(128, 128, 128), (30, 30, 30), (235, 235, 235)]  # the tiny world's photos without a dog


def grey_data(n_per_shade: int, seed0: int = 0) -> np.ndarray:
    from worker import images

    return np.stack([images.load_image(colour_photo(shade, seed=seed), size=(FAST_SIZE, FAST_SIZE))
                     for shade in GREYS for seed in range(seed0, seed0 + n_per_shade)])


DOG_CHECK_TEMPERATURE = 2.5


@pytest.fixture(scope="session")
def dog_check_artifact(tmp_path_factory) -> dict:
    """A tiny transfer model as publish serves it: a frozen part (preprocessing, two
    convolutions, GeM; named like trainer.models.frozen_part's) and a trained head, wrapped by
    trainer.serving with a temperature and a logistic dog head fitted on its pooled features
    (colour photos are "dogs", grey ones are not), exported with its OpenVINO int8 (cascade) and
    bf16 variants. Returns the artifact folder, the unwrapped breed model and the dog head."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import keras

    from trainer import artifact_writer, dog_check, fast_runtimes, serving
    from trainer.pooling import global_pooling
    from trainer.preprocessing import build_preprocessing

    keras.utils.set_random_seed(0)
    x, y = colour_data(20)
    # functional, as trainer.models.frozen_part builds it (its own `output` is not the outer graph's)
    pixels = keras.Input((FAST_SIZE, FAST_SIZE, 3))
    h = build_preprocessing("vgg", "vgg16")(pixels)
    h = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h))
    h = global_pooling("gem")(keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h))
    frozen = keras.Model(pixels, h, name="tiny_to_conv_gem")
    head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(len(COLOUR_BREEDS), activation="softmax", name="breed")],
                            name="transfer_head")
    inputs = keras.Input((FAST_SIZE, FAST_SIZE, 3), name="image")
    breed_model = keras.Model(inputs, head(frozen(inputs)), name="tiny_inference")
    breed_model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    breed_model.fit(x.astype(np.float32), y, epochs=40, batch_size=30, verbose=0)
    greys = grey_data(10)
    dog_head, _ = dog_check.fit_dog_head(np.asarray(frozen(x.astype(np.float32))),
                                         np.asarray(frozen(greys.astype(np.float32))), c=1.0)
    served = serving.served_model(breed_model, temperature=DOG_CHECK_TEMPERATURE, dog_method="dog-head",
                                  dog_head=dog_head)
    root = tmp_path_factory.mktemp("dogcheck")
    saved = root / "saved"
    artifact_writer.export_saved_model(served, saved)
    heldout = np.concatenate([colour_data(10, seed0=100)[0], grey_data(5, seed0=100)])
    labels = np.concatenate([colour_data(10, seed0=100)[1], np.full(15, -1)])
    threshold = 0.5
    files, entries = fast_runtimes.build_openvino_variants(
        saved, root / "variants", calibration=np.concatenate([x, greys]), heldout=heldout, heldout_labels=labels,
        threads=1, num_classes=len(COLOUR_BREEDS), dog_threshold=threshold)
    dest = root / "colours-dogcheck"
    artifact_writer.write_artifact(
        dest, model_dir=saved, labels=[artifact_writer.label_from_folder(i, f) for i, f in enumerate(COLOUR_BREEDS)],
        manifest_fields={"name": "colours-dogcheck", "version": "v1", "backbone": "tiny",
                         "input_size": [FAST_SIZE, FAST_SIZE],
                         "runtimes": {"tf": {"path": "model", "precision": "fp32"}, **entries},
                         "dog_check": {"method": "dog-head", "threshold": threshold,
                                       "score_column": len(COLOUR_BREEDS)},
                         "calibration": {"temperature": DOG_CHECK_TEMPERATURE}},
        model_card="# colours-dogcheck\nA tiny test model with a dog check and a temperature.\n", extra_files=files)
    return {"path": dest, "breed_model": breed_model, "dog_head": dog_head, "frozen": frozen,
            "threshold": threshold}
