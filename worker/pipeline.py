"""fetch (threads) -> decode -> micro-batch -> infer -> per-item results.

Downloads and decoding run in a bounded thread pool while the calling thread runs inference
(TensorFlow and Pillow release the GIL), with a bounded look-ahead window so memory stays flat
however many keys a job holds. Results come back in input order. :meth:`Pipeline.prefetch`
starts the photos of the *next* batch (at most one window of them) while this one is still
classified; :meth:`Pipeline.classify` then takes them instead of fetching them again.

Per-item outcomes that retrying cannot change (the key does not exist, access denied, a bad
image) are ``error`` items. Anything else (throttling, 5xx and connection errors that boto3's
own retries did not absorb) raises :class:`TransientError`: the message is then left in the
queue and retried, never recorded as a failed photo.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from botocore.exceptions import ClientError

from worker import images
from worker.classifier import Classifier
from worker.decode_budget import DecodeBudget
from worker.manifests import ItemResult, TopK
from worker.messages import ImageRef

PERMANENT_S3_ERRORS = {
    "NoSuchKey": "not_found", "404": "not_found", "NotFound": "not_found", "NoSuchVersion": "not_found",
    "AccessDenied": "access_denied", "403": "access_denied", "Forbidden": "access_denied",
    "NoSuchBucket": "no_such_bucket", "InvalidObjectState": "invalid_object_state",
}


class TransientError(Exception):
    """A fault worth retrying the whole message for (after boto3's own retries)."""


@dataclass(frozen=True)
class PipelineSettings:
    batch_size: int = 16
    download_threads: int = 8
    top_k: int = 5
    limits: images.DecodeLimits = field(default_factory=images.DecodeLimits)
    #: pixels decoded at once by all threads together (None: limits.max_pixels, room for one
    #: photo of the largest size accepted); see worker.decode_budget
    decode_budget_pixels: int | None = None

    @property
    def window(self) -> int:
        """Photos fetched ahead of inference."""
        return max(2 * self.batch_size, self.download_threads * 2)


@dataclass
class Fetched:
    ref: ImageRef
    pixels: np.ndarray | None
    etag: str | None
    version_id: str | None
    error: tuple[str, str] | None
    timings_ms: dict[str, float]


class S3Reader:
    """Reads objects with a boto3 S3 client (retries: see worker.settings.BOTO_CONFIG)."""

    def __init__(self, s3):
        self.s3 = s3

    def read(self, ref: ImageRef, max_bytes: int) -> tuple[bytes, str | None, str | None]:
        kwargs = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            kwargs["VersionId"] = ref.version_id
        try:
            response = self.s3.get_object(**kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in PERMANENT_S3_ERRORS:
                raise ItemError(PERMANENT_S3_ERRORS[code], f"S3 {code}: {error}") from error
            raise TransientError(f"s3://{ref.bucket}/{ref.key}: {error}") from error
        except Exception as error:  # noqa: BLE001 - connection resets etc. after boto3's retries
            raise TransientError(f"s3://{ref.bucket}/{ref.key}: {type(error).__name__}: {error}") from error
        etag = (response.get("ETag") or "").strip('"') or ref.etag
        version_id = response.get("VersionId") or ref.version_id
        if response.get("ContentLength", 0) > max_bytes:
            response["Body"].close()
            raise ItemError(images.TOO_MANY_BYTES, f"object is {response['ContentLength']} bytes, over the "
                                                   f"{max_bytes} byte limit")
        try:
            return response["Body"].read(), etag, version_id
        except Exception as error:  # noqa: BLE001 - a reset in the middle of the body
            raise TransientError(f"s3://{ref.bucket}/{ref.key}: {type(error).__name__}: {error}") from error


class LocalReader:
    """Reads photos from a local folder: ``ref.bucket`` is the folder, ``ref.key`` the relative path."""

    def read(self, ref: ImageRef, max_bytes: int) -> tuple[bytes, str | None, str | None]:
        path = Path(ref.bucket) / ref.key
        try:
            with open(path, "rb") as f:
                return f.read(max_bytes + 1), None, None
        except FileNotFoundError as error:
            raise ItemError("not_found", str(error)) from error
        except PermissionError as error:
            raise ItemError("access_denied", str(error)) from error
        except OSError as error:
            raise ItemError("unreadable_file", str(error)) from error


class ItemError(Exception):
    """A permanent per-photo problem: recorded in the manifest as an ``error`` item."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def fetch_and_decode(reader, ref: ImageRef, size: tuple[int, int], limits: images.DecodeLimits,
                     fit: str = images.DEFAULT_FIT, budget: DecodeBudget | None = None) -> Fetched:
    """Read one photo and decode it (holding its pixels of ``budget`` while it decodes); permanent
    problems become an item error, transient ones raise TransientError; MemoryError propagates."""
    started = time.perf_counter()
    etag, version_id = ref.etag, ref.version_id
    try:
        data, etag, version_id = reader.read(ref, limits.max_bytes)
    except ItemError as error:
        return Fetched(ref, None, etag, version_id, (error.code, error.message), {"download": _ms(started)})
    downloaded = time.perf_counter()
    try:
        pixels, error = images.load_image(data, size=size, fit=fit, limits=limits, budget=budget), None
    except images.ImageDecodeError as decode_error:
        pixels, error = None, (decode_error.code, decode_error.message)
    return Fetched(ref, pixels, etag, version_id, error,
                   {"download": _ms(started, downloaded), "decode": _ms(downloaded)})


def _ms(start: float, end: float | None = None) -> float:
    return round(((end or time.perf_counter()) - start) * 1000, 3)


class Pipeline:
    """Classify S3 objects with a loaded model; one instance per process (the model is loaded once)."""

    def __init__(self, classifier: Classifier, s3, settings: PipelineSettings = PipelineSettings(), reader=None):
        self.classifier = classifier
        self.s3 = s3
        self.settings = settings
        self.reader = reader or S3Reader(s3)
        self.decode_budget = DecodeBudget(settings.decode_budget_pixels or settings.limits.max_pixels)
        self._executor = ThreadPoolExecutor(settings.download_threads, thread_name_prefix="fetch")
        self._ahead: dict[ImageRef, Future] = {}  # photos prefetched for a later classify()
        self._ahead_lock = threading.Lock()

    def close(self) -> None:
        self.discard_prefetched()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _submit(self, ref: ImageRef) -> Future:
        size, fit, limits = self.classifier.input_size, self.classifier.input_fit, self.settings.limits
        return self._executor.submit(fetch_and_decode, self.reader, ref, size, limits, fit, self.decode_budget)

    def prefetch(self, refs: Sequence[ImageRef]) -> int:
        """Start fetching and decoding photos a later :meth:`classify` call will ask for (at most
        one look-ahead window held at a time); returns how many were started."""
        started = 0
        with self._ahead_lock:
            for ref in refs:
                if len(self._ahead) >= self.settings.window:
                    break
                if ref not in self._ahead:
                    self._ahead[ref] = self._submit(ref)
                    started += 1
        return started

    def discard_prefetched(self, refs: Iterable[ImageRef] | None = None) -> None:
        """Forget prefetched photos (all, or those of ``refs``) that no classify() will take."""
        with self._ahead_lock:
            for ref in list(self._ahead) if refs is None else refs:
                future = self._ahead.pop(ref, None)
                if future is not None:
                    future.cancel()

    def _take_prefetched(self, ref: ImageRef) -> Future | None:
        with self._ahead_lock:
            return self._ahead.pop(ref, None)

    def classify(self, refs: Sequence[ImageRef], progress=None) -> list[ItemResult]:
        """One result per ref, in order. Raises TransientError when a fetch must be retried.
        ``progress(n)`` is called as photos are read. Photos of ``refs`` prefetched but not taken
        (the call failed half way) are dropped: a retry fetches them afresh."""
        results: list[ItemResult] = []
        batch: list[Fetched] = []
        try:
            for fetched in self._fetched(refs):
                if progress:
                    progress(1)
                if fetched.error:
                    code, message = fetched.error
                    results.append(ItemResult.failure(fetched.ref.bucket, fetched.ref.key, error_code=code,
                                                      error_message=message, etag=fetched.etag,
                                                      version_id=fetched.version_id, timings_ms=fetched.timings_ms))
                    continue
                batch.append(fetched)
                if len(batch) >= self.settings.batch_size:
                    results += self._infer(batch)
                    batch = []
            results += self._infer(batch)
        finally:
            self.discard_prefetched(refs)
        return _reorder(results, refs)

    def _fetched(self, refs: Iterable[ImageRef]):
        """Fetch with a bounded look-ahead (taking prefetched photos); yields in input order."""
        pending: deque[Future] = deque()
        iterator = iter(refs)
        try:
            for ref in iterator:
                pending.append(self._take_prefetched(ref) or self._submit(ref))
                if len(pending) >= self.settings.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def _infer(self, batch: list[Fetched]) -> list[ItemResult]:
        if not batch:
            return []
        started = time.perf_counter()
        tops = self.classifier.classify(np.stack([f.pixels for f in batch]))
        per_item = _ms(started) / len(batch)
        return [
            ItemResult.success(f.ref.bucket, f.ref.key, breed=top[0].breed, synset=top[0].synset, score=top[0].score,
                               top_k=[TopK(t.synset, t.breed, t.score) for t in top], etag=f.etag,
                               version_id=f.version_id, timings_ms={**f.timings_ms, "infer": round(per_item, 3)})
            for f, top in zip(batch, tops)
        ]


def _reorder(results: list[ItemResult], refs: Sequence[ImageRef]) -> list[ItemResult]:
    """Errors are emitted as they are found, successes per batch: put them back in ref order."""
    position = {(r.bucket, r.key, r.version_id or ""): i for i, r in enumerate(refs)}
    return sorted(results, key=lambda item: position.get((item.bucket, item.key, item.version_id or ""),
                                                         position.get((item.bucket, item.key, ""), len(refs))))
