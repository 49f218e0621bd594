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

# Augmentation of the cached training copies (trainer.preprocessing.build_augmentation factors).
# "default": mild rotation, translation, zoom, contrast and a random flip; "strong": larger
# zoom (in and out), shifts and contrast, as for photos framed less tightly than Stanford's.
AUGMENTATIONS = {
    "default": {},
    "strong": {"rotation": 0.15, "translation": 0.2, "zoom": 0.35, "contrast": 0.4},
}


@dataclass(frozen=True)
class FeatureKey:
    pixels_sha256: str
    backbone: str
    weights_sha256: str
    preprocessing: str
    cut_layer: str
    augmentation_copy: int  # 0: the photos as they are; k >= 1: augmented copy k
    augmentation_seed: int
    via: str = ""  # computed from the cached (float16) maps of this earlier layer instead of from pixels

    def digest(self) -> str:
        fields = asdict(self)
        if not self.via:
            del fields["via"]  # keys made before ``via`` existed keep their digest
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


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
                  progress: bool = True, checkpoint: Path | None = None, checkpoint_every: int = 8) -> np.ndarray:
    """Run a Keras model over uint8 photos in batches through one traced tf.function (much
    faster per call than ``model.predict``); float16 out to halve the cache. With
    ``checkpoint``, the rows done so far are saved there every ``checkpoint_every`` batches and
    an interrupted run resumes from them (the caller names it after the cache key, so the file
    always belongs to these very photos); it is removed once the whole array is done."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *pixels.shape[1:]), tf.float32)
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[spec])
    out, done = [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            partial = np.load(checkpoint)
        except (ValueError, OSError):
            partial = None
        if partial is not None and len(partial) <= len(pixels):
            out, done = [partial], len(partial)
    with tqdm(total=len(pixels), initial=done, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i, start in enumerate(range(done, len(pixels), batch_size)):
            batch = pixels[start:start + batch_size].astype(np.float32)
            out.append(forward(batch).numpy().astype(np.float16))
            bar.update(len(batch))
            if checkpoint is not None and (i + 1) % checkpoint_every == 0 and start + batch_size < len(pixels):
                _save_atomically(Path(checkpoint), np.concatenate(out))
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return np.concatenate(out) if out else np.zeros((0, *extractor.output_shape[1:]), np.float16)


def _save_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    tmp.replace(path)


@dataclass(frozen=True)
class Stem:
    """Compute features from an earlier layer's cached maps: ``extractor`` gives the ``layer``
    maps from photos (cached under their own key, e.g. VGG16's block4_pool, which
    vgg16_finetune trains on), ``tail`` the features from those maps. One pass of the
    expensive layers then serves both families."""

    layer: str
    extractor: object
    tail: object


@dataclass
class FeatureCache:
    """Features on disk, one ``.npy`` per key under ``root``."""

    root: Path = field(default_factory=default_cache)

    def path(self, key: FeatureKey) -> Path:
        return Path(self.root) / f"{key.backbone}-{key.cut_layer}-{key.digest()}.npy"

    def partial(self, key: FeatureKey) -> Path:
        """Where an interrupted computation of ``key`` keeps the rows it has done."""
        return Path(self.root) / "partial" / f"{key.backbone}-{key.cut_layer}-{key.digest()}.npy"

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
                 batch_size: int = 16, progress: bool = True, desc: str = "",
                 stem: Stem | None = None, augmentation: str = "default") -> list[np.ndarray]:
    """Features of the photos (copy 0) and of ``copies`` seeded augmented copies (``augmentation``:
    a key of :data:`AUGMENTATIONS`; the cache key holds the augmented pixels), from the
    cache when present. Returns one array per copy. With ``stem``, each is computed from the
    stem layer's maps (themselves cached) instead of from the photos with ``extractor``."""
    results = []
    for copy in range(copies + 1):
        started = time.perf_counter()
        batch = pixels if copy == 0 else preprocessing.augment_batch(pixels, seed=seed * 1000 + copy,
                                                                     **AUGMENTATIONS[augmentation])
        key = FeatureKey(pixels_sha256(batch), backbone, weights_sha256, preprocessing_choice, cut_layer, copy, seed,
                         via=stem.layer if stem else "")
        label = f"{desc} copy {copy}" if copy else (desc or "features")

        def compute(batch=batch, label=label, key=key):
            if stem is None:
                return run_extractor(extractor, batch, batch_size, desc=label, progress=progress,
                                     checkpoint=cache.partial(key))
            stem_key = FeatureKey(key.pixels_sha256, backbone, weights_sha256, preprocessing_choice, stem.layer,
                                  key.augmentation_copy, seed)
            maps, _ = cache.get_or_compute(
                stem_key, lambda: run_extractor(stem.extractor, batch, batch_size, desc=f"{label} ({stem.layer})",
                                                progress=progress, checkpoint=cache.partial(stem_key)))
            return run_extractor(stem.tail, maps, 64, desc=f"{label} (from {stem.layer})", progress=progress)

        array, hit = cache.get_or_compute(key, compute)
        if progress:
            state = "cached" if hit else f"computed in {time.perf_counter() - started:.0f}s"
            print(f"  {label}: {len(array)} x {array.shape[1:]} ({state})", flush=True)
        results.append(array)
    return results
