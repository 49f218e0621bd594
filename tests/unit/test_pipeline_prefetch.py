"""worker.pipeline.Pipeline.prefetch: photos fetched ahead are taken by classify(), never read
twice; a bounded number is held; discarded ones are forgotten."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from tests.conftest import colour_photo
from worker.classifier import BreedScore, Prediction
from worker.messages import ImageRef
from worker.pipeline import PhotoRequest, Pipeline, PipelineSettings, TransientError


class CountingReader:
    def __init__(self, failing: str | None = None):
        self.reads, self.lock, self.failing = Counter(), threading.Lock(), failing

    def read(self, ref, max_bytes):
        with self.lock:
            self.reads[ref.key] += 1
        if ref.key == self.failing:
            raise TransientError("throttled")
        return colour_photo((200, 30, 30), seed=int(ref.key.split(".")[0])), None, None


class RedClassifier:
    """Stands in for a model: the 'breed' says whether the photo is red, so results show real pixels came."""
    input_size, input_fit = (32, 32), "crop"
    model_info = {"name": "stub", "version": "v1", "runtime": "tf"}

    def classify(self, pixels):
        return [[BreedScore("n0", f"red-{int(np.mean(p[..., 0]) > 128)}", 1.0)] for p in pixels]

    def predict(self, pixels):  # what the pipeline calls: a verdict per photo
        return [Prediction("ok", top) for top in self.classify(pixels)]


def refs(keys):
    return [ImageRef("photos", f"{k}.jpg") for k in keys]


def requests(keys):
    return [PhotoRequest("m", i, ref) for i, ref in enumerate(refs(keys))]


def test_prefetched_photos_are_taken_not_read_again():
    reader = CountingReader()
    pipeline = Pipeline(RedClassifier(), s3=None, settings=PipelineSettings(batch_size=4, download_threads=2),
                        reader=reader)
    try:
        assert pipeline.prefetch(requests(range(6))) == 6
        assert pipeline.prefetch(requests(range(6))) == 0  # already under way
        results = pipeline.classify(refs(range(10)))
        assert [r.key for r in results] == [f"{k}.jpg" for k in range(10)]
        assert all(r.status == "ok" and r.breed == "red-1" for r in results)
        assert set(reader.reads.values()) == {1} and len(reader.reads) == 10  # each photo read once
        # at most one look-ahead window is held
        window = pipeline.settings.window
        assert pipeline.prefetch(requests(range(100, 100 + 3 * window))) == window
        pipeline.discard_prefetched()
        assert pipeline.prefetch(requests(range(200, 203))) == 3  # room again after discarding
        pipeline.discard_prefetched(refs(range(200, 203)))
        assert pipeline._ahead == {}
    finally:
        pipeline.close()


def test_a_failed_classify_drops_the_prefetched_photos_it_did_not_take():
    reader = CountingReader(failing="1.jpg")
    pipeline = Pipeline(RedClassifier(), s3=None, settings=PipelineSettings(batch_size=2, download_threads=1),
                        reader=reader)
    try:
        assert pipeline.prefetch(requests(range(4, 8))) == 4  # the photos classify() reaches after the failing one
        with pytest.raises(TransientError):
            pipeline.classify(refs(range(8)))
        assert pipeline._ahead == {}  # a retry fetches afresh; nothing holds a window slot
        assert pipeline.prefetch(requests(range(100, 100 + pipeline.settings.window))) == pipeline.settings.window
    finally:
        pipeline.close()
