"""The values the tile batcher and its callers exchange: what an engine must offer, the queue
capacity a request holds, a request's result, and the batcher's refusals
(server/core/batcher.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class TileEngine(Protocol):
    """What the batcher needs from an engine (``server.core.engine.Engine`` is one)."""

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class QueueFull(Exception):
    """Accepting a request would exceed ``max_queue_tiles`` (maps to RESOURCE_EXHAUSTED)."""


class BatcherStopped(RuntimeError):
    """The batcher is not running (not started, or stopping): no new submissions."""


@dataclass(frozen=True)
class TileResult:
    outputs: np.ndarray  # [n, 3, s*in, s*in] in the order submitted
    queue_seconds: float  # submit -> first tile dispatched
    # engine call number -> its seconds, for each batch that carried its tiles: callers that
    # split one job into several submissions sum distinct batches, not each submission's total
    batches: dict[int, float] = field(default_factory=dict)

    @property
    def compute_seconds(self) -> float:
        """Engine time of the batches that carried its tiles."""
        return sum(self.batches.values())


class Held:
    """Queue units reserved by admitted requests and not yet submitted (the batcher's count)."""

    def __init__(self) -> None:
        self.units = 0


class Reservation:
    """Queue capacity held for one request's tiles until they are submitted or released."""

    def __init__(self, held: Held, tiles: int) -> None:
        self._held = held
        self.tiles = tiles  # reserved and not yet submitted

    def take(self, count: int) -> None:
        """Move ``count`` reserved tiles into the queue (called by ``submit``)."""
        if count > self.tiles:
            raise ValueError(f"submitting {count} tiles against a reservation of {self.tiles}")
        self.tiles -= count
        self._held.units -= count

    def release(self) -> None:
        """Give back what was not submitted (idempotent)."""
        self._held.units -= self.tiles
        self.tiles = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
