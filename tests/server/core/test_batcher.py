"""TileBatcher: batching rules on a real engine, timing-sensitive rules on a controllable engine.

``GatedEngine`` is a collaborator written for these tests (not a mock of a real part): it
upscales by pixel repetition, records the tag (value) of every tile of every batch it sees, can
hold each call until the test opens its gate, and fails batches holding a negative tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import BatcherConfig, EngineConfig
from server.core.batch_types import BatcherStopped, QueueFull
from server.core.batcher import TileBatcher
from server.core.engine import Engine

WAIT = 5.0  # seconds: bound on every await that must finish; a hang fails the test


class GatedEngine:
    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def run(self, batch: np.ndarray) -> np.ndarray:
        tags = [float(t) for t in batch[:, 0, 0, 0]]
        self.batches.append(tags)
        self.shapes.append(batch.shape)
        if not self.gate.wait(WAIT):
            raise TimeoutError("test never opened the gate")
        if min(tags) < 0:
            raise ValueError(f"negative tile tag {min(tags)}")
        return batch.repeat(2, axis=2).repeat(2, axis=3)

    @property
    def seen(self) -> list[float]:
        return [t for batch in self.batches for t in batch]


def tagged(*tags: float, size: int = 2) -> np.ndarray:
    """Tiles [n, 3, size, size], tile i filled with tags[i]."""
    return np.array(tags, np.float32)[:, None, None, None] * np.ones((1, 3, size, size), np.float32)


async def until(condition: Callable[[], bool]) -> None:
    """Poll the event loop until ``condition()`` holds (at most WAIT seconds)."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def running(engine: Any, **config: Any) -> AsyncIterator[TileBatcher]:
    batcher = TileBatcher(engine, BatcherConfig(**config))
    await batcher.start()
    try:
        yield batcher
    finally:
        if isinstance(engine, GatedEngine):
            engine.gate.set()
        await asyncio.wait_for(batcher.stop(), WAIT)


@pytest.fixture(scope="module")
def engine(tiny_onnx_x2: Path) -> Engine:
    return Engine(tiny_onnx_x2, EngineConfig(providers=("CPUExecutionProvider",)))


def random_tiles(n: int, seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


# -- real engine ----------------------------------------------------------------------------


def test_concurrent_requests_share_engine_calls_and_keep_order(engine: Engine) -> None:
    requests = [random_tiles(5, seed) for seed in range(6)]
    max_batch = 8

    async def main() -> tuple[list[Any], TileBatcher]:
        async with running(engine, max_batch=max_batch, max_delay_ms=2.0) as batcher:
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(t, f"r{i}") for i, t in enumerate(requests))), WAIT
            )
        return results, batcher

    results, batcher = asyncio.run(main())
    total = sum(len(t) for t in requests)
    assert batcher.engine_calls <= math.ceil(total / max_batch) + 1
    assert batcher.tiles_computed == total
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == total
    assert max(batcher.batch_sizes) == max_batch
    for tiles, result in zip(requests, results, strict=True):
        expected = np.concatenate([engine.run(tiles[i : i + 1]) for i in range(len(tiles))])
        np.testing.assert_allclose(result.outputs, expected, atol=1e-5)
        assert result.compute_seconds > 0
        assert result.queue_seconds >= 0
    assert batcher.queued_tiles == 0


def test_lone_request_is_dispatched_without_waiting(engine: Engine) -> None:
    async def main() -> TileBatcher:
        # A 10 s delay would show up as a timeout if a lone request ever waited for company.
        async with running(engine, max_batch=8, max_delay_ms=10_000) as batcher:
            result = await asyncio.wait_for(batcher.submit(random_tiles(20, 1)), WAIT)
            assert result.outputs.shape == (20, 3, 40, 40)
        return batcher

    batcher = asyncio.run(main())
    assert batcher.batch_sizes == {8: 2, 4: 1}


def test_engine_error_fails_its_batch_only(engine: Engine) -> None:
    async def main() -> None:
        async with running(engine, max_batch=8) as batcher:
            bad = batcher.submit(random_tiles(2, 2)[:, :2])  # 2 channels: the engine refuses
            good = batcher.submit(random_tiles(3, 3))
            bad_result, good_result = await asyncio.wait_for(
                asyncio.gather(bad, good, return_exceptions=True), WAIT
            )
            assert isinstance(bad_result, RuntimeError)
            assert "engine failed" in str(bad_result)
            assert isinstance(bad_result.__cause__, ValueError)
            assert good_result.outputs.shape == (3, 3, 40, 40)  # other shape, other batch

    asyncio.run(main())


# -- controllable engine --------------------------------------------------------------------


def test_waits_for_more_tiles_only_after_contention() -> None:
    fake = GatedEngine(gated=True)

    async def main() -> None:
        async with running(fake, max_batch=3, max_delay_ms=10_000) as batcher:
            a = asyncio.create_task(batcher.submit(tagged(1)))
            await until(lambda: fake.batches == [[1.0]])  # dispatched at once, engine busy
            b = asyncio.create_task(batcher.submit(tagged(2)))
            c = asyncio.create_task(batcher.submit(tagged(3)))
            await until(lambda: batcher.queued_tiles == 2)
            fake.gate.set()
            await asyncio.wait_for(a, WAIT)
            # B and C arrived while the engine was busy: the batcher waits to fill the batch.
            await asyncio.sleep(0.05)
            assert fake.batches == [[1.0]]
            d = asyncio.create_task(batcher.submit(tagged(4)))
            await asyncio.wait_for(asyncio.gather(b, c, d), WAIT)  # full batch: no more wait
        assert fake.batches == [[1.0], [2.0, 3.0, 4.0]]

    asyncio.run(main())


def test_wait_for_more_tiles_is_bounded_by_max_delay() -> None:
    fake = GatedEngine(gated=True)

    async def main() -> None:
        async with running(fake, max_batch=8, max_delay_ms=50) as batcher:
            a = asyncio.create_task(batcher.submit(tagged(1)))
            await until(lambda: fake.batches == [[1.0]])
            b = asyncio.create_task(batcher.submit(tagged(2, 3)))
            await until(lambda: batcher.queued_tiles == 2)
            fake.gate.set()
            await asyncio.wait_for(asyncio.gather(a, b), WAIT)
        assert fake.batches == [[1.0], [2.0, 3.0]]

    asyncio.run(main())


def test_round_robin_keeps_a_huge_request_from_starving_a_small_one() -> None:
    fake = GatedEngine(gated=True)
    huge = tagged(*range(1000, 1040))

    async def main() -> None:
        async with running(fake, max_batch=4) as batcher:
            big = asyncio.create_task(batcher.submit(huge))
            await until(lambda: len(fake.batches) == 1)
            small = asyncio.create_task(batcher.submit(tagged(1, 2)))
            await until(lambda: batcher.pending_requests == 2)
            fake.gate.set()
            result = await asyncio.wait_for(small, WAIT)
            assert not big.done()  # the small one finished long before the huge one
            np.testing.assert_array_equal(result.outputs[:, 0, 0, 0], [1.0, 2.0])
            await asyncio.wait_for(big, WAIT)
        assert fake.batches[0] == [1000.0, 1001.0, 1002.0, 1003.0]
        assert sorted(fake.batches[1]) == [1.0, 2.0, 1004.0, 1005.0]
        assert len(fake.batches) == math.ceil(42 / 4)

    asyncio.run(main())


def test_requests_submitted_together_alternate_tile_by_tile() -> None:
    fake = GatedEngine()

    async def main() -> None:
        async with running(fake, max_batch=4) as batcher:
            await asyncio.wait_for(
                asyncio.gather(batcher.submit(tagged(10, 11, 12)), batcher.submit(tagged(20, 21))),
                WAIT,
            )

    asyncio.run(main())
    assert fake.batches == [[10.0, 20.0, 11.0, 21.0], [12.0]]


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelled_request_tiles_never_reach_the_engine(how: str) -> None:
    fake = GatedEngine(gated=True)

    async def main() -> None:
        async with running(fake, max_batch=2) as batcher:
            first = asyncio.create_task(batcher.submit(tagged(1)))
            await until(lambda: len(fake.batches) == 1)
            if how == "cancel":
                doomed = asyncio.create_task(batcher.submit(tagged(*range(100, 110))))
                await until(lambda: batcher.queued_tiles == 10)
                doomed.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await doomed
            else:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(batcher.submit(tagged(*range(100, 110))), 0.05)
            assert batcher.queued_tiles == 0
            assert batcher.pending_requests == 0
            assert batcher.tiles_dropped == 10
            fake.gate.set()
            await asyncio.wait_for(first, WAIT)
            later = await asyncio.wait_for(batcher.submit(tagged(2, 3)), WAIT)
            np.testing.assert_array_equal(later.outputs[:, 0, 0, 0], [2.0, 3.0])
        assert fake.seen == [1.0, 2.0, 3.0]

    asyncio.run(main())


def test_cancel_during_a_running_batch_discards_its_results() -> None:
    fake = GatedEngine(gated=True)

    async def main() -> TileBatcher:
        async with running(fake, max_batch=2) as batcher:
            doomed = asyncio.create_task(batcher.submit(tagged(5, 6, 7)))
            await until(lambda: fake.batches == [[5.0, 6.0]])
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            assert batcher.queued_tiles == 0  # tile 7 never dispatched
            fake.gate.set()
            result = await asyncio.wait_for(batcher.submit(tagged(8)), WAIT)
            np.testing.assert_array_equal(result.outputs[:, 0, 0, 0], [8.0])
        return batcher

    batcher = asyncio.run(main())
    assert fake.seen == [5.0, 6.0, 8.0]
    assert batcher.tiles_computed == 3


def test_full_queue_refuses_at_once_and_admitted_requests_succeed() -> None:
    fake = GatedEngine(gated=True)

    async def main() -> None:
        async with running(fake, max_batch=2, max_queue_tiles=10) as batcher:
            a = asyncio.create_task(batcher.submit(tagged(*range(0, 6))))
            await until(lambda: len(fake.batches) == 1)  # 2 tiles in the engine, 4 queued
            b = asyncio.create_task(batcher.submit(tagged(*range(10, 16))))
            await until(lambda: batcher.queued_tiles == 10)
            message = r"queue full: 10 tiles queued \+ 1 requested > limit 10; retry later"
            with pytest.raises(QueueFull, match=message):
                # The engine is still held: refusing cannot have waited for it.
                await asyncio.wait_for(batcher.submit(tagged(99)), WAIT)
            assert batcher.queued_tiles == 10
            fake.gate.set()
            ra, rb = await asyncio.wait_for(asyncio.gather(a, b), WAIT)
            np.testing.assert_array_equal(ra.outputs[:, 0, 0, 0], range(0, 6))
            np.testing.assert_array_equal(rb.outputs[:, 0, 0, 0], range(10, 16))
            with pytest.raises(QueueFull, match=r"0 tiles queued \+ 11 requested > limit 10"):
                await batcher.submit(tagged(*range(11)))
        assert 99.0 not in fake.seen

    asyncio.run(main())


def test_engine_failure_fails_every_request_in_the_batch_and_serving_goes_on() -> None:
    fake = GatedEngine()

    async def main() -> None:
        async with running(fake, max_batch=2) as batcher:
            a = batcher.submit(tagged(-1, 1, 2))
            b = batcher.submit(tagged(3))
            results = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), WAIT)
            for error in results:
                assert isinstance(error, RuntimeError)
                assert "engine failed on a batch of 2 tiles: ValueError: negative tile tag" in str(
                    error
                )
            assert batcher.queued_tiles == 0  # A's other tiles were dropped with it
            assert batcher.tiles_dropped == 2
            assert batcher.engine_failures == 1
            result = await asyncio.wait_for(batcher.submit(tagged(4)), WAIT)
            np.testing.assert_array_equal(result.outputs[:, 0, 0, 0], [4.0])
        assert fake.batches == [[-1.0, 3.0], [4.0]]

    asyncio.run(main())


def test_tiles_of_different_shapes_never_share_a_batch() -> None:
    fake = GatedEngine()

    async def main() -> None:
        async with running(fake, max_batch=8) as batcher:
            small, large = tagged(1, 2, size=2), tagged(3, 4, 5, size=4)
            rs, rl = await asyncio.wait_for(
                asyncio.gather(batcher.submit(small), batcher.submit(large)), WAIT
            )
            assert rs.outputs.shape == (2, 3, 4, 4)
            assert rl.outputs.shape == (3, 3, 8, 8)

    asyncio.run(main())
    assert fake.batches == [[1.0, 2.0], [3.0, 4.0, 5.0]]


def test_stop_finishes_queued_work_then_refuses() -> None:
    fake = GatedEngine(gated=True)

    async def main() -> None:
        batcher = TileBatcher(fake, BatcherConfig(max_batch=2))
        with pytest.raises(BatcherStopped, match="not accepting"):
            await batcher.submit(tagged(1))
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(tagged(i, i + 0.5))) for i in range(3)]
        await until(lambda: len(fake.batches) == 1)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(BatcherStopped, match="shutting down"):
            await batcher.submit(tagged(9))
        fake.gate.set()
        await asyncio.wait_for(stopping, WAIT)
        results = [t.result() for t in tasks]  # all done before stop() returned
        assert [r.outputs[0, 0, 0, 0] for r in results] == [0.0, 1.0, 2.0]
        assert not batcher.running

    asyncio.run(main())
    assert 9.0 not in fake.seen


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch >= 1"):
        TileBatcher(GatedEngine(), BatcherConfig(max_batch=0))


def test_large_tiles_count_as_many_queue_units_as_their_pixels_need() -> None:
    """Fitted tiles vary in size: the queue bounds their pixels, in units of a grid tile."""
    engine = GatedEngine()

    async def main() -> None:
        batcher = TileBatcher(engine, BatcherConfig(max_batch=1, max_queue_tiles=10), 40 * 40)
        await batcher.start()
        try:
            assert batcher.units((3, 40, 40)) == 1 and batcher.units((3, 41, 40)) == 2
            assert batcher.units((3, 80, 100)) == 5
            held = batcher.reserve(6)
            with pytest.raises(QueueFull, match=r"6 reserved \+ 5 requested > limit 10"):
                await batcher.submit(np.zeros((1, 3, 80, 100), np.float32))
            held.release()
            result = await batcher.submit(np.zeros((2, 3, 80, 100), np.float32))
            assert result.outputs.shape[0] == 2 and batcher.queued_tiles == 0
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_a_batch_holds_at_most_max_batch_units_of_pixels() -> None:
    """Eight 80x80 tiles are 32 units of 40x40: with max_batch 8 they go two per engine call,
    so a batch of large fitted tiles never holds more pixels than 8 grid tiles."""
    engine = GatedEngine()

    async def main() -> None:
        batcher = TileBatcher(engine, BatcherConfig(max_batch=8), 40 * 40)
        await batcher.start()
        try:
            await batcher.submit(tagged(*range(8), size=80))
            await batcher.submit(tagged(*range(3), size=200))  # 25 units each: one per call
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert [shape[0] for shape in engine.shapes] == [2, 2, 2, 2, 1, 1, 1]
