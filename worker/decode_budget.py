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
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["DecodeBudget"]


class DecodeBudget:
    """At most ``capacity`` pixels decoded at once (a photo larger than that runs alone).

    ``on_wait(pixels)``, when given, is called (without the lock held) each time a reservation
    has to wait; tests use it to know, without sleeping, that a thread is blocked.
    """

    def __init__(self, capacity: int, *, on_wait: Callable[[int], None] | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"DecodeBudget capacity must be a positive int of pixels, got {capacity!r}")
        self.capacity = capacity
        self._on_wait = on_wait
        self._condition = threading.Condition()
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
            must_wait = not self._grantable(ticket, pixels)
        try:
            if must_wait and self._on_wait is not None:
                self._on_wait(pixels)
            with self._condition:
                self._condition.wait_for(lambda: self._grantable(ticket, pixels))
                self._queue.popleft()
                self._in_use += pixels
                self._holders += 1
                self._condition.notify_all()  # the next in line may fit beside this one
        except BaseException:  # interrupted while waiting: leave the queue, let the next one in
            with self._condition:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._condition.notify_all()
            raise

    def release(self, pixels: int) -> None:
        with self._condition:
            if self._holders == 0 or pixels > self._in_use:
                raise RuntimeError(f"DecodeBudget.release({pixels}) without a matching reservation")
            self._in_use -= pixels
            self._holders -= 1
            self._condition.notify_all()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """``with budget.reserve(width * height):`` decode while holding the pixels."""
        self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)

    def __repr__(self) -> str:
        return f"DecodeBudget(capacity={self.capacity}, in_use={self.in_use}, waiting={self.waiting})"
