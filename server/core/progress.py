"""Tiles done of one request, followed by whoever reports them (UpscaleStream's Progress).

The batcher calls ``update`` on the event loop as batches complete; ``follow`` yields the
latest (done, total) each time it changed, merging the updates that arrive while the consumer
is busy sending the previous one, so a slow client gets fewer messages, never a backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable


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


PROGRESS_ENTRIES = 256  # requests whose progress the HTTP door remembers (newest kept)


class ProgressBoard:
    """(done, total) tiles of recent HTTP requests by request id, for a page to poll
    (``GET /v1/progress?id=...`` while its ``POST /v1/upscale`` with ``X-Progress: 1`` runs).

    Bounded: the oldest entry goes when a new one would exceed ``PROGRESS_ENTRIES``; a finished
    request keeps its last count until then, so a poll after the answer still reads it.
    """

    def __init__(self, entries: int = PROGRESS_ENTRIES) -> None:
        self._entries = entries
        self._board: dict[str, tuple[int, int]] = {}

    def track(self, request_id: str) -> Callable[[int, int], None]:
        self._board.pop(request_id, None)
        while len(self._board) >= self._entries:
            del self._board[next(iter(self._board))]
        self._board[request_id] = (0, 0)

        def update(done: int, total: int) -> None:
            if request_id in self._board:
                self._board[request_id] = (done, total)

        return update

    def get(self, request_id: str) -> tuple[int, int] | None:
        return self._board.get(request_id)
