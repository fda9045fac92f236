"""What a request may hold, and when it is refused: upload bytes, upload time, queue capacity
reserved at admission, output limits before compute, and the bounded codec pool.

Each test runs a real server on loopback; those that ask "what had the engine done" hold its
worker at a gate (tests/server/gated.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from server.client import AsyncUpscaleClient, UpscaleClient, UpscaleError
from server.config import BatcherConfig, LimitsConfig, ServerConfig, UploadConfig
from server.core.engine import Engine
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import RETRY_AFTER_KEY
from tests.background import BackgroundServer
from tests.server.gated import WAIT, gated_server, until
from tests.server.loopback import NO_RETRY, TILE, loopback_config

MIB = 2**20


def rss_bytes() -> int:
    """This process's resident memory (the in-process server's included)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def header(total: int, request_id: str, **fields: object) -> upscale_pb2.UpscaleChunk:
    return upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(total_bytes=total, request_id=request_id, **fields)
    )


def silent_upload(
    total: int, request_id: str, release: threading.Event
) -> Iterator[upscale_pb2.UpscaleChunk]:
    """A header announcing ``total`` bytes, then nothing until ``release``."""
    yield header(total, request_id)
    release.wait(WAIT)


def config(model: Path, **uploads: float) -> ServerConfig:
    return loopback_config(
        model,
        limits=LimitsConfig(max_request_bytes=64 * MIB, max_message_bytes=8 * MIB),
        uploads=replace(UploadConfig(), **uploads),
    )


def png(height: int, width: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return cv2.imencode(".png", rgb)[1].tobytes()


def stream_error(future: grpc.Future) -> grpc.RpcError:
    try:
        list(future)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the upload was answered, not refused")


# ----------------------------------------------------------------------------- uploads


def test_silent_stream_headers_hold_a_reservation_not_memory_and_time_out(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    """8 headers announcing 64 MiB each and sending nothing once held 512 MiB for as long as
    the client wished; now they hold budget, not memory, until the idle timeout ends them."""
    release = threading.Event()
    cfg = config(tiny_onnx_x2, idle_timeout_s=2.0, max_buffered_bytes=1024 * MIB)
    with (
        BackgroundServer(cfg, engine) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        uploads = server.running.uploads
        before = rss_bytes()
        calls = [
            stub.UpscaleStream(silent_upload(64 * MIB, f"silent-{k}", release), timeout=WAIT)
            for k in range(8)
        ]
        until(lambda: uploads.uploads == 8, "8 uploads in progress")
        assert uploads.held_bytes == 8 * 64 * MIB
        grown = rss_bytes() - before
        started = time.monotonic()
        errors = [stream_error(call) for call in calls]
        waited = time.monotonic() - started
        release.set()
        assert grown < 32 * MIB, f"8 silent headers grew the server by {grown / MIB:.0f} MiB"
        for error in errors:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no upload message for 2 s (--upload-idle-timeout)" in error.details()
        assert waited < 2.0 + 5.0
        until(lambda: uploads.uploads == 0 and uploads.held_bytes == 0, "the budget given back")


def test_upload_caps_refuse_at_the_header_with_a_retry_hint(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    release = threading.Event()
    cfg = config(tiny_onnx_x2, max_concurrent=2, max_buffered_bytes=100 * MIB)
    with (
        BackgroundServer(cfg, engine) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        uploads = server.running.uploads
        try:
            held = [
                stub.UpscaleStream(silent_upload(40 * MIB, f"held-{k}", release), timeout=WAIT)
                for k in range(2)
            ]
            until(lambda: uploads.uploads == 2, "2 uploads in progress")
            third = stream_error(
                stub.UpscaleStream(silent_upload(MIB, "third", release), timeout=WAIT)
            )
            assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 uploads are in progress" in third.details()
            assert "--max-uploads" in third.details()
            assert dict(third.trailing_metadata())[RETRY_AFTER_KEY]
            release.set()
            for call in held:
                stream_error(call)
            until(lambda: uploads.held_bytes == 0, "the budget given back")
        finally:
            release.set()
        again = threading.Event()
        first = stub.UpscaleStream(silent_upload(60 * MIB, "first", again), timeout=WAIT)
        until(lambda: uploads.held_bytes == 60 * MIB, "60 MiB held")
        over = stream_error(
            stub.UpscaleStream(silent_upload(50 * MIB, "over", again), timeout=WAIT)
        )
        again.set()
        stream_error(first)
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "hold 62914560 bytes; 52428800 more" in over.details()
        assert "--max-buffered-bytes" in over.details()


def test_a_trickling_upload_meets_the_upload_deadline(tiny_onnx_x2: Path, engine: Engine) -> None:
    data = png(64, 64)

    def trickle() -> Iterator[upscale_pb2.UpscaleChunk]:
        yield header(len(data), "trickle")
        for offset in range(0, len(data), 64):  # a chunk every 0.2 s, for longer than 1.5 s
            time.sleep(0.2)
            piece = upscale_pb2.DataChunk(offset=offset, data=data[offset : offset + 64])
            yield upscale_pb2.UpscaleChunk(data=piece)

    cfg = config(tiny_onnx_x2, idle_timeout_s=10.0, deadline_s=1.5)  # only the deadline can end it
    with (
        BackgroundServer(cfg, engine) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        error = stream_error(stub.UpscaleStream(trickle(), timeout=WAIT))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "longer than 1.5 s (--upload-deadline)" in error.details()


# --------------------------------------------------------------------------- admission


def test_an_admitted_request_is_never_refused_half_way(tiny_onnx_x2: Path, engine: Engine) -> None:
    """A 200-tile image goes in chunks of 64, two in flight; small requests that flooded the
    queue while its first chunks computed once took the room its later chunks needed, and it
    was refused after computing. Now its tiles are reserved at admission: the flood is refused
    instead, and nothing is computed for a request that is then refused."""
    cfg = loopback_config(
        tiny_onnx_x2, batcher=BatcherConfig(max_batch=4, max_delay_ms=2.0, max_queue_tiles=224)
    )
    large = png(10 * TILE, 20 * TILE, seed=1)  # 200 tiles: chunks of 64, 64, 64, 8
    small = png(2 * TILE, 2 * TILE, seed=2)  # 4 tiles
    with (
        gated_server(cfg, engine) as (server, gated),
        UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client,
        ThreadPoolExecutor(24) as pool,
    ):
        batcher = server.running.batcher
        big = pool.submit(client.upscale, large, "raw", request_id="large", timeout=WAIT)
        until(lambda: gated.calls == [4], "the large image's first batch at the gate")
        until(lambda: batcher.queued_tiles == 124, "its second chunk in the queue")
        assert batcher.reserved_tiles == 72
        flood = [
            pool.submit(client.upscale, small, "raw", request_id=f"s{k}", timeout=WAIT)
            for k in range(20)
        ]
        # 224 - 124 queued - 72 reserved = 28 tiles of room: 7 small requests fit.
        until(lambda: sum(f.done() for f in flood) == 13, "13 small requests refused")
        gated.gate.set()
        outcomes = []
        for future in flood:
            try:
                outcomes.append(future.result(WAIT))
            except UpscaleError as e:
                outcomes.append(e)
        result = big.result(WAIT)
    refused = [o for o in outcomes if isinstance(o, UpscaleError)]
    assert {e.code for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(refused) == 13 and len(outcomes) - len(refused) == 7
    assert (result.width, result.height, result.tiles) == (40 * TILE, 20 * TILE, 200)
    assert batcher.tiles_computed == 200 + 7 * 4
    assert (batcher.queued_tiles, batcher.reserved_tiles) == (0, 0)


def test_answers_that_cannot_be_given_are_refused_before_any_tile_runs(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    """A unary raw answer over the message limit, or a WebP over its 16383-pixel side, was
    refused only after all its tiles ran."""
    cfg = loopback_config(
        tiny_onnx_x2,
        limits=LimitsConfig(max_pixels=10_000 * 100, max_message_bytes=2 * MIB),
        batcher=BatcherConfig(max_batch=4, max_delay_ms=2.0, max_queue_tiles=4096),
    )
    raw = np.zeros((512, 512, 3), np.uint8)  # 1024x1024x3 = 3 MiB answer > 2 MiB message
    strip = png(16, 8200)  # x2 = 16400 pixels wide > WebP's 16383
    with gated_server(cfg, engine) as (server, gated):
        target = f"127.0.0.1:{server.port}"
        with UpscaleClient(target, retry=NO_RETRY, max_message_bytes=8 * MIB) as client:
            with pytest.raises(UpscaleError) as too_big:
                client.upscale(raw, "raw", timeout=WAIT, stream=False)
            with pytest.raises(UpscaleError) as too_wide:
                client.upscale(strip, "webp", timeout=WAIT)
        assert gated.calls == []
    assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3145728 bytes" in too_big.value.details
    assert "send it through UpscaleStream" in too_big.value.details
    assert too_wide.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "webp output is limited to 16383x16383" in too_wide.value.details


def test_decoding_and_encoding_run_on_the_bounded_codec_pool(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    cfg = replace(loopback_config(tiny_onnx_x2), decode_workers=2)
    images = [png(48, 40, seed=k) for k in range(8)]
    with (
        BackgroundServer(cfg, engine) as server,
        UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        results = list(pool.map(lambda image: client.upscale(image, timeout=WAIT), images))
        codec = [t for t in threading.enumerate() if t.name.startswith("codec")]
    assert [(r.width, r.height) for r in results] == [(80, 96)] * 8
    assert len(codec) == 2


def test_the_async_client_sees_a_refused_upload_as_the_servers_status(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    """grpc.aio reports a refusal that meets a write in progress as INTERNAL (grpc/grpc#36066);
    the client uploads only after the server acknowledged the header, so it never writes into
    a refused call and sees RESOURCE_EXHAUSTED, which it can retry."""
    release = threading.Event()
    data = png(64, 64)

    async def refused_uploads(target: str) -> list[UpscaleError]:
        errors = []
        async with AsyncUpscaleClient(target, retry=NO_RETRY) as client:
            for _ in range(20):
                with pytest.raises(UpscaleError) as error:
                    await client.upscale(data, timeout=WAIT, stream=True)
                errors.append(error.value)
        return errors

    with (
        BackgroundServer(config(tiny_onnx_x2, max_concurrent=1), engine) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        held = stub.UpscaleStream(silent_upload(MIB, "held", release), timeout=WAIT)
        until(lambda: server.running.uploads.uploads == 1, "the one upload slot taken")
        try:
            errors = asyncio.run(refused_uploads(f"127.0.0.1:{server.port}"))
        finally:
            release.set()
            stream_error(held)
        assert [e.code for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 20
        assert all("--max-uploads" in e.details for e in errors)
        with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client:
            assert client.upscale(data, timeout=WAIT, stream=True).streamed


def test_an_upload_slot_is_freed_once_the_upload_is_received(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    """--max-uploads caps uploads being received, not calls computing: a received upload keeps
    its bytes held until its call ends, but gives its slot back."""
    data = png(64, 64)
    cfg = config(tiny_onnx_x2, max_concurrent=1)
    with (
        gated_server(cfg, engine) as (server, gated),
        UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        uploads = server.running.uploads
        first = pool.submit(client.upscale, data, timeout=WAIT, stream=True)
        until(lambda: gated.calls != [], "the first upload's compute at the gate")
        assert (uploads.uploads, uploads.held_bytes) == (0, len(data))
        second = pool.submit(client.upscale, data, timeout=WAIT, stream=True)
        until(lambda: uploads.held_bytes == 2 * len(data), "the second upload received")
        gated.gate.set()
        assert first.result(WAIT).streamed and second.result(WAIT).streamed
    until(lambda: uploads.held_bytes == 0, "every byte given back")
