"""Run images through the tile batcher in bounded chunks of tiles, stitching as they finish.

Cutting a whole image into tiles up front and getting every output back at once holds the
image's tiles, all their SR outputs and a float32 canvas at the same time: about 2.5 GiB for a
4096x4096 image at x2. Here each chunk's tiles are cut from the source image only when the
chunk is submitted, and each chunk's outputs are written into the preallocated answer canvas
as soon as they come back, so besides the source and the answer at most ``IN_FLIGHT`` chunks
of tiles and outputs are alive per request. Two chunks are in flight so a lone request keeps
the engine busy: chunk k+1 waits in the queue while chunk k is stitched.

Every chunk goes through ``submit``; a caller that reserved the request's tiles at admission
(``TileBatcher.reserve``) passes the reservation, so no chunk is refused for queue space
(without one, ``submit`` refuses a chunk the queue cannot take with ``QueueFull``);
cancelling the caller cancels the chunk tasks in flight, which drops their queued tiles.
Results are bit-identical to tiling the whole image: splitting and merging are per-tile copies,
and the value conversions (``to_model``, ``from_model``) are element-wise.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rdn.ensemble import N_TRANSFORMS, inverse_transform, transform
from server.core.batch_types import Reservation, TileResult
from server.core.tiling import TilePlan, merge_tile_range_into, split_tile_range

CHUNK_MIN_TILES = 64  # a chunk is at least this many tiles ...
CHUNK_BATCHES = 8  # ... and at least this many full batches
IN_FLIGHT = 2  # chunks of one request submitted and not yet stitched
# Chunks of at most this many input pixels are cut on the event loop: a copy and a float
# conversion of 256x256x3 take about 0.3 ms, less than a hop to a worker thread and back.
INLINE_SPLIT_PIXELS = 256 * 256


class TileSource(Protocol):
    """What chunked inference needs from the batcher (``server.core.batcher.TileBatcher`` is one).

    ``progress`` is passed only when the caller asked for progress (see ``infer_chunked``)."""

    async def submit(
        self, tiles: np.ndarray, request_id: str = "", reservation: Reservation | None = None
    ) -> TileResult: ...


Progress = Callable[[int, int], None]  # (tiles done, tiles in all) of one request


@dataclass(frozen=True)
class ChunkTimings:
    queue_seconds: float  # the first chunk's wait for its first batch
    compute_seconds: float  # engine time of the distinct batches that carried its tiles
    tiles: int  # tiles of every chunk
    computed_pixels: int  # LR pixels of those tiles' inputs (the model's work)


@dataclass(frozen=True)
class Chunk:
    """Tiles ``start .. stop`` of view ``view`` of image ``image``."""

    image: int
    view: int
    start: int
    stop: int


def chunk_tiles(max_batch: int) -> int:
    """Grid tiles per chunk for a batcher of ``max_batch``."""
    return max(CHUNK_MIN_TILES, CHUNK_BATCHES * max_batch)


def chunk_size(plan: TilePlan, chunk_pixels: int) -> int:
    """Tiles of ``plan`` per chunk: as many as ``chunk_pixels`` hold, at least one."""
    return max(1, chunk_pixels // plan.tile_pixels)


def plan_chunks(
    counts: Sequence[Sequence[int]], size: int | Sequence[Sequence[int]]
) -> list[Chunk]:
    """Chunks of at most ``size`` tiles (one for all, or ``size[image][view]``) over
    ``counts[image][view]`` tiles; none spans views."""
    sizes = [[size] * len(views) for views in counts] if isinstance(size, int) else size
    if any(s < 1 for views in sizes for s in views):
        raise ValueError(f"chunk size {size}: must be at least 1 tile")
    return [
        Chunk(image, view, start, min(start + step, count))
        for image, views in enumerate(counts)
        for view, count in enumerate(views)
        for step in (sizes[image][view],)
        for start in range(0, count, step)
    ]


def to_unit_float(tiles: np.ndarray) -> np.ndarray:
    """uint8 or uint16 tiles -> float32 in [0, 1], the same arithmetic as whole-image
    inference's ``to_planar`` (tests/server/reference.py); 16-bit samples keep their
    precision (x / 65535)."""
    top = 65535 if tiles.dtype == np.uint16 else 255
    return np.multiply(tiles, np.float32(1 / top), dtype=np.float32)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, rounded and clipped with the same arithmetic as
    ``from_planar`` of tests/server/reference.py (which also moves channels last; this keeps
    the layout)."""
    scaled = np.multiply(values, np.float32(255), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 255.5, out=scaled)
    return scaled.astype(np.uint8)


def to_uint16(values: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint16, rounded and clipped like ``to_uint8`` (a 16-bit answer)."""
    scaled = np.multiply(values, np.float32(65535), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 65535.5, out=scaled)
    return scaled.astype(np.uint16)


def from_unit_float(dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """The conversion of model output to samples of ``dtype`` (uint8 or uint16)."""
    return to_uint16 if dtype == np.uint16 else to_uint8


def _identity(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32, copy=False)


class _Image:
    """One image's views, plans and where its SR goes; folds ensemble views as they finish."""

    def __init__(
        self,
        source: np.ndarray,
        canvas: np.ndarray,
        plan: Callable[[int, int], TilePlan],
        scale: int,
        ensemble: bool,
        from_model: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.views = (
            [transform(source[None], i)[0] for i in range(N_TRANSFORMS)] if ensemble else [source]
        )
        self.plans = [plan(v.shape[1], v.shape[2]) for v in self.views]
        self.canvas = canvas  # [3, sH, sW]
        self.scale = scale
        self.ensemble = ensemble
        self.from_model = from_model
        self._view_canvas: np.ndarray | None = None
        self._total: np.ndarray | None = None

    def merge(self, chunk: Chunk, outputs: np.ndarray) -> None:
        plan = self.plans[chunk.view]
        if not self.ensemble:
            cores = self.from_model(outputs)
            merge_tile_range_into(self.canvas, cores, plan, self.scale, chunk.start, chunk.stop)
            return
        # Ensemble: each view is stitched in float32, turned back
        # and summed in float64; the mean is converted once all eight are in.
        if self._view_canvas is None:
            shape = (3, self.scale * plan.height, self.scale * plan.width)
            self._view_canvas = np.empty(shape, np.float32)
        merge_tile_range_into(self._view_canvas, outputs, plan, self.scale, chunk.start, chunk.stop)
        if chunk.stop < plan.count:
            return
        back = inverse_transform(self._view_canvas[None], chunk.view)[0].astype(np.float64)
        self._view_canvas = None
        self._total = back if self._total is None else self._total + back
        if chunk.view == len(self.views) - 1:
            mean = (self._total / len(self.views)).astype(np.float32)
            self._total = None
            self.canvas[...] = self.from_model(mean)


async def infer_chunked(
    batcher: TileSource,
    sources: Sequence[np.ndarray],
    canvases: Sequence[np.ndarray],
    *,
    plan: Callable[[int, int], TilePlan],
    scale: int,
    ensemble: bool,
    chunk_pixels: int,
    request_id: str,
    reservation: Reservation | None = None,
    to_model: Callable[[np.ndarray], np.ndarray] = _identity,
    from_model: Callable[[np.ndarray], np.ndarray] = _identity,
    progress: Progress | None = None,
    in_flight: int = IN_FLIGHT,
) -> ChunkTimings:
    """Super-resolve each ``sources[i]`` [3, H, W] into ``canvases[i]`` [3, sH, sW] in place.

    ``in_flight``: chunks submitted and not yet stitched; more than IN_FLIGHT lets the chunks of
    many small images (an animation's frames: one chunk each) share engine calls.

    ``progress(done, total)`` is called once the tiles are planned (done 0), then each time
    the batcher completes some (``batcher.submit`` must then take a ``progress`` keyword).

    ``plan(height, width)`` gives each view's tile plan; a chunk holds at most
    ``chunk_pixels`` of tile input (at least one tile).

    ``to_model`` turns tiles cut from a source into the model's float32 input; ``from_model``
    turns float32 model output into the canvas's values. Both may be strided views (e.g. the
    ``transpose(2, 0, 1)`` of an H x W x 3 array). Raises what ``submit`` raises; on any error
    or cancellation the chunks in flight are cancelled.
    """
    images = [
        _Image(s, c, plan, scale, ensemble, from_model)
        for s, c in zip(sources, canvases, strict=True)
    ]
    chunks = plan_chunks(
        [[p.count for p in image.plans] for image in images],
        [[chunk_size(p, chunk_pixels) for p in image.plans] for image in images],
    )

    submit = batcher.submit
    if progress is not None:
        total, done = sum(c.stop - c.start for c in chunks), 0

        def completed(count: int) -> None:
            nonlocal done
            done += count
            progress(done, total)

        submit = functools.partial(batcher.submit, progress=completed)
        progress(0, total)

    def split(chunk: Chunk) -> np.ndarray:
        image = images[chunk.image]
        view, plan = image.views[chunk.view], image.plans[chunk.view]
        return to_model(split_tile_range(view, plan, chunk.start, chunk.stop))

    queue_seconds: float | None = None
    batches: dict[int, float] = {}  # chunks in flight together can share an engine call
    flight: collections.deque[tuple[Chunk, asyncio.Task[TileResult]]] = collections.deque()

    async def finish_oldest() -> None:
        nonlocal queue_seconds
        chunk, task = flight[0]
        result = await task
        flight.popleft()
        if queue_seconds is None:
            queue_seconds = result.queue_seconds
        batches.update(result.batches)
        await asyncio.to_thread(images[chunk.image].merge, chunk, result.outputs)

    try:
        for chunk in chunks:
            pixels = (chunk.stop - chunk.start) * images[chunk.image].plans[chunk.view].tile_pixels
            if pixels <= INLINE_SPLIT_PIXELS:
                tiles = split(chunk)
            else:
                tiles = await asyncio.to_thread(split, chunk)
            submitted = submit(tiles, request_id, reservation)
            flight.append((chunk, asyncio.ensure_future(submitted)))
            del tiles
            if len(flight) >= in_flight:
                await finish_oldest()
        while flight:
            await finish_oldest()
    finally:
        for _, task in flight:
            task.cancel()
        if flight:  # collect them so no exception goes unretrieved
            await asyncio.wait([task for _, task in flight])
            for _, task in flight:
                if not task.cancelled():
                    task.exception()
    computed = sum((c.stop - c.start) * images[c.image].plans[c.view].tile_pixels for c in chunks)
    return ChunkTimings(
        queue_seconds or 0.0,
        sum(batches.values()),
        sum(c.stop - c.start for c in chunks),
        computed,
    )
