"""The Upscaler service end to end: a real gRPC server on 127.0.0.1:0, real onnxruntime, real files.

Expected pixels come from running the same engine on the same tiles directly (exact), so any
error in decode, tiling, batching, stitching, channel handling or encoding shows up.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rdn.ensemble import N_TRANSFORMS, inverse_transform, transform
from server.client import (
    AsyncUpscaleClient,
    ImageOptions,
    RetryPolicy,
    UpscaleClient,
    UpscaleError,
    UpscaleResult,
)
from server.config import BatcherConfig, LimitsConfig, TilingConfig
from server.core.engine import Engine
from server.core.tiling import merge_tiles, plan_tiles, split_tiles
from server.imaging.codec import decode_image
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.gated import call_held_at_the_gate, gated_server, until
from tests.server.loopback import MAX_BATCH, NO_RETRY, PAD, TILE, loopback_config
from tests.server.reference import from_planar, to_planar

CALL_TIMEOUT = 60.0  # seconds: generous bound so a broken server fails the test, not hangs it


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[upscale_pb2_grpc.UpscalerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield upscale_pb2_grpc.UpscalerStub(channel)


# ------------------------------------------------------------------------------- images


def photo(
    set5_dir: Path, height: int, width: int, name: str = "head.png", y: int = 40
) -> np.ndarray:
    """An RGB crop of a Set5 photograph."""
    bgr = cv2.imread(str(set5_dir / name), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[y : y + height, 20 : 20 + width]
    )


def encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
        image = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
    else:
        image = rgb
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def with_private_chunk(png: bytes, size: int) -> bytes:
    """A valid PNG made ``size`` bytes larger by an ancillary chunk that decoders skip."""
    body = b"\0" * size
    chunk = struct.pack(">I", size) + b"rdNx" + body
    chunk += struct.pack(">I", zlib.crc32(b"rdNx" + body) & 0xFFFFFFFF)
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


def tiled_reference(
    engine: Engine, rgb: np.ndarray, tile: int = TILE, pad: int = PAD
) -> np.ndarray:
    """What the server must answer for ``rgb``: the engine on the same tiles, stitched."""
    plan = plan_tiles(rgb.shape[0], rgb.shape[1], tile, pad)
    outputs = engine.run(split_tiles(to_planar(rgb), plan))
    return from_planar(merge_tiles(outputs, plan, engine.scale))


def assert_close_to(actual: np.ndarray, expected: np.ndarray, max_diff: int = 0) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert int(diff.max()) <= max_diff, f"max abs difference {int(diff.max())} > {max_diff}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# -------------------------------------------------------------------------------- tests


def test_png_round_trip_odd_size_matches_tiled_engine(
    client: UpscaleClient, engine: Engine, set5_dir: Path
) -> None:
    rgb = photo(set5_dir, 37, 53)
    result = client.upscale(
        encode(rgb, ".png"), "raw", request_id="odd-37x53", timeout=CALL_TIMEOUT
    )
    assert (result.width, result.height, result.channels, result.scale) == (106, 74, 3, 2)
    assert result.format == "raw" and not result.streamed
    assert result.request_id == "odd-37x53"
    assert result.tiles == 2 * 2  # ceil(37/32) x ceil(53/32)
    assert result.compute_seconds > 0 and result.total_seconds >= result.compute_seconds
    assert_close_to(result.to_array(), tiled_reference(engine, rgb))

    png = client.upscale(encode(rgb, ".png"), "png", timeout=CALL_TIMEOUT)
    assert png.image.startswith(b"\x89PNG") and png.format == "png"
    assert_close_to(png.to_array(), tiled_reference(engine, rgb))


def test_tiled_answer_is_close_to_whole_image_inference(
    client: UpscaleClient, engine: Engine, set5_dir: Path
) -> None:
    rgb = photo(set5_dir, 64, 64)
    result = client.upscale(rgb, "raw", timeout=CALL_TIMEOUT)
    whole = from_planar(engine.run(to_planar(rgb)[None])[0])
    # Tiles see reflected context at borders and seams where the whole image sees zero padding
    # and real neighbours: close, not equal (the tiling tests measure the gap in detail).
    assert psnr(result.to_array(), whole) > 30.0
    assert not np.array_equal(result.to_array(), whole)


@pytest.mark.parametrize("ext,params", [(".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90)), (".webp", ())])
def test_jpeg_and_webp_inputs(
    client: UpscaleClient, engine: Engine, set5_dir: Path, ext: str, params: tuple[int, ...]
) -> None:
    data = encode(photo(set5_dir, 40, 48), ext, *params)
    decoded = decode_image(data, 10**6, 10**6).rgb  # the lossy file's own pixels
    result = client.upscale(data, "raw", timeout=CALL_TIMEOUT)
    assert_close_to(result.to_array(), tiled_reference(engine, decoded))


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_jpeg_and_webp_outputs(
    client: UpscaleClient, engine: Engine, set5_dir: Path, fmt: str, magic: bytes
) -> None:
    rgb = photo(set5_dir, 40, 48)
    result = client.upscale(rgb, fmt, quality=90, timeout=CALL_TIMEOUT)
    assert result.image.startswith(magic) and result.format == fmt
    assert psnr(result.to_array(), tiled_reference(engine, rgb)) > 30.0


def test_raw_input_and_output(client: UpscaleClient, engine: Engine, set5_dir: Path) -> None:
    rgb = photo(set5_dir, 33, 31)
    result = client.upscale(rgb, "raw", timeout=CALL_TIMEOUT)
    assert result.to_array().shape == (66, 62, 3)
    assert_close_to(result.to_array(), tiled_reference(engine, rgb))


def test_greyscale_stays_greyscale(client: UpscaleClient, engine: Engine, set5_dir: Path) -> None:
    grey = cv2.cvtColor(photo(set5_dir, 30, 45), cv2.COLOR_RGB2GRAY)
    result = client.upscale(encode(grey, ".png"), "png", timeout=CALL_TIMEOUT)
    assert result.channels == 1
    out = result.to_array()
    assert out.shape == (60, 90, 1)
    expected = cv2.cvtColor(tiled_reference(engine, np.dstack([grey] * 3)), cv2.COLOR_RGB2GRAY)
    assert_close_to(out[:, :, 0], expected)


def test_rgba_keeps_an_upscaled_alpha(
    client: UpscaleClient, engine: Engine, set5_dir: Path
) -> None:
    rgb = photo(set5_dir, 36, 40)
    alpha = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (36, 1))
    alpha[10:20, 5:15] = 0  # a hole with sharp edges
    result = client.upscale(encode(np.dstack([rgb, alpha]), ".png"), "png", timeout=CALL_TIMEOUT)
    out = result.to_array()
    assert result.channels == 4 and out.shape == (72, 80, 4)
    assert_close_to(out[:, :, :3], tiled_reference(engine, rgb))
    # by default the model upscales the alpha as a grey image through the same tiles
    by_model = tiled_reference(engine, np.dstack([alpha] * 3))
    assert_close_to(out[:, :, 3], cv2.cvtColor(by_model, cv2.COLOR_RGB2GRAY))
    bicubic = client.upscale(
        encode(np.dstack([rgb, alpha]), ".png"),
        "png",
        timeout=CALL_TIMEOUT,
        image=ImageOptions(alpha="bicubic"),
    ).to_array()
    assert_close_to(bicubic[:, :, :3], tiled_reference(engine, rgb))
    assert_close_to(bicubic[:, :, 3], cv2.resize(alpha, (80, 72), interpolation=cv2.INTER_CUBIC))


def test_large_request_travels_by_stream_under_a_4_mib_limit(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    limit = 4 * 2**20
    rgb = photo(set5_dir, 48, 64)
    data = with_private_chunk(encode(rgb, ".png"), 5 * 2**20)  # > 4 MiB file, few pixels
    config = loopback_config(tiny_onnx_x2, limits=LimitsConfig(max_message_bytes=limit))
    with BackgroundServer(config, engine) as bg:
        target = f"127.0.0.1:{bg.port}"
        with UpscaleClient(target, max_message_bytes=limit, retry=NO_RETRY) as small:
            result = small.upscale(data, "raw", timeout=CALL_TIMEOUT)
            assert result.streamed
            assert_close_to(result.to_array(), tiled_reference(engine, rgb))
            with pytest.raises(UpscaleError) as refused:  # the limit is real
                small.upscale(data, "raw", timeout=CALL_TIMEOUT, stream=False)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_large_request_in_one_message_with_raised_limits(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    limit = 16 * 2**20
    rgb = photo(set5_dir, 48, 64)
    data = with_private_chunk(encode(rgb, ".png"), 5 * 2**20)
    config = loopback_config(tiny_onnx_x2, limits=LimitsConfig(max_message_bytes=limit))
    with (
        BackgroundServer(config, engine) as bg,
        UpscaleClient(f"127.0.0.1:{bg.port}", max_message_bytes=limit) as big,
    ):
        result = big.upscale(data, "raw", timeout=CALL_TIMEOUT)
    assert not result.streamed
    assert_close_to(result.to_array(), tiled_reference(engine, rgb))


def test_large_answer_comes_back_in_chunks(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    limit = 512 * 2**10  # a small limit keeps the image small on CPU
    rgb = photo(set5_dir, 224, 224, name="baby.png", y=0)
    config = loopback_config(
        tiny_onnx_x2,
        tiling=TilingConfig(56, PAD, "grid"),
        limits=LimitsConfig(max_message_bytes=limit),
    )
    with (
        BackgroundServer(config, engine) as bg,
        UpscaleClient(f"127.0.0.1:{bg.port}", max_message_bytes=limit) as c,
    ):
        result = c.upscale(rgb, "raw", timeout=CALL_TIMEOUT)
        with pytest.raises(UpscaleError) as too_big:  # forced into one message: refused
            c.upscale(rgb, "raw", timeout=CALL_TIMEOUT, stream=False)
    assert result.streamed and len(result.image) == 448 * 448 * 3 > limit
    assert_close_to(result.to_array(), tiled_reference(engine, rgb, tile=56))
    assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "send it through UpscaleStream" in too_big.value.details


def test_eight_concurrent_requests_all_correct_and_batched_together(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    """The engine is held on the first batch until all eight requests are queued: every later
    engine call is full, so tiles of different requests share calls and each answer must
    still get exactly its own tiles back."""
    images = [photo(set5_dir, 30 + 3 * i, 40 + 2 * i, y=10 * i) for i in range(8)]
    tiles = sum(plan_tiles(*img.shape[:2], TILE, PAD).count for img in images)  # 30
    with (
        ThreadPoolExecutor(8) as pool,
        gated_server(loopback_config(tiny_onnx_x2), engine) as (server, gated),
        UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c,
    ):
        batcher = server.running.batcher
        futures = [
            pool.submit(c.upscale, img, "raw", 0, f"c{i}", CALL_TIMEOUT)
            for i, img in enumerate(images)
        ]
        until(
            lambda: len(gated.calls) == 1 and batcher.queued_tiles == tiles - gated.calls[0],
            "all eight requests queued behind the held first batch",
        )
        gated.gate.set()
        results = [f.result(CALL_TIMEOUT) for f in futures]
        first, rest = gated.calls[0], tiles - gated.calls[0]
        assert batcher.engine_calls == len(gated.calls)
    for i, (img, result) in enumerate(zip(images, results, strict=True)):
        assert result.request_id == f"c{i}"
        assert_close_to(result.to_array(), tiled_reference(engine, img))
    assert sum(r.tiles for r in results) == tiles
    full, left = divmod(rest, MAX_BATCH)
    assert gated.calls == [first] + [MAX_BATCH] * full + ([left] if left else [])


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def access_records(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, object]]:
    """request_id -> access log fields of the calls logged so far."""
    return {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "rdn.access"}


def test_client_cancellation_drops_queued_tiles(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling the asyncio task of AsyncUpscaleClient.upscale cancels the call on the server:
    with the engine held on the first tile, the other 24 are dropped and never computed."""
    caplog.set_level(logging.INFO, logger="rdn.access")
    config = loopback_config(tiny_onnx_x2, batcher=BatcherConfig(max_batch=1, max_delay_ms=0))
    rgb = photo(set5_dir, 160, 160)  # 25 tiles, one per engine call
    with gated_server(config, engine) as (bg, gated):
        batcher = bg.running.batcher

        async def cancel_mid_flight() -> None:
            async with AsyncUpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as c:
                call = c.upscale(rgb, "raw", request_id="to-cancel", timeout=CALL_TIMEOUT)
                task = asyncio.ensure_future(call)
                while not gated.calls:  # bounded by bg.call's timeout
                    await asyncio.sleep(0.002)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        bg.call(cancel_mid_flight(), timeout=CALL_TIMEOUT)  # one event loop for grpc.aio
        until(lambda: batcher.tiles_dropped == 24, "the 24 queued tiles to be dropped")
        assert (batcher.queued_tiles, batcher.pending_requests) == (0, 0)
        until(lambda: "to-cancel" in access_records(caplog), "the access log line")
        assert access_records(caplog)["to-cancel"]["status"] == "CANCELLED"
        gated.gate.set()
        with UpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as again:
            small = photo(set5_dir, 20, 20)
            assert_close_to(again.upscale(small, "raw").to_array(), tiled_reference(engine, small))
        assert gated.calls == [1, 1]  # the tile held at the cancel, then the small image's
        assert batcher.tiles_computed == 2


def test_deadline_exceeded_then_server_keeps_serving(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """UpscaleClient (retries allowed) reports DEADLINE_EXCEEDED; the server drops the tiles
    queued behind the batch held at the deadline, and answers the next call."""
    caplog.set_level(logging.INFO, logger="rdn.access")
    config = loopback_config(tiny_onnx_x2, batcher=BatcherConfig(max_batch=1, max_delay_ms=0))
    rgb = photo(set5_dir, 160, 160)  # 25 tiles, one per engine call

    def start(
        bg: BackgroundServer, stack: ExitStack, request_id: str, deadline: float
    ) -> Future[UpscaleResult]:
        target = f"127.0.0.1:{bg.port}"
        c = stack.enter_context(UpscaleClient(target, retry=RetryPolicy(max_attempts=3)))
        pool = stack.enter_context(ThreadPoolExecutor(1))
        return pool.submit(c.upscale, rgb, "raw", 0, request_id, deadline)

    with call_held_at_the_gate(config, engine, start, "too-late") as held:
        bg, gated, request_id = held.server, held.gated, held.request_id
        batcher = bg.running.batcher
        with pytest.raises(UpscaleError) as late:
            held.call.result(CALL_TIMEOUT)  # the engine is held: the deadline passes first
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        until(lambda: request_id in access_records(caplog), "the access log line")
        assert access_records(caplog)[request_id]["status"] == "DEADLINE_EXCEEDED"
        until(lambda: batcher.tiles_dropped == 24, "the 24 queued tiles to be dropped")
        assert (batcher.queued_tiles, batcher.pending_requests) == (0, 0)
        gated.gate.set()
        with UpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as again:
            small = photo(set5_dir, 20, 20)
            assert_close_to(again.upscale(small, "raw").to_array(), tiled_reference(engine, small))
        assert gated.calls == [1, 1]  # the tile held at the deadline, then the small image's
        assert batcher.tiles_computed == 2


def test_deadline_while_uploading(server: BackgroundServer) -> None:
    """A client that stalls mid-upload runs into its deadline; the server answers others."""
    release = threading.Event()

    def stalled() -> Iterator[upscale_pb2.UpscaleChunk]:
        yield _header(10)
        yield _data(0, b"abc")
        release.wait(10)

    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target) as channel:
        call = upscale_pb2_grpc.UpscalerStub(channel).UpscaleStream(stalled(), timeout=0.3)
        with pytest.raises(grpc.RpcError) as late:
            list(call)
        release.set()
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with UpscaleClient(target, retry=NO_RETRY) as c:
        assert c.info(timeout=5).scale == 2


def test_self_ensemble_averages_the_eight_views(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    rgb = photo(set5_dir, 30, 41)
    planar = to_planar(rgb)[None]
    total = np.zeros((1, 3, 60, 82))
    for i in range(N_TRANSFORMS):
        view = transform(planar, i)[0]
        plan = plan_tiles(view.shape[1], view.shape[2], TILE, PAD)
        sr = merge_tiles(engine.run(split_tiles(view, plan)), plan, 2)
        total += inverse_transform(sr[None], i)
    expected = from_planar((total / N_TRANSFORMS)[0].astype(np.float32))
    config = loopback_config(tiny_onnx_x2, self_ensemble=True)
    with (
        BackgroundServer(config, engine) as bg,
        UpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as c,
    ):
        assert c.info().self_ensemble
        result = c.upscale(rgb, "raw", timeout=CALL_TIMEOUT)
    assert result.tiles == N_TRANSFORMS * 2  # 1x2 tiles of 30x41, 2x1 of the turned views
    assert_close_to(result.to_array(), expected)
    assert not np.array_equal(result.to_array(), tiled_reference(engine, rgb))


def test_model_info_fills_every_field(client: UpscaleClient, engine: Engine) -> None:
    info = client.info()
    assert info.name == "rdn_x2" and info.scale == 2
    arch = info.architecture
    assert (arch.g0, arch.d, arch.c, arch.g, arch.norm) == (16, 3, 3, 16, "batch")  # tiny preset
    assert info.precision == "float32"
    assert len(info.weights_sha256) == 64 and info.training_step == 3
    assert info.execution_provider == "CPUExecutionProvider" == engine.active_provider
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert (info.tile_size, info.tile_pad, info.max_batch) == (TILE, PAD, 4)
    assert (info.max_delay_ms, info.max_queue_tiles) == (2.0, 4096)
    limits = LimitsConfig()
    assert info.max_pixels == limits.max_pixels
    assert info.max_request_bytes == limits.max_request_bytes
    assert info.max_message_bytes == limits.max_message_bytes
    assert list(info.input_formats) == [
        *("png", "jpeg", "webp", "bmp", "tiff", "avif", "heic", "gif", "apng", "raw")
    ]
    assert list(info.output_formats) == [1, 2, 3, 4, 20, 21, 22]  # AVIF, GIF, TIFF at the end
    assert info.self_ensemble is False


def test_access_log_one_line_per_request_without_image_bytes(
    client: UpscaleClient, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="rdn.access"):
        client.upscale(photo(set5_dir, 20, 24), "png", request_id="logged-1")
        with pytest.raises(UpscaleError):
            client.upscale(b"garbage!", request_id="logged-2")
        _wait_until(lambda: len([r for r in caplog.records if r.name == "rdn.access"]) >= 2)
    records = access_records(caplog)
    ok, bad = records["logged-1"], records["logged-2"]
    assert ok["method"] == "Upscale" and ok["status"] == "OK"
    assert (ok["width"], ok["height"], ok["channels"], ok["tiles"]) == (24, 20, 3, 1)
    assert {"queue_ms", "compute_ms", "total_ms"} <= ok.keys()
    assert bad["status"] == "INVALID_ARGUMENT"
    for fields in (ok, bad):
        assert all(
            not isinstance(v, bytes | bytearray) and len(str(v)) < 100 for v in fields.values()
        )


def cropping_model(path: Path) -> Path:
    """A real ONNX upscaler by 2 that crops its output to at most 32x32: right on the 16x16
    input that measures its scale at load (so it loads, with rdn.scale 2), wrong on larger
    tiles: it fails only when serving."""
    x = helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["n", 3, "H", "W"])
    constants = [
        helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [32, 32]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
    ]
    nodes = [
        helper.make_node("Resize", ["lr", "", "scales"], ["x2"], mode="nearest"),
        helper.make_node("Slice", ["x2", "starts", "ends", "axes"], ["sr"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    helper.set_model_props(model, {"rdn.scale": "2"})
    onnx.save(model, str(path))
    return path


def test_unexpected_error_is_internal_with_a_generic_message_and_a_logged_traceback(
    tmp_path: Path, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = loopback_config(cropping_model(tmp_path / "cropping.onnx"))
    with (
        caplog.at_level(logging.ERROR, logger="server.doors.grpc_calls"),
        BackgroundServer(config) as bg,
        UpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as c,
    ):
        with pytest.raises(UpscaleError) as error:
            c.upscale(photo(set5_dir, 20, 20), "png", request_id="doomed", timeout=CALL_TIMEOUT)
        assert c.info(timeout=10).scale == 2  # still serving
    assert error.value.code == grpc.StatusCode.INTERNAL
    assert error.value.details == "internal error; the server logged the details"
    (record,) = [r for r in caplog.records if r.name == "server.doors.grpc_calls"]
    assert "doomed" in record.getMessage() and record.exc_info is not None
    assert "tile outputs have shape" in str(record.exc_info[1])  # the cause, in the log only


# ---------------------------------------------------------------------------- bad input


def _raw(h: int, w: int, c: int, data: bytes) -> upscale_pb2.UpscaleRequest:
    shape = upscale_pb2.ImageShape(height=h, width=w, channels=c)
    return upscale_pb2.UpscaleRequest(raw=upscale_pb2.RawImage(shape=shape, data=data))


BAD_UNARY = [
    ("empty image", upscale_pb2.UpscaleRequest(encoded=b""), "INVALID_ARGUMENT", "empty"),
    ("no image", upscale_pb2.UpscaleRequest(), "INVALID_ARGUMENT", "no image"),
    (
        "garbage",
        upscale_pb2.UpscaleRequest(encoded=b"not an image at all"),
        "INVALID_ARGUMENT",
        "PNG, JPEG",
    ),
    (
        "unknown format",
        upscale_pb2.UpscaleRequest(encoded=b"x", output_format=9),
        "INVALID_ARGUMENT",
        "output_format 9 is not a known OutputFormat; accepted: 0 UNSPECIFIED (= PNG, an "
        "animation's own kind), 1 PNG",
    ),
    (
        "quality 101",
        upscale_pb2.UpscaleRequest(encoded=b"x", quality=101),
        "INVALID_ARGUMENT",
        "quality 101",
    ),
    ("raw shape mismatch", _raw(4, 4, 3, b"\0" * 47), "INVALID_ARGUMENT", "needs exactly 48 bytes"),
    ("raw channels", _raw(4, 4, 2, b"\0" * 32), "INVALID_ARGUMENT", "channels must be 1"),
    ("too many pixels", _raw(5000, 4000, 1, b"\0"), "RESOURCE_EXHAUSTED", "is over --max-pixels"),
    (
        "long request id",
        upscale_pb2.UpscaleRequest(encoded=b"x", request_id="r" * 129),
        "INVALID_ARGUMENT",
        "at most 128",
    ),
]


@pytest.mark.parametrize("name,request_,code,message", BAD_UNARY, ids=[b[0] for b in BAD_UNARY])
def test_bad_unary_requests(
    stub: upscale_pb2_grpc.UpscalerStub,
    client: UpscaleClient,
    set5_dir: Path,
    name: str,
    request_: upscale_pb2.UpscaleRequest,
    code: str,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Upscale(request_, timeout=CALL_TIMEOUT)
    assert error.value.code().name == code
    assert message in error.value.details()
    assert client.upscale(photo(set5_dir, 16, 16), "raw").width == 32  # still serving


def _header(total: int, **fields: object) -> upscale_pb2.UpscaleChunk:
    return upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(total_bytes=total, **fields)
    )


def _data(offset: int, data: bytes) -> upscale_pb2.UpscaleChunk:
    return upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=data))


PNG_BYTES = 100  # the bad streams below announce this many bytes
BAD_STREAMS = [
    ("no messages", [], "INVALID_ARGUMENT", "ended before its header"),
    ("data before header", [_data(0, b"ab")], "INVALID_ARGUMENT", "began with a data chunk"),
    (
        "second header",
        [_header(10), _data(0, b"ab"), _header(10)],
        "INVALID_ARGUMENT",
        "second header",
    ),
    (
        "out of order",
        [_header(10), _data(0, b"ab"), _data(5, b"cd")],
        "INVALID_ARGUMENT",
        "offset 5 is out of order: expected offset 2",
    ),
    (
        "too many bytes",
        [_header(3), _data(0, b"abcd")],
        "INVALID_ARGUMENT",
        "more than header.total_bytes=3",
    ),
    (
        "truncated",
        [_header(10), _data(0, b"abcd")],
        "INVALID_ARGUMENT",
        "ended after 4 of header.total_bytes=10",
    ),
    ("zero bytes", [_header(0)], "INVALID_ARGUMENT", "total_bytes is 0"),
    ("over request limit", [_header(2**40)], "RESOURCE_EXHAUSTED", "is over --max-request-bytes"),
    ("unknown format", [_header(10, output_format=7)], "INVALID_ARGUMENT", "output_format 7"),
    ("garbage bytes", [_header(4), _data(0, b"abcd")], "INVALID_ARGUMENT", "not a PNG, JPEG"),
]


@pytest.mark.parametrize("name,messages,code,message", BAD_STREAMS, ids=[b[0] for b in BAD_STREAMS])
def test_bad_streams(
    stub: upscale_pb2_grpc.UpscalerStub,
    client: UpscaleClient,
    set5_dir: Path,
    name: str,
    messages: list[upscale_pb2.UpscaleChunk],
    code: str,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.UpscaleStream(iter(messages), timeout=CALL_TIMEOUT))
    assert error.value.code().name == code
    assert message in error.value.details()
    assert client.upscale(photo(set5_dir, 16, 16), "raw", stream=True).width == 32


def test_server_thread_is_not_blocked_by_a_slow_client(server: BackgroundServer) -> None:
    """A stream whose sender stalls holds only its own call: others are answered meanwhile."""
    target = f"127.0.0.1:{server.port}"
    release = threading.Event()

    def stalled() -> Iterator[upscale_pb2.UpscaleChunk]:
        yield _header(10)
        release.wait(10)

    with grpc.insecure_channel(target) as channel:
        call = upscale_pb2_grpc.UpscalerStub(channel).UpscaleStream(stalled(), timeout=CALL_TIMEOUT)
        with UpscaleClient(target, retry=NO_RETRY) as c:
            assert c.info(timeout=5).scale == 2
        release.set()
        with pytest.raises(grpc.RpcError) as error:
            list(call)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
