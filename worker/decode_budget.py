"""A pixel budget shared by concurrent photo decodes.

A thread count alone does not bound decoding memory: eight threads decoding eight 64-megapixel
PNGs need eight times the memory of one. :class:`DecodeBudget` bounds the *pixels* being decoded
at once instead. A decode reserves ``width * height`` (read from the image header, before any
pixel is decoded) and gives it back when it is done:

    with budget.reserve(width * height):
        ...decode...

Reservations are granted in arrival order (first come, first served), so a large photo is never
starved by a stream of small ones. A photo larger than the whole budget is not refused: it waits
until nothing else is being decoded and then runs alone (exclusive use), so the budget bounds
memory to ``max(capacity, largest photo)`` pixels in flight and never fails a photo.

Memory per reserved pixel depends on the format (see ``worker.images``): about 4 bytes for the
decoded image in Pillow (RGB and RGBA both use 4 bytes per pixel), plus the converted copy where a
conversion is needed, so one reserved pixel costs at most ~8 bytes while it is decoded.

Freed is not returned: glibc's malloc keeps what a thread frees in that thread's arena, and its
dynamic mmap threshold soon serves Pillow's 16 MB image blocks from those arenas too. Eight
download threads decoding 64-megapixel photos one after the other then each keep ~500 MB, and the
worker's RSS grows to several GB although no two decodes ever overlapped (measured: 2.1-2.6 GB for
16 worst-case photos, against 0.8 GB with the memory given back). So, before a reservation of at
least ``release_memory_from`` pixels is given back, the decode's freed memory is handed back to
the operating system (:func:`give_back_free_memory`, glibc's ``malloc_trim``; ~0.2 ms when there
is little to return, ~0.5 s after a 64-megapixel decode on a loaded 2-core machine).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["DecodeBudget", "give_back_free_memory"]

#: Reservations from this size on hand their freed memory back to the OS when they end (a
#: 1-megapixel decode frees ~8 MB; smaller ones are not worth a call).
RELEASE_MEMORY_FROM = 1 << 20


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl, macOS, Windows
    except (AttributeError, OSError):
        return None


def give_back_free_memory() -> bool:
    """Return the memory the C allocator holds free (all threads' arenas) to the operating
    system; False where the C library has no ``malloc_trim`` (nothing is done there)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class DecodeBudget:
    """At most ``capacity`` pixels decoded at once (a photo larger than that runs alone).

    ``release_memory`` (default :func:`give_back_free_memory`; None: never) is called at the end
    of each reservation of at least ``release_memory_from`` pixels, before its pixels are given
    back. ``on_wait(pixels)``, when given, is called (with the budget's lock held, so it must not
    block) by each reservation that is about to wait; tests use it to know, without sleeping,
    that a thread is blocked.
    """

    def __init__(self, capacity: int, *, on_wait: Callable[[int], None] | None = None,
                 release_memory: Callable[[], object] | None = give_back_free_memory,
                 release_memory_from: int = RELEASE_MEMORY_FROM):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"DecodeBudget capacity must be a positive int of pixels, got {capacity!r}")
        self.capacity = capacity
        self._on_wait = on_wait
        self._release_memory = release_memory
        self._release_memory_from = release_memory_from
        self._condition = threading.Condition()  # an RLock: on_wait may read in_use / waiting
        self._in_use = 0
        self._holders = 0
        self._queue: deque[int] = deque()  # tickets of waiting reservations, in arrival order
        self._tickets = itertools.count()

    @property
    def in_use(self) -> int:
        """Pixels reserved right now."""
        with self._condition:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn right now."""
        with self._condition:
            return len(self._queue)

    def _grantable(self, ticket: int, pixels: int) -> bool:
        if self._queue[0] != ticket:  # first come, first served
            return False
        return self._holders == 0 or self._in_use + pixels <= self.capacity

    def acquire(self, pixels: int) -> None:
        """Block until ``pixels`` may be decoded (see the class docstring), then reserve them."""
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ValueError(f"pixels must be a non-negative int, got {pixels!r}")
        with self._condition:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                if self._on_wait is not None and not self._grantable(ticket, pixels):
                    self._on_wait(pixels)  # called under the lock: it is sure to wait
                self._condition.wait_for(lambda: self._grantable(ticket, pixels))
            except BaseException:  # interrupted while waiting: leave the queue, let the next one in
                self._queue.remove(ticket)
                self._condition.notify_all()
                raise
            self._queue.popleft()
            self._in_use += pixels
            self._holders += 1
            self._condition.notify_all()  # the next in line may fit beside this one

    def release(self, pixels: int) -> None:
        with self._condition:
            if self._holders == 0 or pixels > self._in_use:
                raise RuntimeError(f"DecodeBudget.release({pixels}) without a matching reservation")
            self._in_use -= pixels
            self._holders -= 1
            self._condition.notify_all()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """``with budget.reserve(width * height):`` decode while holding the pixels (free the
        decode's images inside the block: its memory is handed back to the OS as it ends)."""
        self.acquire(pixels)
        try:
            yield
        finally:
            try:
                if self._release_memory is not None and pixels >= self._release_memory_from:
                    self._release_memory()
            finally:
                self.release(pixels)

    def __repr__(self) -> str:
        return f"DecodeBudget(capacity={self.capacity}, in_use={self.in_use}, waiting={self.waiting})"
