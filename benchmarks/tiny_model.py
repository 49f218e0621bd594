"""A tiny "colour" model artifact, built on the fly for benchmarks that need a real model but not a real
breed classifier (the soak run): a photo's dominant colour -> one of three breeds.

It is the same recipe as the ``colour_artifact`` test fixture (tests/conftest.py), kept here so that
benchmarks do not import from ``tests/``: 30 noisy one-colour photos per class, squash-resized to 32x32
with ``worker.images.load_image``, a Rescaling -> GlobalAveragePooling -> Dense(softmax) Keras model,
written with ``trainer.artifact_writer.write_artifact`` (so it is checksummed and loads like any artifact).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Stanford Dogs folder -> the dominant colour that the tiny model maps to that breed.
COLOUR_BREEDS = {
    "n02085620-Chihuahua": (220, 40, 40),
    "n02111889-Samoyed": (40, 200, 60),
    "n02088364-beagle": (40, 60, 220),
}
INPUT_SIZE = (32, 32)  # (height, width) of the model input


def breed_name(folder: str) -> str:
    """``"n02085620-Chihuahua"`` -> ``"Chihuahua"`` (what a manifest's ``breed`` holds)."""
    return folder.split("-", 1)[1].replace("_", " ")


def colour_photo(rgb, size=(120, 90), seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A noisy photo of one dominant colour, ``size = (width, height)``, encoded as ``fmt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 25, (size[1], size[0], 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def build_colour_artifact(dest: str | os.PathLike, *, epochs: int = 60, seed: int = 0) -> Path:
    """Train the tiny colour model and write it as an artifact folder at ``dest`` (must not exist or be
    empty). Returns ``dest``. Raises ``RuntimeError`` if the model does not learn the training set."""
    import keras

    from trainer import artifact_writer
    from worker import images

    keras.utils.set_random_seed(seed)
    folders = list(COLOUR_BREEDS)
    x, y = [], []
    for label, folder in enumerate(folders):
        for photo_seed in range(30):
            photo = colour_photo(COLOUR_BREEDS[folder], seed=photo_seed)
            x.append(images.load_image(photo, size=(INPUT_SIZE[1], INPUT_SIZE[0])))
            y.append(label)
    x = np.stack(x).astype(np.float32)
    y = keras.utils.to_categorical(y, len(folders))
    model = keras.Sequential([
        keras.Input((*INPUT_SIZE, 3)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(folders), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, verbose=0)
    accuracy = model.evaluate(x, y, verbose=0)[1]
    if accuracy != 1.0:
        raise RuntimeError(f"the tiny colour model did not learn its training set (accuracy {accuracy})")
    dest = Path(dest)
    artifact_writer.write_artifact(
        dest, keras_model=model,
        labels=[artifact_writer.label_from_folder(i, f) for i, f in enumerate(folders)],
        manifest_fields={"name": "colours", "version": "v1", "backbone": "none", "input_size": list(INPUT_SIZE),
                         "weights": {"kind": "random", "imagenet": False}},
        model_card="# colours\nA tiny benchmark model: dominant colour -> breed.\n",
    )
    return dest


FAST_INPUT_SIZE = (32, 32)


def build_fast_colour_artifact(dest: str | os.PathLike, *, epochs: int = 40, seed: int = 0) -> Path:
    """A tiny conv net on the colour "breeds" (VGG preprocessing layer, two convolutions, GeM pooling
    as the VGG16 transfer model has, dense head), written at ``dest`` with its OpenVINO int8 (-> bf16
    cascade) and bf16 variants as ``dogbreeds-train publish`` builds them: every runtime the worker
    serves, in seconds, for smoke runs of the benchmarks. The recipe of the ``fast_colour_artifact``
    test fixture (tests/conftest.py). Needs the ``train`` extra (OpenVINO, NNCF)."""
    import tempfile

    import keras

    from trainer import artifact_writer, fast_runtimes
    from trainer.pooling import global_pooling
    from trainer.preprocessing import build_preprocessing
    from worker import images

    def photos(n_per_class: int, seed0: int):
        x, y = [], []
        for label, folder in enumerate(COLOUR_BREEDS):
            for photo_seed in range(seed0, seed0 + n_per_class):
                x.append(images.load_image(colour_photo(COLOUR_BREEDS[folder], seed=photo_seed),
                                           size=(FAST_INPUT_SIZE[1], FAST_INPUT_SIZE[0])))
                y.append(label)
        return np.stack(x), np.array(y)

    keras.utils.set_random_seed(seed)
    x, y = photos(20, 0)
    model = keras.Sequential([
        keras.Input((*FAST_INPUT_SIZE, 3)),
        build_preprocessing("vgg", "vgg16"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        global_pooling("gem"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(len(COLOUR_BREEDS), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.astype(np.float32), y, epochs=epochs, batch_size=30, verbose=0)
    folders = list(COLOUR_BREEDS)
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix=".tiny-") as tmp:
        saved = Path(tmp) / "saved"
        artifact_writer.export_saved_model(model, saved)
        heldout, labels = photos(10, 100)
        files, entries = fast_runtimes.build_openvino_variants(saved, Path(tmp) / "variants", calibration=x,
                                                               heldout=heldout, heldout_labels=labels, threads=1)
        artifact_writer.write_artifact(
            dest, model_dir=saved, labels=[artifact_writer.label_from_folder(i, f) for i, f in enumerate(folders)],
            manifest_fields={"name": "colours-fast", "version": "v1", "backbone": "tiny",
                             "input_size": list(FAST_INPUT_SIZE), "weights": {"kind": "random", "imagenet": False},
                             "runtimes": {"tf": {"path": "model", "precision": "fp32"}, **entries}},
            model_card="# colours-fast\nA tiny benchmark model with OpenVINO variants: dominant colour -> breed.\n",
            extra_files=files)
    return dest


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny colour model artifact (for smoke runs of the "
                                                 "benchmarks: --model DEST).")
    parser.add_argument("dest", help="Artifact folder to write (must not exist).")
    parser.add_argument("--fast", action="store_true", help="The conv net with OpenVINO int8/bf16 variants.")
    args = parser.parse_args()
    built = (build_fast_colour_artifact if args.fast else build_colour_artifact)(args.dest)
    print(built)
