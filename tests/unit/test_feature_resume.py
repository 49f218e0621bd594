"""trainer.features: an interrupted feature extraction resumes from its checkpoint instead of
starting over (VGG16 at 320 px runs at a few photos per second on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import features


class Interrupted(RuntimeError):
    pass


class Counting:
    """An extractor (photo -> its pixels + 1, flattened) that counts the photos it saw and
    raises once ``fail_after`` have been seen (an interruption)."""

    def __init__(self, fail_after: int | None = None):
        self.seen, self.fail_after = 0, fail_after

    def _count(self, batch):
        self.seen += int(batch.shape[0])
        if self.fail_after is not None and self.seen > self.fail_after:
            raise Interrupted()
        return np.reshape(batch.numpy() + 1.0, (batch.shape[0], -1)).astype(np.float32)

    def __call__(self, x, training=False):
        import tensorflow as tf

        out = tf.py_function(self._count, [x], tf.float32)
        out.set_shape([None, 12])
        return out


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path):
    pixels = np.arange(40 * 12, dtype=np.uint8).reshape(40, 2, 2, 3)
    checkpoint = tmp_path / "partial" / "k.npy"
    model = Counting(fail_after=20)
    with pytest.raises(Exception):  # noqa: B017 - TensorFlow wraps the py_function's error
        features.run_extractor(model, pixels, batch_size=4, progress=False, checkpoint=checkpoint, checkpoint_every=2)
    assert np.load(checkpoint).shape == (16, 12)  # every second batch of 4 was saved: 16 rows of the 20 done

    model = layer = Counting()
    out = features.run_extractor(model, pixels, batch_size=4, progress=False, checkpoint=checkpoint, checkpoint_every=2)
    assert layer.seen == 40 - 16  # only the rest was computed
    np.testing.assert_array_equal(out, pixels.reshape(40, 12).astype(np.float16) + 1)
    assert not checkpoint.exists()  # done: the checkpoint is removed


def test_a_cache_miss_names_its_checkpoint_after_the_key(tmp_path):
    cache = features.FeatureCache(tmp_path)
    a = features.FeatureKey("p1", "vgg16", "w", "vgg", "block4_pool", 0, 0)
    b = features.FeatureKey("p2", "vgg16", "w", "vgg", "block4_pool", 0, 0)
    assert cache.partial(a) != cache.partial(b) and cache.partial(a).parent != tmp_path
    # keys without ``via`` keep the digest they had before the field existed
    assert a.digest() != features.FeatureKey("p1", "vgg16", "w", "vgg", "block4_pool", 0, 0, via="x").digest()
