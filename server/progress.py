"""Tiles done of one request, followed by whoever reports them (UpscaleStream's Progress).

The batcher calls ``update`` on the event loop as batches complete; ``follow`` yields the
latest (done, total) each time it changed, merging the updates that arrive while the consumer
is busy sending the previous one, so a slow client gets fewer messages, never a backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class TileProgress:
    """(done, total) of one request's tiles; one consumer follows it."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0
        self._changed = asyncio.Event()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self._changed.set()

    async def follow(self, work: asyncio.Future[object]) -> AsyncIterator[tuple[int, int]]:
        """(done, total) at each change, until ``work`` ends (the last change included)."""
        while True:
            if not self._changed.is_set() and not work.done():
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait([changed, work], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
            if self._changed.is_set():
                self._changed.clear()
                yield self.done, self.total
            elif work.done():
                return
