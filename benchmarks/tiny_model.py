"""A tiny "colour" model artifact, built on the fly for benchmarks that need a real model but not a real
breed classifier (the soak run): a photo's dominant colour -> one of three breeds.

It is the same recipe as the ``colour_artifact`` test fixture (tests/conftest.py), kept here so that
benchmarks do not import from ``tests/``: 30 noisy one-colour photos per class, squash-resized to 32x32
with ``worker.images.load_image``, a Rescaling -> GlobalAveragePooling -> Dense(softmax) Keras model,
written with ``worker.artifact.write_artifact`` (so it is checksummed and loads like any artifact).
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

    from worker import artifact, images

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
    artifact.write_artifact(
        dest, keras_model=model,
        labels=[artifact.Label.from_folder(i, f) for i, f in enumerate(folders)],
        manifest_fields={"name": "colours", "version": "v1", "backbone": "none", "input_size": list(INPUT_SIZE),
                         "weights": {"kind": "random", "imagenet": False}},
        model_card="# colours\nA tiny benchmark model: dominant colour -> breed.\n",
    )
    return dest
