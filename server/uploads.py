"""Request bytes held by calls in flight: a budget taken at announcement, and upload timeouts.

A stream's header announces its size; the bytes are reserved from one server-wide budget then
(and a unary message's as it arrives), refused with ``Busy`` when the budget or the count of
uploads in progress is spent, and given back when the call ends. Memory itself grows only
with the bytes actually received (the upload is collected chunk by chunk), so a header that
announces 64 MiB and sends nothing costs a reservation, not 64 MiB, and only until its idle
timeout ends the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from server.config import UploadConfig
from server.errors import Busy, RequestTooLarge, UploadTimeout

T = TypeVar("T")


class Hold:
    """Bytes (and perhaps one upload slot) held for one call; ``release`` is idempotent."""

    def __init__(self, budget: UploadBudget, nbytes: int, upload: bool) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self.upload = upload
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._give_back(self)

    def end_upload(self) -> None:
        """The upload is received: free its upload slot, keep its bytes until ``release``."""
        if self.upload and not self._released:
            self.upload = False
            self._budget._uploads -= 1

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

    @property
    def config(self) -> UploadConfig:
        return self._config

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def uploads(self) -> int:
        return self._uploads

    def hold(self, nbytes: int, *, upload: bool) -> Hold:
        """Reserve ``nbytes`` (and an upload slot when ``upload``), or raise why not."""
        limit = self._config.max_buffered_bytes
        if nbytes > limit:
            raise RequestTooLarge(
                f"the request announces {nbytes} bytes, more than the server holds for all "
                f"requests together ({limit}, --max-buffered-bytes); send a smaller image"
            )
        if upload and self._uploads >= self._config.max_concurrent:
            raise Busy(
                f"{self._uploads} uploads are in progress, the most this server takes at once "
                "(--max-uploads); retry shortly"
            )
        if self._bytes + nbytes > limit:
            raise Busy(
                f"requests in flight hold {self._bytes} bytes; {nbytes} more would pass the "
                f"limit of {limit} (--max-buffered-bytes); retry shortly"
            )
        self._bytes += nbytes
        self._uploads += upload
        return Hold(self, nbytes, upload)

    def _give_back(self, hold: Hold) -> None:
        self._bytes -= hold.nbytes
        self._uploads -= hold.upload


async def timed(messages: AsyncIterator[T], config: UploadConfig) -> AsyncIterator[T]:
    """``messages`` with ``UploadTimeout`` when one takes longer than the idle timeout to come
    or all of them longer than the upload deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.deadline_s
    iterator = aiter(messages)
    while True:
        remaining = deadline - loop.time()
        idle = config.idle_timeout_s <= remaining
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the handler's
            # own cancellation when the read completes at the same moment (a client's cancel
            # ends the request stream and cancels the handler together).
            async with asyncio.timeout(max(0.0, min(config.idle_timeout_s, remaining))):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if idle:
                raise UploadTimeout(
                    f"no upload message for {config.idle_timeout_s:g} s (--upload-idle-timeout); "
                    "send the data chunks without pausing"
                ) from None
            raise UploadTimeout(
                f"the upload took longer than {config.deadline_s:g} s (--upload-deadline); "
                "send the image faster or a smaller one"
            ) from None
        yield message
