"""Chunked inference (server/core/chunked.py) against the whole-image path it replaces:
bit-identical
answers, at most two chunks queued per request, queue refusals and cancellation per chunk."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import BatcherConfig, EngineConfig
from server.core.batch_types import QueueFull
from server.core.batcher import TileBatcher
from server.core.chunked import (
    IN_FLIGHT,
    Chunk,
    ChunkTimings,
    infer_chunked,
    plan_chunks,
    to_uint8,
    to_unit_float,
)
from server.core.engine import Engine
from server.core.tiling import plan_tiles
from tests.server.reference import from_planar, stitch, tile_image

WAIT = 10.0  # seconds: bound on every await that must finish
TILE, PAD = 8, 2
GRID = partial(plan_tiles, tile=TILE, pad=PAD)  # the fixed-shape plans these tests count
GRID_TILE_PIXELS = (TILE + 2 * PAD) ** 2


@pytest.fixture(scope="module")
def engine(tiny_onnx_x2: Path) -> Engine:
    return Engine(tiny_onnx_x2, EngineConfig(providers=("CPUExecutionProvider",)))


def photo_like(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(height * 7 + width)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


async def whole_then_chunked(
    engine: Engine, rgb: np.ndarray, ensemble: bool, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The old path (all tiles in one submit, stitch, from_planar) and the chunked one, on one
    batcher; also the most tiles the chunked request ever had queued."""
    batcher = TileBatcher(engine, BatcherConfig(max_batch=4, max_delay_ms=0, max_queue_tiles=4096))
    await batcher.start()
    try:
        plans, tiles = tile_image(rgb, TILE, PAD, ensemble)
        old = await batcher.submit(tiles, "whole")
        expected = from_planar(stitch(old.outputs, plans, engine.scale))
        s = engine.scale
        canvas = np.zeros((s * rgb.shape[0], s * rgb.shape[1], 3), np.uint8)
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, batcher.queued_tiles)
                await asyncio.sleep(0)

        sampler = asyncio.ensure_future(sample())
        timings = await asyncio.wait_for(
            infer_chunked(
                batcher,
                [rgb.transpose(2, 0, 1)],
                [canvas.transpose(2, 0, 1)],
                plan=GRID,
                scale=s,
                ensemble=ensemble,
                chunk_pixels=chunk_size * GRID_TILE_PIXELS,
                request_id="chunked",
                to_model=to_unit_float,
                from_model=to_uint8,
            ),
            WAIT,
        )
        sampler.cancel()
        return expected, canvas, timings.tiles, peak
    finally:
        await asyncio.wait_for(batcher.stop(), WAIT)


@pytest.mark.parametrize("ensemble", [False, True], ids=["plain", "self-ensemble"])
def test_chunked_answer_is_bit_identical_to_the_whole_image_path(
    engine: Engine, ensemble: bool
) -> None:
    rgb = photo_like(45, 29)  # 6 x 4 tiles, partial last row and column; chunks of 5
    expected, actual, tiles, peak = asyncio.run(whole_then_chunked(engine, rgb, ensemble, 5))
    assert tiles == (8 if ensemble else 1) * 24
    np.testing.assert_array_equal(actual, expected)
    assert 0 < peak <= IN_FLIGHT * 5


def test_chunks_cover_every_tile_once_and_never_span_views() -> None:
    chunks = plan_chunks([[7, 3], [4]], 3)
    assert chunks == [
        Chunk(0, 0, 0, 3),
        Chunk(0, 0, 3, 6),
        Chunk(0, 0, 6, 7),
        Chunk(0, 1, 0, 3),
        Chunk(1, 0, 0, 3),
        Chunk(1, 0, 3, 4),
    ]
    with pytest.raises(ValueError, match="chunk size 0"):
        plan_chunks([[1]], 0)


class SlowEngine:
    """Doubles tiles (a pixel-wise x2 model) after a pause, so chunks stay queued a while."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tiles = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        self.tiles += len(batch)
        return batch.repeat(2, axis=2).repeat(2, axis=3)


def doubled(
    batcher: TileBatcher, rgb: np.ndarray, canvas: np.ndarray, chunk_size: int, request_id: str
) -> Coroutine[Any, Any, ChunkTimings]:
    """Chunked x2 inference of ``rgb`` into ``canvas`` with plain tiles (for SlowEngine)."""
    return infer_chunked(
        batcher,
        [rgb.transpose(2, 0, 1)],
        [canvas.transpose(2, 0, 1)],
        plan=GRID,
        scale=2,
        ensemble=False,
        chunk_pixels=chunk_size * GRID_TILE_PIXELS,
        request_id=request_id,
        to_model=to_unit_float,
        from_model=to_uint8,
    )


def test_cancelling_drops_queued_tiles_and_a_refused_chunk_fails_the_request() -> None:
    rgb = photo_like(32, 32)  # 16 tiles of 8; chunks of 4

    async def scenario() -> None:
        engine = SlowEngine(0.01)
        config = BatcherConfig(max_batch=1, max_delay_ms=0, max_queue_tiles=10)
        batcher = TileBatcher(engine, config)
        await batcher.start()
        canvas = np.zeros((64, 64, 3), np.uint8)

        def call(request_id: str) -> asyncio.Future[object]:
            return asyncio.ensure_future(doubled(batcher, rgb, canvas, 4, request_id))

        try:
            # Cancelled mid-way: its queued tiles are dropped, none keeps reaching the engine.
            first = call("cancelled")
            async with asyncio.timeout(WAIT):
                while engine.tiles == 0:
                    await asyncio.sleep(0.001)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert batcher.queued_tiles == 0 and batcher.pending_requests == 0
            computed = engine.tiles
            await asyncio.sleep(0.1)
            assert engine.tiles <= computed + 1  # at most the batch running at the cancel
            # 8 tiles of another request fill the queue: a chunk that does not fit is refused.
            blocker = asyncio.ensure_future(
                batcher.submit(np.zeros((8, 3, 12, 12), np.float32), "blocker")
            )
            await asyncio.sleep(0)
            with pytest.raises(QueueFull, match="queue full"):
                await asyncio.wait_for(call("refused"), WAIT)
            await asyncio.wait_for(blocker, WAIT)
            assert batcher.queued_tiles == 0 and batcher.pending_requests == 0
        finally:
            await asyncio.wait_for(batcher.stop(), WAIT)

    asyncio.run(scenario())


def test_chunks_sharing_an_engine_call_are_charged_for_it_once() -> None:
    # 16 tiles of 8 in chunks of 8, batches of 2: the second chunk is queued while the first
    # has tiles left, and round-robin puts one tile of each into every batch until one ends.
    rgb = photo_like(32, 32)

    async def scenario() -> tuple[float, float, int]:
        batcher = TileBatcher(SlowEngine(0.02), BatcherConfig(max_batch=2, max_delay_ms=0))
        await batcher.start()
        canvas = np.zeros((64, 64, 3), np.uint8)
        try:
            timings = await asyncio.wait_for(doubled(batcher, rgb, canvas, 8, "shared"), WAIT)
        finally:
            await asyncio.wait_for(batcher.stop(), WAIT)
        return timings.compute_seconds, batcher.engine_seconds, batcher.engine_calls

    compute, engine_seconds, calls = asyncio.run(scenario())
    assert calls == 8
    assert compute == pytest.approx(engine_seconds)  # each call counted once, not once a chunk
