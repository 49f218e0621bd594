"""When to stop taking new work: a :class:`Deadline` the batch loop consults before each new
piece of work (a prefix listing, a page of continuation messages, a photo read, a micro-batch
inference).

A Lambda invocation has a hard end (``context.get_remaining_time_in_millis()``); the worker stops
starting work ``safety_ms`` before it, so what was started can finish and the manifests of the
messages already answered can be written before the function is killed. Messages that were not
finished are then reported as failures (retried), never half-written. A poller has no deadline
(``None`` everywhere means "never").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: Default DOGBREEDS_LAMBDA_SAFETY_MS: the time the worker keeps in hand at the end of an
#: invocation. What can still run after the last check: one micro-batch inference (16 photos of
#: TF fp32 on 2 vCPUs, ~2.2 s; OpenVINO int8 ~0.6 s), one S3 LIST page or one SQS send with
#: boto3's retries (~1 s typically), then the manifest PUTs of up to 10 messages (8 at a time,
#: ~0.1-0.5 s) and Lambda's own response. 10 s covers that with room for a slow request.
DEFAULT_SAFETY_MS = 10_000


class DeadlineReached(Exception):
    """Raised inside the batch loop when the deadline stops it; never escapes worker.jobs."""


@dataclass(frozen=True)
class Deadline:
    """``remaining_ms()``: milliseconds until the hard end; work stops ``safety_ms`` before it."""

    remaining_ms: Callable[[], float]
    safety_ms: float = DEFAULT_SAFETY_MS

    @classmethod
    def of_lambda(cls, context, safety_ms: float = DEFAULT_SAFETY_MS) -> "Deadline | None":
        """The deadline of a Lambda invocation (None without a context, e.g. a local call)."""
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        return None if remaining is None else cls(remaining, safety_ms)

    def seconds_left(self) -> float:
        """Seconds until work must stop (<= 0: stop now)."""
        return (self.remaining_ms() - self.safety_ms) / 1000.0

    def expired(self) -> bool:
        return self.seconds_left() <= 0

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineReached` if ``what`` must not start."""
        if self.expired():
            raise DeadlineReached(f"deadline: {what} not started, {self.remaining_ms():.0f} ms left "
                                  f"(safety margin {self.safety_ms:.0f} ms)")


def expired(deadline: Deadline | None) -> bool:
    return deadline is not None and deadline.expired()


def check(deadline: Deadline | None, what: str) -> None:
    if deadline is not None:
        deadline.check(what)


def seconds_left(deadline: Deadline | None) -> float | None:
    """A timeout for a wait (None: wait as long as it takes)."""
    return None if deadline is None else max(0.0, deadline.seconds_left())
