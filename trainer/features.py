"""Cached backbone features: the frozen part of a backbone runs once per (photos, backbone,
weights, preprocessing, cut layer, augmentation copy); heads and tuning trials then train on
the cached arrays in seconds.

The cache key holds a sha256 of the decoded pixels themselves (after augmentation), so a
changed photo, decoder or augmentation can never be served a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from trainer import preprocessing

CACHE_KIND = "features"  # the sub-folder of $DOGBREEDS_CACHE that holds features (beside artifacts, weights)


def default_cache() -> Path:
    """``$DOGBREEDS_CACHE/features``, else ``~/.cache/dogbreeds/features`` (read when called)."""
    return Path(os.environ.get("DOGBREEDS_CACHE") or Path.home() / ".cache" / "dogbreeds").expanduser() / CACHE_KIND


@dataclass(frozen=True)
class FeatureKey:
    pixels_sha256: str
    backbone: str
    weights_sha256: str
    preprocessing: str
    cut_layer: str
    augmentation_copy: int  # 0: the photos as they are; k >= 1: augmented copy k
    augmentation_seed: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def pixels_sha256(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


def build_extractor(backbone, cut_layer: str | None, preprocessing_choice: str, backbone_name: str,
                    input_shape=(224, 224, 3), pooling: str | None = None):
    """photos (float32 RGB 0..255) -> preprocessing -> frozen backbone part (-> global pooling),
    as a Keras model."""
    import keras

    from trainer.models import frozen_part

    inputs = keras.Input(input_shape, name="image")
    x = preprocessing.build_preprocessing(preprocessing_choice, backbone_name)(inputs)
    outputs = frozen_part(backbone, cut_layer, pooling)(x, training=False)
    return keras.Model(inputs, outputs, name="feature_extractor")


def run_extractor(extractor, pixels: np.ndarray, batch_size: int = 16, desc: str = "features",
                  progress: bool = True) -> np.ndarray:
    """Run a Keras model over uint8 photos in batches through one traced tf.function (much
    faster per call than ``model.predict``); float16 out to halve the cache."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *pixels.shape[1:]), tf.float32)
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    out = []
    with tqdm(total=len(pixels), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].astype(np.float32)
            out.append(forward(batch).numpy().astype(np.float16))
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, *extractor.output_shape[1:]), np.float16)


@dataclass
class FeatureCache:
    """Features on disk, one ``.npy`` per key under ``root``."""

    root: Path = field(default_factory=default_cache)

    def path(self, key: FeatureKey) -> Path:
        return Path(self.root) / f"{key.backbone}-{key.cut_layer}-{key.digest()}.npy"

    def get_or_compute(self, key: FeatureKey, compute) -> tuple[np.ndarray, bool]:
        """The cached array for ``key``, or ``compute()`` stored under it; returns (array, hit)."""
        path = self.path(key)
        if path.exists():
            try:
                return np.load(path), True
            except (ValueError, OSError):
                path.unlink(missing_ok=True)  # a torn write: recompute
        array = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, array)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(asdict(key), indent=1))
        return array, False


def features_for(pixels: np.ndarray, *, extractor, cache: FeatureCache, backbone: str, weights_sha256: str,
                 preprocessing_choice: str, cut_layer: str, copies: int = 0, seed: int = 0,
                 batch_size: int = 16, progress: bool = True, desc: str = "") -> list[np.ndarray]:
    """Features of the photos (copy 0) and of ``copies`` seeded augmented copies, from the
    cache when present. Returns one array per copy."""
    results = []
    for copy in range(copies + 1):
        started = time.perf_counter()
        batch = pixels if copy == 0 else preprocessing.augment_batch(pixels, seed=seed * 1000 + copy)
        key = FeatureKey(pixels_sha256(batch), backbone, weights_sha256, preprocessing_choice, cut_layer, copy, seed)
        label = f"{desc} copy {copy}" if copy else (desc or "features")
        array, hit = cache.get_or_compute(
            key, lambda batch=batch, label=label: run_extractor(extractor, batch, batch_size, desc=label,
                                                                progress=progress)
        )
        if progress:
            state = "cached" if hit else f"computed in {time.perf_counter() - started:.0f}s"
            print(f"  {label}: {len(array)} x {array.shape[1:]} ({state})", flush=True)
        results.append(array)
    return results
