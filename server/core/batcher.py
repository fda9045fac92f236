"""Cross-request tile batching in front of the engines of every served model.

One batcher, one engine thread and one queue limit serve all models: a request's tiles carry
the engine of the model it asked for (``lane(engine).submit``), a batch holds tiles of one
engine and one shape, and the round-robin below is over requests whatever their model, so N
models never run N engine calls at once (no CPU oversubscription) and none starves another.

Tiles of one shape from different requests can share an engine call (on a GPU every request
is cut into one fixed shape; on a CPU each request's tiles share a shape fitted to its image,
and batching gains nothing there). The batcher keeps one pending queue per request and fills
each batch by taking one tile from each request in turn (round-robin), so a huge image cannot
starve a small one.

Rules:
- an idle engine never waits: the first tile to arrive is dispatched at once;
- after a batch, if fewer than ``max_batch`` tiles are pending and requests arrived while that
  batch ran (contention), wait at most ``max_delay_ms`` for more tiles to fill the next batch;
- the engine runs in ONE worker thread, so the event loop keeps decoding, encoding and
  answering while it computes;
- queue capacity is counted in units of ``unit_pixels`` (a tile of ``unit_pixels`` or fewer is
  one unit; a larger one as many units as its pixels need), so tiles of any plan are bounded
  by what they hold; with ``unit_pixels`` 0 every tile is one unit;
- ``submit`` refuses at once (``QueueFull``) when accepting would exceed ``max_queue_tiles``;
- ``reserve`` takes a whole request's queue capacity at admission: the chunks later submitted
  against that ``Reservation`` are never refused for queue space, so a request that began
  computing is never turned away half-way (queued tiles + reserved tiles <= max_queue_tiles);
- when the awaiting task is cancelled, its tiles not yet in a batch are dropped; tiles already
  in a running batch finish and their results are discarded;
- an engine error fails every request in that batch (``RuntimeError`` with the cause) and the
  loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from server.config import BatcherConfig
from server.core.batch_types import (
    BatcherStopped,
    Held,
    QueueFull,
    Reservation,
    TileEngine,
    TileResult,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class _Request:
    """One submitted request: its tiles, how far dispatch got, where the outputs go."""

    request_id: str
    tiles: np.ndarray
    future: asyncio.Future[TileResult]
    submitted: float
    unit: int  # queue units of each tile
    next_tile: int = 0  # tiles [0, next_tile) have been put into batches
    done_tiles: int = 0
    outputs: np.ndarray | None = None  # allocated when the first result arrives
    first_dispatch: float | None = None
    batches: dict[int, float] = field(default_factory=dict)  # engine call -> seconds
    engine: TileEngine | None = None  # None: the batcher's own engine
    progress: Callable[[int], None] | None = None  # told the tiles each batch completed
    key: tuple[int, tuple[int, ...]] = field(init=False)  # tiles of one key share a batch

    def __post_init__(self) -> None:
        self.key = (id(self.engine), tuple(self.tiles.shape[1:]))

    @property
    def count(self) -> int:
        return len(self.tiles)

    @property
    def undispatched(self) -> int:
        return self.count - self.next_tile


class TileBatcher:
    """Batches tiles from concurrent requests into engine calls of at most ``max_batch``."""

    def __init__(
        self, engine: TileEngine | None, config: BatcherConfig, unit_pixels: int = 0
    ) -> None:
        """``engine`` runs tiles submitted without one (None: every submission names its
        engine, through ``lane``)."""
        if config.max_batch < 1 or config.max_queue_tiles < 1 or config.max_delay_ms < 0:
            raise ValueError(
                "BatcherConfig needs max_batch >= 1, max_queue_tiles >= 1, max_delay_ms >= 0; "
                f"got {config}"
            )
        self._engine = engine
        self._config = config
        self._unit_pixels = unit_pixels
        self._pending: collections.deque[_Request] = collections.deque()  # rotation order
        self._queued = 0  # units of tiles submitted but not yet in a batch
        self._held = Held()  # units reserved by admitted requests and not yet submitted
        self._in_flight: list[_Request] = []  # requests with tiles in the running batch
        self._arrivals = 0  # submissions accepted so far; tells whether any came during a batch
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._closing = False
        # Counters for metrics.
        self._engine_calls = 0
        self._tiles_computed = 0
        self._engine_seconds = 0.0
        self._engine_failures = 0
        self._tiles_dropped = 0
        self._batch_sizes: collections.Counter[int] = collections.Counter()

    # -- read-only counters ----------------------------------------------------------------
    @property
    def config(self) -> BatcherConfig:
        return self._config

    @property
    def queued_tiles(self) -> int:
        """Queue units of the tiles accepted but not yet put into a batch."""
        return self._queued

    @property
    def reserved_tiles(self) -> int:
        """Queue units admitted requests hold in reserve (not yet submitted)."""
        return self._held.units

    def units(self, tile_shape: tuple[int, ...]) -> int:
        """Queue units of one tile of ``tile_shape`` ([..., h, w])."""
        if self._unit_pixels <= 0:
            return 1
        return -(-tile_shape[-2] * tile_shape[-1] // self._unit_pixels)

    @property
    def pending_requests(self) -> int:
        """Requests that still have tiles waiting for a batch."""
        return len(self._pending)

    @property
    def engine_calls(self) -> int:
        return self._engine_calls

    @property
    def tiles_computed(self) -> int:
        """Tiles the engine has run (including those whose request was cancelled meanwhile)."""
        return self._tiles_computed

    @property
    def engine_seconds(self) -> float:
        """Total wall time spent in engine calls."""
        return self._engine_seconds

    @property
    def engine_failures(self) -> int:
        """Engine calls that raised (each failed every request in its batch)."""
        return self._engine_failures

    @property
    def tiles_dropped(self) -> int:
        """Tiles removed before reaching the engine (request cancelled or failed)."""
        return self._tiles_dropped

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Batch size -> number of engine calls of that size (a copy)."""
        return dict(self._batch_sizes)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- lifetime -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("TileBatcher.start() called twice; a batcher runs once")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="tile-batcher")

    async def stop(self) -> None:
        """Refuse new submissions, finish everything already queued, then end the loop."""
        self._accepting = False
        self._closing = True
        if self._task is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.shield(self._task)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    # -- requests -----------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self._accepting:
            raise BatcherStopped(
                "tile batcher is not accepting requests (not started or shutting down); retry "
                "on another server"
            )

    def _check_room(self, count: int) -> None:
        limit = self._config.max_queue_tiles
        if self._queued + self._held.units + count > limit:
            held = f" + {self._held.units} reserved" if self._held.units else ""
            raise QueueFull(
                f"queue full: {self._queued} tiles queued{held} + {count} requested > limit "
                f"{limit}; retry later"
            )

    def reserve(self, tiles: int) -> Reservation:
        """Hold ``tiles`` queue units for a request now, or raise ``QueueFull`` at once.

        Submit its chunks with ``reservation=``; release what is left when the request ends.
        """
        self._check_accepting()
        self._check_room(tiles)
        self._held.units += tiles
        return Reservation(self._held, tiles)

    async def run_exclusive(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the engine thread, between batches: work such as a new
        model's warm-up then never runs beside an engine call."""
        if self._executor is None:
            raise BatcherStopped("tile batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def lane(self, engine: TileEngine) -> Lane:
        """A ``submit`` that runs tiles through ``engine`` (one model of many) on this
        batcher's thread, under its queue limit."""
        return Lane(self, engine)

    async def submit(
        self,
        tiles: np.ndarray,
        request_id: str = "",
        reservation: Reservation | None = None,
        engine: TileEngine | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TileResult:
        """Run ``tiles`` ([n, 3, in, in]) through ``engine`` (default: the batcher's);
        outputs come back in order. ``progress(n)`` is called on the event loop each time a
        batch completed ``n`` of them (it must be quick and must not raise).

        Raises ``QueueFull`` at once when the queue cannot take them (never for tiles covered
        by ``reservation``), ``BatcherStopped`` when the batcher is not running,
        ``RuntimeError`` when the engine failed on one of its batches. Cancelling the awaiting
        task drops the tiles not yet dispatched.
        """
        self._check_accepting()
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or len(tiles) == 0:
            shape = getattr(tiles, "shape", type(tiles).__name__)
            raise ValueError(f"submit needs a non-empty [n, 3, h, w] tile array, got {shape}")
        if engine is None and self._engine is None:
            raise ValueError("this batcher has no engine of its own; submit through lane(engine)")
        unit = self.units(tiles.shape)
        if reservation is None:
            self._check_room(unit * len(tiles))
        else:
            reservation.take(unit * len(tiles))
        loop = asyncio.get_running_loop()
        request = _Request(
            request_id,
            tiles,
            loop.create_future(),
            time.perf_counter(),
            unit,
            engine=engine,
            progress=progress,
        )
        self._pending.append(request)
        self._queued += unit * request.count
        self._arrivals += 1
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(request)
            raise

    def _drop(self, request: _Request) -> None:
        """Forget a request's undispatched tiles (cancelled or failed)."""
        with contextlib.suppress(ValueError):
            self._pending.remove(request)
            self._queued -= request.unit * request.undispatched
            self._tiles_dropped += request.undispatched
        request.next_tile = request.count

    # -- the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wakeup is not None
        contended = False
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    contended = False  # the engine sat idle: dispatch the newcomer at once
                    continue
                if contended and self._queued < self._config.max_batch and not self._closing:
                    await self._wait_for_more()
                    if not self._pending:  # everything pending was cancelled meanwhile
                        continue
                arrivals_before = self._arrivals
                await self._run_batch(self._take_batch())
                contended = self._arrivals > arrivals_before
        except BaseException as e:
            self._fail_pending(e)
            raise

    async def _wait_for_more(self) -> None:
        """Wait up to max_delay_ms for the pending tiles to reach max_batch."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.max_delay_ms / 1e3
        while self._queued < self._config.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[tuple[_Request, int]]:
        """(request, tile index) pairs, one tile per request in rotation: at most ``max_batch``
        queue units of tiles (so a batch of large fitted tiles holds no more pixels than
        ``max_batch`` grid tiles), and at least one tile.

        Only tiles of the first pending request's engine and shape go into the batch; requests
        with another keep their place at the front for the next batch.
        """
        key = self._pending[0].key
        limit = max(1, self._config.max_batch // self._pending[0].unit)
        other_shape: list[_Request] = []
        batch: list[tuple[_Request, int]] = []
        while self._pending and len(batch) < limit:
            request = self._pending.popleft()
            if request.key != key:
                other_shape.append(request)
                continue
            batch.append((request, request.next_tile))
            request.next_tile += 1
            self._queued -= request.unit
            if request.undispatched:
                self._pending.append(request)
        self._pending.extendleft(reversed(other_shape))
        return batch

    async def _run_batch(self, batch: list[tuple[_Request, int]]) -> None:
        now = time.perf_counter()
        for request, _ in batch:
            if request.first_dispatch is None:
                request.first_dispatch = now
        tiles = np.stack([request.tiles[i] for request, i in batch])
        loop = asyncio.get_running_loop()
        self._in_flight = [request for request, _ in batch]
        engine = batch[0][0].engine or self._engine
        assert engine is not None  # submit refuses tiles without an engine
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, _timed_run, engine, tiles)
        except Exception as e:
            self._fail_batch(batch, e)
            return
        finally:
            self._in_flight = []
        self._engine_calls += 1
        self._tiles_computed += len(batch)
        self._engine_seconds += seconds
        self._batch_sizes[len(batch)] += 1
        self._deliver(batch, outputs, seconds, self._engine_calls)

    def _deliver(
        self, batch: list[tuple[_Request, int]], outputs: np.ndarray, seconds: float, call: int
    ) -> None:
        """Scatter a batch's outputs to their requests; complete the requests now whole."""
        if len(outputs) != len(batch):
            self._fail_batch(
                batch, ValueError(f"engine returned {len(outputs)} outputs for {len(batch)} tiles")
            )
            return
        completed: collections.Counter[int] = collections.Counter()
        requests: dict[int, _Request] = {}
        for k, (request, index) in enumerate(batch):
            if request.future.done():  # cancelled or failed: the result is discarded
                continue
            completed[id(request)] += 1
            requests[id(request)] = request
            if request.count == 1:  # a view: the engine returns a fresh array per call
                request.outputs = outputs[k : k + 1]
            else:
                if request.outputs is None:
                    shape = (request.count, *outputs.shape[1:])
                    request.outputs = np.empty(shape, outputs.dtype)
                request.outputs[index] = outputs[k]
            request.done_tiles += 1
            request.batches[call] = seconds
            if request.done_tiles == request.count:
                assert request.first_dispatch is not None
                request.future.set_result(
                    TileResult(
                        outputs=request.outputs,
                        queue_seconds=request.first_dispatch - request.submitted,
                        batches=request.batches,
                    )
                )
        for key, request in requests.items():
            if request.progress is not None:
                request.progress(completed[key])

    def _fail_batch(self, batch: list[tuple[_Request, int]], cause: BaseException) -> None:
        """Fail every request with a tile in ``batch``; drop their remaining tiles."""
        self._engine_failures += 1
        requests = list({id(r): r for r, _ in batch}.values())
        ids = [r.request_id for r in requests if r.request_id]
        log.error(
            "engine failed on a batch of %d tiles (requests: %s): %s: %s",
            len(batch),
            ", ".join(ids) or "unnamed",
            type(cause).__name__,
            cause,
        )
        for request in requests:
            self._drop(request)
            if not request.future.done():
                error = RuntimeError(
                    f"engine failed on a batch of {len(batch)} tiles: "
                    f"{type(cause).__name__}: {cause}"
                )
                error.__cause__ = cause
                request.future.set_exception(error)

    def _fail_pending(self, cause: BaseException) -> None:
        """The loop is ending abnormally: nobody may wait forever."""
        for request in [*self._in_flight, *self._pending]:
            self._drop(request)
            if not request.future.done():
                request.future.set_exception(
                    BatcherStopped(f"tile batcher stopped before this request ran ({cause!r})")
                )


class Lane:
    """``TileBatcher.submit`` bound to one engine: the ``TileSource`` of one model."""

    def __init__(self, batcher: TileBatcher, engine: TileEngine) -> None:
        self._batcher = batcher
        self._engine = engine

    def reserve(self, tiles: int) -> Reservation:
        return self._batcher.reserve(tiles)

    async def submit(
        self,
        tiles: np.ndarray,
        request_id: str = "",
        reservation: Reservation | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TileResult:
        return await self._batcher.submit(
            tiles, request_id, reservation, engine=self._engine, progress=progress
        )


def _timed_run(engine: TileEngine, tiles: np.ndarray) -> tuple[np.ndarray, float]:
    """Runs in the worker thread: one engine call and its wall time."""
    start = time.perf_counter()
    outputs = engine.run(tiles)
    return outputs, time.perf_counter() - start
