"""Clients and rdn-client: pure helpers, retries against a real server, CLI subprocesses."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from server.client import (
    AnswerError,
    AsyncUpscaleClient,
    RetryPolicy,
    StreamAssembler,
    UpscaleClient,
    UpscaleError,
    backoff_s,
    channel_options,
    is_retryable,
    make_payload,
    stream_messages,
)
from server.client.files import (
    option_warnings,
    output_path,
    own_format,
    resolve_format,
    writes_single_file,
)
from server.config import BatcherConfig, ServerConfig, TilingConfig
from server.core.engine import Engine
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import UPLOAD_ACCEPTED_KEY
from tests.background import BackgroundServer
from tests.server.cli import run_cli
from tests.server.gated import gated_server, until
from tests.server.loopback import NO_RETRY, loopback_config

config = partial(loopback_config, grace_s=1.0)


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    return config(tiny_onnx_x2)


def small_png(set5_dir: Path, name: str, height: int, width: int) -> bytes:
    bgr = cv2.imread(str(set5_dir / name), cv2.IMREAD_COLOR)[:height, :width]
    ok, data = cv2.imencode(".png", bgr)
    assert ok
    return data.tobytes()


def access_statuses(caplog: pytest.LogCaptureFixture) -> dict[str, list[str]]:
    """request_id -> the statuses of its access lines so far, in order."""
    statuses: dict[str, list[str]] = {}
    for record in list(caplog.records):
        if record.name == "rdn.access":
            fields = record.fields
            statuses.setdefault(str(fields.get("request_id")), []).append(str(fields["status"]))
    return statuses


# ------------------------------------------------------------------------- pure helpers


def test_stream_messages_reassemble_to_the_payload() -> None:
    image = np.random.default_rng(0).integers(0, 256, (30, 20, 4), dtype=np.uint8)
    payload = make_payload(image)
    assert payload.raw_shape == (30, 20, 4) and payload.data == image.tobytes()
    messages = list(stream_messages(payload, "webp", 80, "id-1", chunk_bytes=1000))
    header = messages[0].header
    assert (header.raw_shape.height, header.raw_shape.width, header.raw_shape.channels) == (
        30,
        20,
        4,
    )
    assert header.total_bytes == 2400 and header.output_format == upscale_pb2.OUTPUT_FORMAT_WEBP
    assert (header.quality, header.request_id) == (80, "id-1")
    chunks = [m.data for m in messages[1:]]
    assert [c.offset for c in chunks] == [0, 1000, 2000]
    assert b"".join(c.data for c in chunks) == payload.data

    # The server's answer has the same shape: result first, then chunks.
    answer = StreamAssembler()
    result = upscale_pb2.UpscaleResponse(width=40, height=60, channels=4, scale=2, total_bytes=2400)
    answer.add(upscale_pb2.UpscaleChunk(result=result))
    for chunk in chunks:
        answer.add(upscale_pb2.UpscaleChunk(data=chunk))
    assembled = answer.result()
    assert assembled.image == payload.data and assembled.streamed and assembled.width == 40


def test_stream_assembler_refuses_a_broken_answer() -> None:
    head = upscale_pb2.UpscaleChunk(
        result=upscale_pb2.UpscaleResponse(width=2, height=2, channels=3, total_bytes=4)
    )
    gap = upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=2, data=b"ab"))
    assembler = StreamAssembler()
    with pytest.raises(ValueError, match="began with 'data'"):
        assembler.add(gap)
    assembler.add(head)
    with pytest.raises(ValueError, match="offset 2"):
        assembler.add(gap)
    with pytest.raises(ValueError, match="after 0 of 4 bytes"):
        assembler.result()


def test_make_payload_checks_arrays() -> None:
    grey = make_payload(np.zeros((5, 7), np.uint8))
    assert grey.raw_shape == (5, 7, 1) and len(grey.data) == 35
    with pytest.raises(ValueError, match="uint8"):
        make_payload(np.zeros((5, 7, 3), np.float32))
    with pytest.raises(ValueError, match="H x W x 1/3/4"):
        make_payload(np.zeros((5, 7, 2), np.uint8))


def test_make_payload_reads_the_size_of_encoded_files(set5_dir: Path) -> None:
    payload = make_payload(small_png(set5_dir, "bird.png", 30, 40))
    assert payload.raw_shape is None
    assert (payload.estimated_output_pixels, payload.channels) == (1200, 3)
    assert make_payload(b"not an image").estimated_output_pixels == 0


def test_output_naming(tmp_path: Path) -> None:
    src = Path("photos/cat.png")
    relative = Path("cat.png")
    assert output_path(relative, tmp_path, False, "jpeg", "x2") == tmp_path / "cat_x2.jpg"
    assert output_path(relative, tmp_path, False, "webp", "x4") == tmp_path / "cat_x4.webp"
    resized = output_path(Path("a/cat.png"), tmp_path, False, "png", "1000x750")
    assert resized == tmp_path / "a" / "cat_1000x750.png"
    assert output_path(relative, tmp_path / "big.png", True, "png", "x2") == tmp_path / "big.png"
    assert writes_single_file([src], tmp_path / "big.png")
    assert not writes_single_file([src], tmp_path)  # an existing folder
    assert not writes_single_file([src], tmp_path / "new_folder")  # no suffix: a folder
    assert not writes_single_file([src, src], tmp_path / "x.png")


def test_backoff_is_capped_jittered_and_respects_the_server_hint() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(0)
    delays = [backoff_s(policy, attempt, rng, None) for attempt in range(8) for _ in range(50)]
    assert min(delays) >= 0.0 and max(delays) <= 1.0
    assert max(delays[:50]) <= 0.1 < max(delays[-50:])  # grows with the attempt
    assert len(set(delays)) > 300  # jittered
    assert backoff_s(policy, 0, rng, 0.5) >= 0.5


def test_only_transient_errors_are_retried() -> None:
    hint = (("rdn-retry-after-ms", "100"),)
    assert is_retryable(grpc.StatusCode.UNAVAILABLE, ())
    assert is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, hint)
    assert not is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, ())  # too large: retry won't help
    assert not is_retryable(grpc.StatusCode.INVALID_ARGUMENT, hint)
    assert not is_retryable(grpc.StatusCode.DEADLINE_EXCEEDED, ())


def test_channel_options_one_limit_both_ways_and_round_robin() -> None:
    options = dict(channel_options(12345, "round_robin"))
    assert options["grpc.max_receive_message_length"] == 12345
    assert options["grpc.max_send_message_length"] == 12345
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    with pytest.raises(ValueError, match="round_robin"):
        channel_options(1, "random")


# ---------------------------------------------------------------------- real server


def test_round_robin_spreads_calls_over_replicas(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    """Two replicas behind one client channel (the scale-out set-up of docs/operating.md, with the
    addresses given directly instead of by a DNS name): calls alternate between them."""
    image = small_png(set5_dir, "baby.png", 20, 20)  # one tile
    with (
        BackgroundServer(config(tiny_onnx_x2), engine) as first,
        BackgroundServer(config(tiny_onnx_x2), engine) as second,
    ):

        def served() -> list[int]:  # calls answered by each replica (one tile each)
            return [bg.running.batcher.tiles_computed for bg in (first, second)]  # type: ignore[union-attr]

        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        with UpscaleClient(target, lb="round_robin", retry=NO_RETRY) as client:
            # round_robin picks among READY subchannels only: call until both have answered
            # (pick_first never gets there), then each next pick alternates between the two.
            deadline = time.monotonic() + 30
            while min(served()) == 0:
                assert time.monotonic() < deadline, f"a replica never got a call: {served()}"
                assert client.upscale(image, timeout=30).tiles == 1
            warm = served()
            for _ in range(6):
                assert client.upscale(image, timeout=30).tiles == 1
            after = served()
    assert [a - w for a, w in zip(after, warm, strict=True)] == [3, 3], (warm, after)


def test_full_queue_is_retried_until_it_has_room(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdn.access")
    # Queue of 100 tiles of 16x16, one tile per engine call: a 160x160 image (100 tiles) fills
    # it while the engine is held on its first tile, so a 144x144 one (81 tiles, sent in chunks
    # of 64) is refused until the gate opens and the queue drains.
    tight = config(
        tiny_onnx_x2,
        tiling=TilingConfig(mode="grid", tile=16, pad=2),
        batcher=BatcherConfig(max_batch=1, max_delay_ms=0, max_queue_tiles=100),
    )
    # Retried until the 60 s deadline rather than a count of attempts: the drain takes as
    # long as this machine needs for ~60 engine calls.
    retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.1)
    first = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:160, :160]
    second = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[200:344, 200:344]
    with (
        ThreadPoolExecutor(2) as pool,
        gated_server(tight, engine) as (bg, gated),
        UpscaleClient(f"127.0.0.1:{bg.port}", retry=retry) as client,
    ):
        filling = pool.submit(client.upscale, first, "raw", 0, "first", 60)
        batcher = bg.running.batcher
        until(
            lambda: gated.calls == [1] and batcher.queued_tiles == 99,
            "the first image to fill the queue",
        )
        waiting = pool.submit(client.upscale, second, "raw", 0, "second", 60)
        until(lambda: "second" in access_statuses(caplog), "the second image to be refused")
        gated.gate.set()
        assert filling.result(60).width == 320 and waiting.result(60).width == 288
        with pytest.raises(UpscaleError) as never:  # 121 tiles can never fit: not retried
            client.upscale(np.zeros((176, 176, 3), np.uint8), "raw", request_id="never")
        assert client.info(timeout=10).scale == 2  # a later call: access lines are written
    assert never.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 121 tiles" in never.value.details and "--max-queue-tiles" in never.value.details
    statuses = access_statuses(caplog)
    second_calls = statuses["second"]
    assert second_calls[-1] == "OK"
    assert len(second_calls) >= 2 and set(second_calls[:-1]) == {"RESOURCE_EXHAUSTED"}
    assert statuses["never"] == ["RESOURCE_EXHAUSTED"]


def test_image_too_large_is_not_retried(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdn.access")
    retry = RetryPolicy(max_attempts=4, initial_backoff_s=0.01)
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=retry) as client:
        too_many = np.zeros((4200, 4100), np.uint8)  # 17.2 M pixels > 16.8 M allowed
        with pytest.raises(UpscaleError) as error:
            client.upscale(too_many, request_id="huge", timeout=30)
        assert client.info(timeout=10).scale == 2  # a later call: the access line is written
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4100x4200 = 17.2 MP is over --max-pixels 4096x4096 = 16.8 MP" in error.value.details
    calls = [r.fields for r in caplog.records if r.name == "rdn.access"]
    assert len([c for c in calls if c.get("request_id") == "huge"]) == 1


def test_unreachable_server_is_unavailable_after_bounded_retries() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with UpscaleClient("127.0.0.1:1", retry=retry) as client, pytest.raises(UpscaleError) as error:
        client.upscale(np.zeros((4, 4, 3), np.uint8), timeout=10)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_dns_target_with_round_robin(server: BackgroundServer, set5_dir: Path) -> None:
    target = f"dns:///127.0.0.1:{server.port}"
    with UpscaleClient(target, lb="round_robin") as client:
        result = client.upscale(small_png(set5_dir, "head.png", 20, 30), timeout=30)
    assert (result.width, result.height) == (60, 40)


# --------------------------------------------------------------------------- the CLI


def test_cli_upscales_files_into_a_folder(
    server: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    inputs = []
    for name, (h, w) in {"bird": (24, 30), "head": (33, 17)}.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(small_png(set5_dir, f"{name}.png", h, w))
        inputs.append(str(path))
    out = tmp_path / "out"
    target = f"127.0.0.1:{server.port}"
    done = run_cli("upscale", *inputs, "-o", str(out), "--target", target, "--format", "webp")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    bird = cv2.imread(str(out / "bird_x2.webp"), cv2.IMREAD_UNCHANGED)
    head = cv2.imread(str(out / "head_x2.webp"), cv2.IMREAD_UNCHANGED)
    assert bird.shape == (48, 60, 3) and head.shape == (66, 34, 3)
    assert len(done.stdout.splitlines()) == 2


def test_cli_single_file_output_and_errors(
    server: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.png"
    src.write_bytes(small_png(set5_dir, "woman.png", 21, 19))
    target = f"127.0.0.1:{server.port}"
    dst = tmp_path / "result.jpg"
    done = run_cli(
        "upscale", str(src), "-o", str(dst), "--target", target, "--format", "jpeg",
        "--quality", "80", "--deadline", "30", "--retries", "1", "--concurrency", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cv2.imread(str(dst)).shape == (42, 38, 3)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    bad = run_cli("upscale", str(garbage), "-o", str(tmp_path / "x.png"), "--target", target)
    assert bad.returncode != 0
    assert "INVALID_ARGUMENT" in bad.stderr and "not a PNG, JPEG" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    down = run_cli("info", "--target", "127.0.0.1:1", "--retries", "0", "--deadline", "5")
    assert down.returncode != 0 and "UNAVAILABLE" in down.stderr
    assert "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1


def test_cli_info_and_health(server: BackgroundServer) -> None:
    target = f"127.0.0.1:{server.port}"
    info = run_cli("info", "--target", target)
    assert info.returncode == 0, info.stderr
    fields = json.loads(info.stdout)
    assert fields["scale"] == 2 and fields["execution_provider"] == "CPUExecutionProvider"
    assert fields["self_ensemble"] is False and fields["architecture"]["g0"] == 16

    health = run_cli("health", "--target", target)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    server.call(server.running.health.set("", not_serving))
    try:
        sick = run_cli("health", "--target", target)
    finally:
        server.call(server.running.health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert (sick.returncode, sick.stdout.strip()) == (1, "NOT_SERVING")


class LyingUpscaler(upscale_pb2_grpc.UpscalerServicer):
    """A broken or hostile server: announces an answer of 2**62 bytes."""

    def _head(self) -> upscale_pb2.UpscaleResponse:
        return upscale_pb2.UpscaleResponse(
            width=80, height=96, channels=3, scale=2, format=1, total_bytes=2**62
        )

    def Upscale(self, request: Any, context: Any) -> upscale_pb2.UpscaleResponse:
        head = self._head()
        head.image = b"\x89PNG"
        return head

    def UpscaleStream(self, requests: Any, context: Any) -> Iterator[upscale_pb2.UpscaleChunk]:
        for _ in requests:
            pass
        yield upscale_pb2.UpscaleChunk(result=self._head())
        yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=0, data=b"\x89PNG"))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_sizes_the_server_announces_are_checked_before_anything_is_allocated(
    set5_dir: Path, stream: bool
) -> None:
    """StreamAssembler allocated ``bytearray(total_bytes)`` from the server's word: 2**62 raised
    MemoryError. Every failure of a call is an UpscaleError."""
    server = grpc.server(ThreadPoolExecutor(2))
    upscale_pb2_grpc.add_UpscalerServicer_to_server(LyingUpscaler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        image = small_png(set5_dir, "bird.png", 48, 40)
        with (
            UpscaleClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client,
            pytest.raises(UpscaleError) as error,
        ):
            client.upscale(image, timeout=10, stream=stream)
    finally:
        server.stop(0)
    assert error.value.code == grpc.StatusCode.DATA_LOSS
    assert f"announces {2**62} bytes, more than this request can produce" in error.value.details


def test_raw_answers_must_match_their_shape() -> None:
    head = upscale_pb2.UpscaleResponse(width=4, height=4, channels=3, format=4, total_bytes=47)
    with pytest.raises(AnswerError, match=r"announces 47 bytes for 4x4x3 \(= 48\)"):
        StreamAssembler().add(upscale_pb2.UpscaleChunk(result=head))


class AbortingUpscaler(upscale_pb2_grpc.UpscalerServicer):
    """Accepts an upload's header, reads one chunk, then ends the call as a draining server
    would."""

    def UpscaleStream(self, requests: Any, context: Any) -> Iterator[upscale_pb2.UpscaleChunk]:
        next(requests)  # the header
        context.send_initial_metadata(((UPLOAD_ACCEPTED_KEY, "1"),))
        next(requests)  # one data chunk
        context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry the call")
        yield upscale_pb2.UpscaleChunk()  # not reached


def test_a_call_ended_mid_upload_is_retryable_for_the_async_client() -> None:
    """grpc.aio reports a call the server ended while a write was in progress as INTERNAL
    (grpc/grpc#36066), which is not retried; the client answers it UNAVAILABLE."""
    server = grpc.server(ThreadPoolExecutor(2))
    upscale_pb2_grpc.add_UpscalerServicer_to_server(AbortingUpscaler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    image = np.zeros((1000, 1000, 3), np.uint8)  # 3 MB: many chunks still to send

    async def uploads() -> list[UpscaleError]:
        errors = []
        async with AsyncUpscaleClient(
            f"127.0.0.1:{port}", retry=NO_RETRY, chunk_bytes=64 * 2**10
        ) as client:
            for _ in range(8):
                with pytest.raises(UpscaleError) as error:
                    await client.upscale(image, "raw", timeout=20, stream=True)
                errors.append(error.value)
        return errors

    try:
        errors = asyncio.run(uploads())
    finally:
        server.stop(0)
    assert {e.code for e in errors} == {grpc.StatusCode.UNAVAILABLE}


def test_output_format_follows_the_file_name_unless_given() -> None:
    assert resolve_format(Path("x.webp"), True, None) == "webp"
    assert resolve_format(Path("x.JPG"), True, None) == "jpeg"
    assert resolve_format(Path("x.tiff"), True, None) == "tiff"
    assert resolve_format(Path("x.bmp"), True, None) == "png"  # not an output format: PNG
    assert resolve_format(Path("out"), False, None) is None  # a folder: each file's own kind
    names = ("a.gif", "b.JPG", "c.tif", "d.heic", "e.avif", "f.TIFF", "g.bmp")
    assert [own_format(Path(n)) for n in names] == [
        *("gif", "jpeg", "tiff", "png", "avif", "tiff", "png")
    ]
    assert resolve_format(Path("x.webp"), True, "png") == "png"
    assert option_warnings(Path("x.png"), True, "png", 80) == [
        "--quality 80 has no effect on PNG output (lossless)"
    ]
    assert option_warnings(Path("x.tif"), True, "tiff", 80) == [
        "--quality 80 has no effect on TIFF output (lossless)"
    ]
    assert option_warnings(Path("x.webp"), True, "png", 0) == [
        "writing png data to x.webp (--format png overrides the name)"
    ]
    assert option_warnings(Path("x.webp"), True, "webp", 90) == []


def test_cli_writes_webp_for_a_webp_name_and_warns_about_quality_on_png(
    server: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.png"
    src.write_bytes(small_png(set5_dir, "bird.png", 20, 24))
    target = f"127.0.0.1:{server.port}"
    done = run_cli("upscale", str(src), "-o", str(tmp_path / "x.webp"), "--target", target)
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "x.webp").read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    done = run_cli(
        "upscale", str(src), "-o", str(tmp_path / "y.png"), "--target", target, "--quality", "80"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "y.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--quality 80 has no effect on PNG output" in done.stderr
