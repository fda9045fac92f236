"""Request bytes held by calls in flight: a budget taken at announcement, and upload timeouts.

A stream's header announces its size; the bytes are reserved from one server-wide budget then
(and a unary message's as it arrives), refused with ``Busy`` when the budget or the count of
uploads in progress is spent, and given back when the call ends. Memory itself grows only
with the bytes actually received (the upload is collected chunk by chunk), so a header that
announces 64 MiB and sends nothing costs a reservation, not 64 MiB, and only until its idle
timeout ends the call.

Uploads must also keep a minimum pace: after a grace of one idle timeout, an upload that has
averaged less than ``--upload-min-rate`` is ended, and while every upload slot is taken a new
upload takes the slot of the slowest one that is below that rate (``Pace``), so clients that
drip a byte at a time cannot hold the slots against everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from server.config import UploadConfig
from server.core.errors import Busy, RequestTooLarge, UploadTimeout

T = TypeVar("T")
# An upload younger than this is never taken over: its rate says nothing yet.
EVICTION_MIN_AGE_S = 1.0
# A minimum-rate end this close to the idle timeout or the deadline is reported as those.
RATE_SLACK_S = 0.1


class Pace:
    """How fast one upload arrives: bytes received since it began, for the minimum-rate rule.

    The reader reports what arrives (``add``); ``timed`` ends the upload when it falls behind
    ``min_rate`` after the grace, or at once when ``take_over`` gave its slot to another upload.
    """

    def __init__(self, min_rate: float, grace_s: float) -> None:
        self.min_rate = min_rate  # bytes/s; 0 = no minimum
        self.grace_s = grace_s
        self.started = asyncio.get_running_loop().time()
        self.received = 0
        self.taken_over = False
        self._wait: asyncio.Timeout | None = None  # the wait for the next message, if any

    def add(self, nbytes: int) -> None:
        self.received += nbytes

    def rate(self, now: float) -> float:
        """Bytes per second since the upload began."""
        return self.received / max(now - self.started, 1e-9)

    def due(self) -> float:
        """The loop time by which more bytes must have come (``inf`` without a minimum)."""
        if self.min_rate <= 0:
            return float("inf")
        return self.started + self.grace_s + self.received / self.min_rate

    def too_slow(self, now: float) -> bool:
        """Old enough to judge, and below the minimum rate: its slot may go to another."""
        age = now - self.started
        return self.min_rate > 0 and age >= EVICTION_MIN_AGE_S and self.rate(now) < self.min_rate

    def take_over(self) -> None:
        """End this upload now (its slot went to another upload)."""
        self.taken_over = True
        if self._wait is not None:
            self._wait.reschedule(asyncio.get_running_loop().time())


class Hold:
    """Bytes (and perhaps one upload slot) held for one call; ``release`` is idempotent."""

    def __init__(
        self, budget: UploadBudget, nbytes: int, upload: bool, pace: Pace | None = None
    ) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self.upload = upload
        self.pace = pace
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._give_back(self)

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more (a body without an announced size, parsed JSON), or raise
        ``Busy`` / ``RequestTooLarge`` as ``UploadBudget.hold`` does."""
        if nbytes > 0 and not self._released:
            self._budget._check(self.nbytes + nbytes, nbytes, upload=False)
            self._budget._bytes += nbytes
            self.nbytes += nbytes

    def end_upload(self) -> None:
        """The upload is received: free its upload slot, keep its bytes until ``release``."""
        if self.upload and not self._released:
            self.upload = False
            self._budget._end_upload(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class UploadBudget:
    """Caps request bytes held by all calls together and UpscaleStream uploads in progress.

    Used from the event loop only (no lock needed).
    """

    def __init__(self, config: UploadConfig) -> None:
        if config.max_concurrent < 1 or config.max_buffered_bytes < 1:
            raise ValueError(
                f"UploadConfig needs max_concurrent and max_buffered_bytes >= 1: {config}"
            )
        self._config = config
        self._bytes = 0
        self._uploads = 0
        self._active: set[Hold] = set()  # holds with an upload slot

    @property
    def config(self) -> UploadConfig:
        return self._config

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def uploads(self) -> int:
        return self._uploads

    def pace(self) -> Pace:
        """A pace for one upload under this budget's minimum rate (grace: the idle timeout)."""
        return Pace(self._config.min_rate_bytes_s, self._config.idle_timeout_s)

    def hold(self, nbytes: int, *, upload: bool, pace: Pace | None = None) -> Hold:
        """Reserve ``nbytes`` (and an upload slot when ``upload``), or raise why not.

        With every slot taken, an upload with a ``pace`` takes the slot of the slowest upload
        in progress that is below the minimum rate (that one ends with ``UploadTimeout``)."""
        if upload and self._uploads >= self._config.max_concurrent and pace is not None:
            self._take_over_slowest()
        self._check(nbytes, nbytes, upload)
        self._bytes += nbytes
        self._uploads += upload
        hold = Hold(self, nbytes, upload, pace)
        if upload:
            self._active.add(hold)
        return hold

    def _check(self, total: int, more: int, upload: bool) -> None:
        limit = self._config.max_buffered_bytes
        if total > limit:
            raise RequestTooLarge(
                f"the request needs {total} bytes, more than the server holds for all "
                f"requests together ({limit}, --max-buffered-bytes); send a smaller image"
            )
        if upload and self._uploads >= self._config.max_concurrent:
            raise Busy(
                f"{self._uploads} uploads are in progress, the most this server takes at once "
                "(--max-uploads); retry shortly"
            )
        if self._bytes + more > limit:
            raise Busy(
                f"requests in flight hold {self._bytes} bytes; {more} more would pass the "
                f"limit of {limit} (--max-buffered-bytes); retry shortly"
            )

    def _take_over_slowest(self) -> None:
        now = asyncio.get_running_loop().time()
        slow = [h for h in self._active if h.pace is not None and h.pace.too_slow(now)]
        if slow:
            victim = min(slow, key=lambda h: h.pace.rate(now) if h.pace else 0.0)
            assert victim.pace is not None
            victim.pace.take_over()
            victim.release()  # its bytes and slot are free now; its reader ends on its own

    def _end_upload(self, hold: Hold) -> None:
        self._uploads -= 1
        self._active.discard(hold)

    def _give_back(self, hold: Hold) -> None:
        self._bytes -= hold.nbytes
        if hold.upload:
            self._end_upload(hold)


async def timed(
    messages: AsyncIterator[T], config: UploadConfig, pace: Pace | None = None
) -> AsyncIterator[T]:
    """``messages`` with ``UploadTimeout`` when one takes longer than the idle timeout to come,
    all of them longer than the upload deadline, or (with a ``pace`` the caller feeds) the
    upload falls below the minimum rate or loses its slot to another upload."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.deadline_s
    iterator = aiter(messages)
    while True:
        now = loop.time()
        limits = {
            "idle": config.idle_timeout_s,
            "deadline": deadline - now,
            "rate": float("inf") if pace is None else pace.due() - now,
        }
        cause = "deadline" if limits["deadline"] < limits["idle"] else "idle"
        if limits["rate"] + RATE_SLACK_S < limits[cause]:  # a silent upload is idle, not slow
            cause = "rate"
        try:
            if pace is not None and pace.taken_over:
                raise TimeoutError
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the handler's
            # own cancellation when the read completes at the same moment (a client's cancel
            # ends the request stream and cancels the handler together).
            async with asyncio.timeout(max(0.0, limits[cause])) as wait:
                if pace is not None:
                    pace._wait = wait
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadTimeout(_timeout_message(cause, config, pace, loop.time())) from None
        finally:
            if pace is not None:
                pace._wait = None
        yield message


def _timeout_message(cause: str, config: UploadConfig, pace: Pace | None, now: float) -> str:
    if pace is not None and (pace.taken_over or cause == "rate"):
        seconds = now - pace.started
        taken = ", and another upload took its slot" if pace.taken_over else ""
        return (
            f"the upload sent {pace.received} bytes in {seconds:.1f} s, under the minimum of "
            f"{config.min_rate_bytes_s:g} bytes/s after the first {config.idle_timeout_s:g} s "
            f"(--upload-min-rate){taken}; send the image faster"
        )
    if cause == "idle":
        return (
            f"no upload message for {config.idle_timeout_s:g} s (--upload-idle-timeout); "
            "send the data chunks without pausing"
        )
    return (
        f"the upload took longer than {config.deadline_s:g} s (--upload-deadline); "
        "send the image faster or a smaller one"
    )
