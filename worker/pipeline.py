"""fetch (threads) -> decode -> micro-batch -> infer -> one answer per request.

A :class:`PhotoRequest` is one photo one message asks for, at one position of that message;
every :class:`Answer` carries the request it answers, so results go back to their message by
who asked, never by position in a list. The requests of a whole batch of messages are
classified together (micro-batches cross message boundaries) and each object is read once per
call however many requests name it: requests are grouped by what is read (bucket, key, version,
and the ETag condition of an S3 event), the photo is fetched, decoded and inferred once and
every request of the group gets its own answer.

Downloads and decoding run in a bounded thread pool while the calling thread runs inference
(TensorFlow and Pillow release the GIL), with a bounded look-ahead window so memory stays flat
however many keys a job holds. :meth:`Pipeline.prefetch` starts the photos of the *next* batch
(at most one window of them) while this one is still classified; :meth:`Pipeline.answer` then
takes them instead of fetching them again.

What a request gets, photo by photo (one photo's fault never touches another photo's answer):

* an ``ok`` item;
* an ``error`` item for what retrying cannot change: the key does not exist, access denied, a
  bad image (the codes of :mod:`worker.images`), ``changed`` (an S3 event's object was
  overwritten: the bytes it named are gone, see :class:`S3Reader`), ``internal_error`` (an
  unexpected exception while reading or decoding this one photo: a bug, logged with its
  traceback, recorded instead of retried for ever);
* a *failure* (``Answer.failure``) for what a later try may change: throttling, 5xx and
  connection errors that boto3's own retries did not absorb, ``MemoryError`` while decoding,
  an inference that fails for this photo alone too (a micro-batch whose inference raises is
  retried photo by photo, once). A failure is never written as an item: the messages naming
  the photo are left in the queue and retried.

With a :class:`~worker.deadline.Deadline` (a Lambda invocation), :meth:`Pipeline.answer` starts
no new read and no new micro-batch once the deadline is reached, and waits for a read in flight
no longer than the deadline: every request not answered by then gets a ``deadline`` failure (its
message is retried). Requests are worked through in order, so the messages named first finish
first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from botocore.exceptions import ClientError

from worker import images
from worker.classifier import Classifier
from worker.deadline import Deadline, DeadlineReached, check, expired, seconds_left
from worker.decode_budget import DecodeBudget
from worker.manifests import ItemResult, TopK
from worker.messages import ImageRef
from worker.observability import logger as log

PERMANENT_S3_ERRORS = {
    "NoSuchKey": "not_found", "404": "not_found", "NotFound": "not_found", "NoSuchVersion": "not_found",
    "AccessDenied": "access_denied", "403": "access_denied", "Forbidden": "access_denied",
    "NoSuchBucket": "no_such_bucket", "InvalidObjectState": "invalid_object_state",
}


CHANGED = "changed"  # an S3 event's object was overwritten after the event: its bytes are gone
INTERNAL_ERROR = "internal_error"  # an unexpected exception while reading or decoding one photo


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


@dataclass(frozen=True)
class PhotoRequest:
    """One photo one message asks for: its answer goes back to ``message_id`` at ``position``.

    ``exact``: the message names this exact object (an S3 event: its ``version_id``, else its
    ``etag``), read that or report ``changed``; otherwise (a job's keys, a listed prefix) the
    object is read as it is when read and the manifest records the ETag/version read."""

    message_id: str
    position: int
    ref: ImageRef
    exact: bool = False

    def accepts(self, etag: str | None) -> bool:
        """Whether bytes read with ``etag`` are the object this request names."""
        if not self.exact or self.ref.version_id or not self.ref.etag or etag is None:
            return True
        return etag == self.ref.etag


@dataclass(frozen=True)
class Answer:
    """What one request gets: an ``item`` for its message's manifest, or a ``failure`` (why the
    message must be retried later); exactly one of them is set."""

    request: PhotoRequest
    item: ItemResult | None = None
    failure: str | None = None


@dataclass
class Fetched:
    ref: ImageRef  # what was read (see read_of)
    pixels: np.ndarray | None
    etag: str | None  # of the bytes read; None when nothing was read
    version_id: str | None
    error: tuple[str, str] | None  # (code, message): a permanent per-photo error
    timings_ms: dict[str, float]
    failure: str | None = None  # a fault worth retrying the messages for (transient, memory)


def read_of(requests: Sequence[PhotoRequest]) -> ImageRef:
    """What to read for requests naming one (bucket, key, version): a version when they name
    one; else the ETag they all name as a condition (``IfMatch``) when every request is exact
    and names the same one; else the object as it is (each exact request then checks the ETag
    read, :meth:`PhotoRequest.accepts`)."""
    first = requests[0].ref
    if first.version_id:
        return ImageRef(first.bucket, first.key, version_id=first.version_id)
    conditions = {r.ref.etag if r.exact else None for r in requests}
    etag = conditions.pop() if len(conditions) == 1 else None
    return ImageRef(first.bucket, first.key, etag=etag)


def _photo_of(ref: ImageRef) -> tuple[str, str, str | None]:
    return (ref.bucket, ref.key, ref.version_id or None)


class S3Reader:
    """Reads objects with a boto3 S3 client (retries: see worker.settings.BOTO_CONFIG)."""

    def __init__(self, s3):
        self.s3 = s3

    def read(self, ref: ImageRef, max_bytes: int) -> tuple[bytes, str | None, str | None]:
        """``ref`` as :func:`read_of` builds it: ``version_id`` reads that version, else ``etag``
        (when set) is a condition (``IfMatch``): an object overwritten since is ``changed``."""
        kwargs = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            kwargs["VersionId"] = ref.version_id
        elif ref.etag:
            kwargs["IfMatch"] = f'"{ref.etag}"'
        try:
            response = self.s3.get_object(**kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                raise ItemError(CHANGED, f"s3://{ref.bucket}/{ref.key} is no longer the object its event named "
                                         f"(ETag {ref.etag}): overwritten since") from error
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
    """Read one photo and decode it (holding its pixels of ``budget`` while it decodes). Never
    raises (but for BaseExceptions such as KeyboardInterrupt): permanent problems are an item
    error, an unexpected exception is an ``internal_error`` item, transient faults and
    ``MemoryError`` a failure."""
    started = time.perf_counter()
    try:
        data, etag, version_id = reader.read(ref, limits.max_bytes)
    except ItemError as error:
        return Fetched(ref, None, None, None, (error.code, error.message), {"download": _ms(started)})
    except TransientError as error:
        return Fetched(ref, None, None, None, None, {"download": _ms(started)}, failure=f"transient: {error}")
    except MemoryError as error:
        return Fetched(ref, None, None, None, None, {"download": _ms(started)},
                       failure=f"memory: reading s3://{ref.bucket}/{ref.key}: MemoryError {error}")
    except Exception as error:  # noqa: BLE001 - a reader bug: this photo only
        log.exception("unexpected error reading a photo", extra={"bucket": ref.bucket, "key": ref.key})
        return Fetched(ref, None, None, None, (INTERNAL_ERROR, f"reading: {type(error).__name__}: {error}"),
                       {"download": _ms(started)})
    downloaded = time.perf_counter()
    pixels, error, failure = None, None, None
    try:
        pixels = images.load_image(data, size=size, fit=fit, limits=limits, budget=budget)
    except images.ImageDecodeError as decode_error:
        error = (decode_error.code, decode_error.message)
    except MemoryError as memory_error:  # not this photo's fault alone: retry its messages
        failure = f"memory: decoding s3://{ref.bucket}/{ref.key}: MemoryError {memory_error}"
    except Exception as bug:  # noqa: BLE001 - a decoding bug: this photo only, recorded
        log.exception("unexpected error decoding a photo", extra={"bucket": ref.bucket, "key": ref.key})
        error = (INTERNAL_ERROR, f"decoding: {type(bug).__name__}: {bug}")
    finally:
        del data
    return Fetched(ref, pixels, etag, version_id, error,
                   {"download": _ms(started, downloaded), "decode": _ms(downloaded)}, failure)


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
        self._ahead: dict[ImageRef, Future] = {}  # photos prefetched for a later answer(), by read_of()
        self._ahead_lock = threading.Lock()

    def close(self) -> None:
        self.discard_prefetched()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _submit(self, read: ImageRef) -> Future:
        size, fit, limits = self.classifier.input_size, self.classifier.input_fit, self.settings.limits
        return self._executor.submit(fetch_and_decode, self.reader, read, size, limits, fit, self.decode_budget)

    def prefetch(self, requests: Sequence[PhotoRequest]) -> int:
        """Start fetching and decoding the photos a later :meth:`answer` call will ask for (at
        most one look-ahead window held at a time); returns how many were started."""
        started = 0
        with self._ahead_lock:
            for read in _group(requests):
                if len(self._ahead) >= self.settings.window:
                    break
                if read not in self._ahead:
                    self._ahead[read] = self._submit(read)
                    started += 1
        return started

    def discard_prefetched(self, reads: Iterable[ImageRef] | None = None) -> None:
        """Forget prefetched photos (all, or those of ``reads``) that no answer() will take."""
        with self._ahead_lock:
            for read in list(self._ahead) if reads is None else reads:
                future = self._ahead.pop(read, None)
                if future is not None:
                    future.cancel()

    def _take_prefetched(self, read: ImageRef) -> Future | None:
        with self._ahead_lock:
            return self._ahead.pop(read, None)

    def answer(self, requests: Sequence[PhotoRequest], progress=None, deadline: Deadline | None = None
               ) -> list[Answer]:
        """One :class:`Answer` per request (in no particular order: each carries its request).
        Each object is read, decoded and inferred once however many requests name it.
        ``progress(n)`` is called as photos are read. Prefetched photos of ``requests`` not taken
        (an exception half way) are dropped: a retry fetches them afresh. Once ``deadline`` is
        reached no new read or inference starts: the requests not answered yet get a
        ``deadline`` failure."""
        groups = _group(requests)
        answers: list[Answer] = []
        batch: list[tuple[Fetched, list[PhotoRequest]]] = []
        try:
            try:
                for fetched in self._fetched(list(groups), deadline):
                    group = groups[fetched.ref]
                    if progress:
                        progress(len(group))
                    answers += self._settle_read(fetched, group)
                    accepted = [r for r in group if r.accepts(fetched.etag)]
                    if fetched.failure or fetched.error or not accepted:
                        answers += [_unread_answer(r, fetched) for r in accepted]
                        continue
                    batch.append((fetched, accepted))
                    if len(batch) >= self.settings.batch_size:
                        check(deadline, "a micro-batch inference")
                        answers += self._infer(batch, deadline=deadline)
                        batch = []
                if batch:
                    check(deadline, "a micro-batch inference")
                    answers += self._infer(batch, deadline=deadline)
            except DeadlineReached as stop:
                answered = {a.request for a in answers}
                unanswered = [r for r in requests if r not in answered]
                log.info("deadline reached: photos left for a retry", extra={"photos": len(unanswered),
                                                                            "reason": str(stop)})
                answers += [Answer(r, failure=str(stop)) for r in unanswered]
        finally:
            self.discard_prefetched(groups)
        return answers

    def classify(self, refs: Sequence[ImageRef], progress=None) -> list[ItemResult]:
        """One item per ref, in order (a folder or prefix classified without a queue). Raises
        TransientError when a photo must be retried."""
        answers = self.answer([PhotoRequest("", i, ref) for i, ref in enumerate(refs)], progress=progress)
        failed = [a.failure for a in answers if a.failure]
        if failed:
            raise TransientError(f"{len(failed)} photo(s) to retry, first: {failed[0]}")
        return [a.item for a in sorted(answers, key=lambda a: a.request.position)]

    def _settle_read(self, fetched: Fetched, group: list[PhotoRequest]) -> list[Answer]:
        """Answers for the exact requests whose object the bytes read are not: ``changed``."""
        return [Answer(r, ItemResult.failure(
                    r.ref.bucket, r.ref.key, error_code=CHANGED, etag=r.ref.etag, version_id=r.ref.version_id,
                    error_message=f"the object was overwritten after its event (event ETag {r.ref.etag}, "
                                  f"now {fetched.etag})", timings_ms=fetched.timings_ms))
                for r in group if not r.accepts(fetched.etag)]

    def _fetched(self, reads: Sequence[ImageRef], deadline: Deadline | None = None):
        """Fetch with a bounded look-ahead (taking prefetched photos); yields in input order.
        Raises DeadlineReached before a new read once the deadline is reached, and when a read
        in flight is not back by then."""
        pending: deque[Future] = deque()
        iterator = iter(reads)
        try:
            for read in iterator:
                check(deadline, "a photo read")
                pending.append(self._take_prefetched(read) or self._submit(read))
                if len(pending) >= self.settings.window:
                    yield _result(pending.popleft(), deadline)
            while pending:
                yield _result(pending.popleft(), deadline)
        finally:
            for future in pending:
                future.cancel()

    def _infer(self, batch: list[tuple[Fetched, list[PhotoRequest]]], retry: bool = True,
               deadline: Deadline | None = None) -> list[Answer]:
        """Infer a micro-batch; if that raises, each photo once more alone (while the deadline
        allows); a photo whose inference fails alone too fails the messages naming it (a
        retry), never an item: its pixels decoded fine."""
        if not batch:
            return []
        started = time.perf_counter()
        try:
            predictions = self.classifier.predict(np.stack([f.pixels for f, _ in batch]))
            if len(predictions) != len(batch):
                raise RuntimeError(f"the model answered {len(predictions)} photos of {len(batch)}")
        except Exception as error:  # noqa: BLE001 - MemoryError and runtime errors included
            if retry:
                log.warning("inference failed: retrying photo by photo",
                            extra={"photos": len(batch), "reason": f"{type(error).__name__}: {error}"})
                answers = []
                for one in batch:
                    if expired(deadline):
                        answers += [Answer(r, failure="deadline: inference not retried photo by photo")
                                    for r in one[1]]
                    else:
                        answers += self._infer([one], retry=False)
                return answers
            fetched, group = batch[0]
            log.warning("inference of one photo failed: its messages will be retried",
                        extra={"bucket": fetched.ref.bucket, "key": fetched.ref.key,
                               "reason": f"{type(error).__name__}: {error}"})
            return [Answer(r, failure=f"infer: {type(error).__name__}: {error}") for r in group]
        per_item = _ms(started) / len(batch)
        return [
            Answer(r, ItemResult.classified(
                r.ref.bucket, r.ref.key, status=p.status, dog_score=p.dog_score,
                top_k=[TopK(t.synset, t.breed, t.score) for t in p.top_k], etag=f.etag, version_id=f.version_id,
                timings_ms={**f.timings_ms, "infer": round(per_item, 3)}))
            for (f, group), p in zip(batch, predictions) for r in group
        ]


def _group(requests: Iterable[PhotoRequest]) -> dict[ImageRef, list[PhotoRequest]]:
    """Requests by what is read for them (:func:`read_of`), in order of first appearance."""
    by_photo: dict[tuple, list[PhotoRequest]] = {}
    for request in requests:
        by_photo.setdefault(_photo_of(request.ref), []).append(request)
    return {read_of(group): group for group in by_photo.values()}


def _result(future: Future, deadline: Deadline | None) -> Fetched:
    """A read's result, waiting no longer than the deadline allows."""
    try:
        return future.result(timeout=seconds_left(deadline))
    except FutureTimeout:
        future.cancel()
        raise DeadlineReached("deadline: a photo read still in flight") from None


def _unread_answer(request: PhotoRequest, fetched: Fetched) -> Answer:
    """The answer of a request whose photo was not classified: a failure, or an error item."""
    if fetched.failure:
        return Answer(request, failure=fetched.failure)
    code, message = fetched.error
    return Answer(request, ItemResult.failure(
        request.ref.bucket, request.ref.key, error_code=code, error_message=message,
        etag=fetched.etag or request.ref.etag, version_id=fetched.version_id or request.ref.version_id,
        timings_ms=fetched.timings_ms))
