"""Load and overload on a real in-process server (tiny model, loopback, bounded counts).

- 300 requests at concurrency 32 (PNG, JPEG, raw, RGBA, grey, streamed) all succeed, each
  answer the right size, and the queue ends empty;
- with a small ``max_queue_tiles`` filled while the engine is held at a gate, excess requests
  are refused at admission with RESOURCE_EXHAUSTED and the retry hint: the refusals come back
  while the admitted requests still wait, those all succeed, and the engine never sees a
  refused tile.

The long versions (5000 requests, a 10-minute soak with RSS samples) are in tests/bench/load.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from server.config import BatcherConfig, LimitsConfig, TilingConfig
from server.core.engine import Engine
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import RETRY_AFTER_KEY
from tests.background import BackgroundServer
from tests.server.gated import gated_server, until
from tests.server.loopback import loopback_config

CALL_TIMEOUT = 60.0  # seconds: bounds every call so a broken server fails instead of hanging


config = partial(
    loopback_config,
    grace_s=1.0,
    batcher=BatcherConfig(max_batch=8, max_delay_ms=2.0, max_queue_tiles=4096),
    limits=LimitsConfig(max_message_bytes=4 * 2**20),
)


def pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 5 + y * 3)[:, :, None] + np.arange(channels) * 60
    return ((base + rng.integers(0, 16, (height, width, channels))) % 256).astype(np.uint8)


def encoded(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


@dataclass(frozen=True)
class Job:
    """One valid request and the answer it must get."""

    request: upscale_pb2.UpscaleRequest
    streamed: bool
    answer: tuple[int, int, int]  # width, height, channels


def raw_request(image: np.ndarray) -> upscale_pb2.UpscaleRequest:
    height, width, channels = image.shape
    shape = upscale_pb2.ImageShape(height=height, width=width, channels=channels)
    return upscale_pb2.UpscaleRequest(raw=upscale_pb2.RawImage(shape=shape, data=image.tobytes()))


def job_mix() -> list[Job]:
    """Formats and layouts a production server sees, small enough to keep 300 calls quick."""
    rgb, rgba, grey = pixels(24, 40), pixels(30, 20, 4), pixels(40, 33, 1)
    return [
        Job(upscale_pb2.UpscaleRequest(encoded=encoded(rgb, ".png")), False, (80, 48, 3)),
        Job(upscale_pb2.UpscaleRequest(encoded=encoded(rgb, ".jpg")), False, (80, 48, 3)),
        Job(upscale_pb2.UpscaleRequest(encoded=encoded(rgba, ".png")), False, (40, 60, 4)),
        Job(upscale_pb2.UpscaleRequest(encoded=encoded(grey, ".png")), False, (66, 80, 1)),
        Job(raw_request(rgb), False, (80, 48, 3)),
        Job(
            upscale_pb2.UpscaleRequest(encoded=encoded(rgb, ".webp"), output_format=2), True,
            (80, 48, 3),
        ),
    ]  # fmt: skip


def as_stream(
    request: upscale_pb2.UpscaleRequest, piece: int = 1000
) -> Iterator[upscale_pb2.UpscaleChunk]:
    """An encoded UpscaleRequest as UpscaleStream messages: header, then chunks in order."""
    data = request.encoded
    yield upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(
            total_bytes=len(data), output_format=request.output_format, quality=request.quality
        )
    )
    for offset in range(0, len(data), piece):
        chunk = upscale_pb2.DataChunk(offset=offset, data=data[offset : offset + piece])
        yield upscale_pb2.UpscaleChunk(data=chunk)


@dataclass(frozen=True)
class Result:
    code: str
    answer: tuple[int, int, int] | None
    retry_hint: str | None


def call(stub: upscale_pb2_grpc.UpscalerStub, job: Job) -> Result:
    try:
        if job.streamed:
            first = next(iter(stub.UpscaleStream(as_stream(job.request), timeout=CALL_TIMEOUT)))
            response = first.result
        else:
            response = stub.Upscale(job.request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        hint = dict(e.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
        return Result(e.code().name, None, hint)
    answer = (response.width, response.height, response.channels)
    return Result("OK", answer, None)


@pytest.fixture
def stub_for() -> Iterator[Callable[[int], upscale_pb2_grpc.UpscalerStub]]:
    channels: list[grpc.Channel] = []

    def make(port: int) -> upscale_pb2_grpc.UpscalerStub:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 4 * 2**20)]
        )
        channels.append(channel)
        return upscale_pb2_grpc.UpscalerStub(channel)

    yield make
    for channel in channels:
        channel.close()


def test_300_requests_at_concurrency_32_all_succeed(
    tiny_onnx_x2: Path, engine: Engine, stub_for: Callable[[int], upscale_pb2_grpc.UpscalerStub]
) -> None:
    jobs = job_mix()
    with BackgroundServer(config(tiny_onnx_x2), engine) as bg, ThreadPoolExecutor(32) as pool:
        stub = stub_for(bg.port)
        results = list(pool.map(lambda i: call(stub, jobs[i % len(jobs)]), range(300)))
        batcher = bg.running.batcher
        assert (batcher.queued_tiles, batcher.pending_requests) == (0, 0)
        assert batcher.engine_failures == 0 and batcher.tiles_dropped == 0
        tiles = batcher.tiles_computed
        engine_calls = batcher.engine_calls
    for i, result in enumerate(results):
        assert (result.code, result.answer) == ("OK", jobs[i % len(jobs)].answer), i
    # 32-pixel tiles: 24x40 -> 2, 30x20 -> 1 (and 1 more for its alpha, upscaled by the
    # model), 40x33 -> 4; each job ran 50 times.
    assert tiles == 300 // len(jobs) * (2 + 2 + 2 + 4 + 2 + 2)
    assert engine_calls < tiles  # concurrent requests shared engine calls


def test_full_queue_refuses_at_admission_and_admitted_requests_succeed(
    tiny_onnx_x2: Path, engine: Engine, stub_for: Callable[[int], upscale_pb2_grpc.UpscalerStub]
) -> None:
    """4 requests of 4 tiles fill a 16-tile queue while the engine is held on their first tile;
    16 more sent meanwhile are all refused, and come back while the first four are still
    waiting for the engine."""
    tile, limit = 32, 16
    cfg = config(
        tiny_onnx_x2,
        tiling=TilingConfig(mode="grid", tile=tile, pad=4),
        batcher=BatcherConfig(max_batch=1, max_delay_ms=0.0, max_queue_tiles=limit),
    )
    image = pixels(2 * tile, 2 * tile)  # 4 tiles
    job = Job(raw_request(image), False, (4 * tile, 4 * tile, 3))
    with ThreadPoolExecutor(20) as pool, gated_server(cfg, engine) as (bg, gated):
        stub, batcher = stub_for(bg.port), bg.running.batcher
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:  # the queue bound is what bounds memory
            while not sampling.is_set():
                peak[0] = max(peak[0], batcher.queued_tiles)
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        first = [pool.submit(call, stub, job) for _ in range(4)]
        # All four admitted: one tile held at the gate, the other 15 queued.
        until(
            lambda: gated.calls == [1] and batcher.queued_tiles == limit - 1,
            "the first four requests to fill the queue",
        )
        wave = [f.result(CALL_TIMEOUT) for f in [pool.submit(call, stub, job) for _ in range(16)]]
        assert not any(f.done() for f in first)  # refused at admission, not after a wait
        gated.gate.set()
        admitted = [f.result(CALL_TIMEOUT) for f in first]
        sampling.set()
        sampler.join()
        computed, dropped = batcher.tiles_computed, batcher.tiles_dropped
    assert [r.code for r in admitted] == ["OK"] * 4
    assert all(r.answer == job.answer for r in admitted)
    assert [(r.code, r.retry_hint) for r in wave] == [("RESOURCE_EXHAUSTED", "100")] * 16
    assert computed == 4 * 4 and dropped == 0  # no refused tile reached the engine
    assert peak[0] <= limit
