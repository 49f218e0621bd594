"""worker.decode_budget.DecodeBudget: concurrent decodes share a pixel budget. Events and
barriers only: no sleeps, no wall-clock assertions (a join timeout only guards against a hang)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.decode_budget import DecodeBudget

HANG = 20  # seconds before a blocked test is declared deadlocked (never reached when it passes)


class Threads:
    """What the test itself sees of each thread: running (on its way to the budget), blocked
    (in the budget's queue), holding its reservation, leaving (giving it back), or done; and
    every moment more was held than the budget allows."""

    def __init__(self, count: int):
        self.condition = threading.Condition()
        self.state = ["running"] * count
        self.sizes = [0] * count
        self.violations: list[str] = []

    def set(self, thread: int, state: str) -> None:
        with self.condition:
            self.state[thread] = state
            self.condition.notify_all()

    def hold_until_everyone_settled(self, thread: int, capacity: int) -> None:
        """Called while holding: wait until no thread is still on its way to the budget (each
        one holds, waits in the budget's queue, or is done), then check what is held at once.
        Without a working budget every thread ends up holding together here."""
        with self.condition:
            self.state[thread] = "holding"
            self.condition.notify_all()
            assert self.condition.wait_for(lambda: "running" not in self.state, HANG), "a thread never settled"
            held = [self.sizes[i] for i, s in enumerate(self.state) if s == "holding"]
            if len(held) > 1 and sum(held) > capacity:
                self.violations.append(f"{held} held at once, over {capacity}")


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 100), sizes=st.lists(st.integers(0, 150), min_size=1, max_size=10),
       rounds=st.integers(1, 3))
def test_concurrent_reservations_never_exceed_the_budget(capacity, sizes, rounds):
    """Each thread reserves its pixels, then, still holding them, waits until every other thread
    holds or is blocked by the budget, and records what is held at that moment: never more than
    the budget, except one photo over the whole budget held alone. All threads finish."""
    threads_seen = Threads(len(sizes))
    local = threading.local()
    budget = DecodeBudget(capacity, release_memory=None,
                          on_wait=lambda pixels: threads_seen.set(local.index, "blocked"))
    errors: list[BaseException] = []

    def decode(index: int, pixels: int) -> None:
        local.index = index
        threads_seen.sizes[index] = pixels
        try:
            for _ in range(rounds):
                with budget.reserve(pixels):
                    threads_seen.hold_until_everyone_settled(index, capacity)
                    assert budget.in_use <= max(capacity, pixels)
                    threads_seen.set(index, "leaving")  # no longer counted: it is giving its pixels back
                threads_seen.set(index, "running")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            threads_seen.set(index, "done")

    threads = [threading.Thread(target=decode, args=(i, s), daemon=True) for i, s in enumerate(sizes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    assert not any(t.is_alive() for t in threads), "deadlock: a reservation never got its turn"
    assert not errors and not threads_seen.violations, (errors, threads_seen.violations)
    assert budget.in_use == 0 and budget.waiting == 0


def test_a_photo_over_the_budget_waits_then_runs_alone():
    waiting = {}
    queued = threading.Condition()

    def on_wait(pixels):
        with queued:
            waiting[pixels] = waiting.get(pixels, 0) + 1
            queued.notify_all()

    budget = DecodeBudget(100, on_wait=on_wait, release_memory=None)
    small = threading.Event()
    budget.acquire(30)  # a small decode in progress (held by the test thread)

    big_holds, big_may_finish, big_done = threading.Event(), threading.Event(), threading.Event()

    def big():
        with budget.reserve(250):  # more than the whole budget: not refused
            big_holds.set()
            big_may_finish.wait(HANG)
        big_done.set()

    threading.Thread(target=big, daemon=True).start()
    with queued:
        assert queued.wait_for(lambda: waiting.get(250), HANG), "the big photo did not wait for the small one"
    assert not big_holds.is_set()  # it cannot start beside the small decode
    budget.release(30)
    assert big_holds.wait(HANG), "the big photo never got exclusive use"
    assert budget.in_use == 250

    def another_small():
        with budget.reserve(1):
            small.set()

    thread = threading.Thread(target=another_small, daemon=True)
    thread.start()
    with queued:
        assert queued.wait_for(lambda: waiting.get(1), HANG), "a small decode started beside the big one"
    assert not small.is_set()
    big_may_finish.set()
    assert small.wait(HANG) and big_done.wait(HANG)
    thread.join(HANG)
    assert budget.in_use == 0


def test_first_come_first_served_a_big_photo_is_not_starved():
    """While a big photo waits for room, later small ones queue behind it instead of overtaking."""
    order: list[str] = []
    queued = threading.Semaphore(0)
    budget = DecodeBudget(100, on_wait=lambda pixels: queued.release())
    budget.acquire(60)

    def decode(name, pixels):
        with budget.reserve(pixels):
            order.append(name)

    big = threading.Thread(target=decode, args=("big", 80), daemon=True)  # daemon: a failure must not hang the exit
    big.start()
    assert queued.acquire(timeout=HANG)  # big waits: 60 + 80 > 100
    late = threading.Thread(target=decode, args=("small", 10), daemon=True)
    late.start()
    assert queued.acquire(timeout=HANG)  # small waits too, although 60 + 10 would fit
    budget.release(60)
    big.join(HANG)
    late.join(HANG)
    assert order == ["big", "small"]


def test_small_photos_share_the_budget():
    budget = DecodeBudget(100)
    inside = threading.Barrier(3)  # three 30-pixel decodes must be able to hold at once

    def decode():
        with budget.reserve(30):
            inside.wait(HANG)  # raises BrokenBarrierError if they cannot all be inside together

    threads = [threading.Thread(target=decode, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    assert not inside.broken and budget.in_use == 0


def test_invalid_use():
    with pytest.raises(ValueError):
        DecodeBudget(0)
    budget = DecodeBudget(10)
    with pytest.raises(ValueError):
        budget.acquire(-1)
    with pytest.raises(RuntimeError):
        budget.release(1)


def test_an_interrupted_wait_leaves_the_queue():
    """A reservation abandoned while it waits (an exception in that thread) must not block the
    ones queued behind it: it leaves the queue."""

    def on_wait(pixels):
        if pixels == 50:
            raise KeyboardInterrupt  # raised in the waiting thread, while it is first in line

    budget = DecodeBudget(60, on_wait=on_wait)
    budget.acquire(20)
    with pytest.raises(KeyboardInterrupt):
        budget.acquire(50)  # 20 + 50 > 60: it had to wait
    assert budget.waiting == 0 and budget.in_use == 20
    done = threading.Event()
    threading.Thread(target=lambda: (budget.acquire(30), done.set()), daemon=True).start()
    assert done.wait(HANG)  # 20 + 30 fits: granted, not stuck behind the abandoned one
    assert budget.in_use == 50


# --------------------------------------------------------------------------
# the worker's pipeline: one budget per Pipeline, shared by its decode threads
# --------------------------------------------------------------------------
def png_bytes(width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), (200, 30, 30), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class PhotoReader:
    """Photos by key: ``<width>x<height>-<n>.png`` (encoded when the reader is made)."""

    def __init__(self, keys):
        self.photos = {key: png_bytes(*(int(v) for v in key.split("-")[0].split("x"))) for key in keys}

    def read(self, ref, max_bytes):
        return self.photos[ref.key], None, None


def test_pipeline_decodes_share_its_budget(monkeypatch):
    from tests.unit.test_pipeline_prefetch import RedClassifier
    from worker import images
    from worker.messages import ImageRef
    from worker.pipeline import Pipeline, PipelineSettings

    default = Pipeline(RedClassifier(), s3=None, settings=PipelineSettings(download_threads=1), reader=PhotoReader([]))
    default.close()
    assert default.decode_budget.capacity == images.DEFAULT_MAX_PIXELS  # one photo of the largest accepted size

    seen, real = [], images.load_image

    def recording(data, **kw):
        seen.append(kw.get("budget"))
        return real(data, **kw)

    monkeypatch.setattr(images, "load_image", recording)
    keys = [f"100x100-{n}.png" for n in range(6)] + ["300x200-0.png"]  # the last one is over the budget
    pipeline = Pipeline(RedClassifier(), s3=None, reader=PhotoReader(keys),
                        settings=PipelineSettings(batch_size=4, download_threads=4, decode_budget_pixels=20_000))
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(results=pipeline.classify([ImageRef("photos", k) for k in keys])),
                           daemon=True)
    run.start()
    run.join(HANG)
    try:
        assert not run.is_alive(), "deadlock: the photo over the budget never got its turn"
    finally:
        if run.is_alive():  # free the stuck decode (test clean-up only), or the executor never shuts down
            with pipeline.decode_budget._condition:
                pipeline.decode_budget.capacity = 10**15
                pipeline.decode_budget._condition.notify_all()
            run.join(HANG)
        pipeline.close()
    results = outcome["results"]
    assert [r.status for r in results] == ["ok"] * 7  # the oversized photo waited its turn, not refused
    assert len(seen) == 7 and all(b is pipeline.decode_budget for b in seen)
    assert pipeline.decode_budget.capacity == 20_000 and pipeline.decode_budget.in_use == 0


def test_decode_budget_setting_from_the_environment():
    from worker.settings import WorkerEnvironment

    assert WorkerEnvironment.from_env({}).decode_budget_pixels is None
    assert WorkerEnvironment.from_env({"DOGBREEDS_DECODE_BUDGET_PIXELS": "128000000"}).decode_budget_pixels == 128_000_000


def test_fetch_and_decode_lets_memory_error_through(monkeypatch):
    """Running out of memory says nothing about the photo: never an ``error`` item, but a failure
    (the messages naming the photo are retried)."""
    from worker import images
    from worker.messages import ImageRef
    from worker.pipeline import fetch_and_decode

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    reader = PhotoReader(["50x50-0.png"])  # encoded before the decoder is broken
    fetched = fetch_and_decode(reader, ImageRef("photos", "50x50-0.png"), (32, 32), images.DecodeLimits())
    assert fetched.error is None and fetched.pixels.shape == (32, 32, 3)
    monkeypatch.setattr(images.Image.Image, "load", out_of_memory)
    monkeypatch.setattr(images.ImageFile.ImageFile, "load", out_of_memory)
    budget = DecodeBudget(10_000)
    fetched = fetch_and_decode(reader, ImageRef("photos", "50x50-0.png"), (32, 32), images.DecodeLimits(),
                               budget=budget)
    assert fetched.error is None and fetched.pixels is None
    assert fetched.failure is not None and "MemoryError" in fetched.failure
    assert budget.in_use == 0  # the reservation is given back


def test_large_reservations_hand_memory_back_before_their_pixels():
    """The budget returns freed memory to the OS at the end of each large reservation, while it
    still holds the pixels (so the next decode cannot start on top of memory not yet returned)."""
    calls = []
    budget = DecodeBudget(1_000, release_memory=lambda: calls.append(budget.in_use), release_memory_from=100)
    with budget.reserve(99):
        pass
    assert calls == []
    with budget.reserve(400):
        assert calls == []
    assert calls == [400] and budget.in_use == 0
    with pytest.raises(KeyError):
        with budget.reserve(100):
            raise KeyError("a failed decode")
    assert calls == [400, 100] and budget.in_use == 0


def test_give_back_free_memory_on_this_platform():
    import ctypes
    import sys

    from worker.decode_budget import give_back_free_memory

    has_trim = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")
    assert give_back_free_memory() is has_trim
