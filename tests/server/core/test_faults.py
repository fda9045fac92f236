"""Faults around the server: clients that give up, SIGTERM under load, broken model files.

Already covered elsewhere (not repeated here):
- the library clients' cancel (AsyncUpscaleClient) and deadline (UpscaleClient with retries)
  reach the server the same way: only the held batch is computed, and the server keeps serving
  (test_service.py, with the same gate); the batcher drops undispatched tiles exactly
  (test_batcher.py, with a test engine);
- rdn-serve drains 3 in-flight calls on SIGTERM and refuses new ones (test_main.py);
- a missing or non-protobuf model file exits 1 with one line (test_main.py); every kind of bad
  model file is a one-line ``ModelLoadError`` (test_engine.py).

Added here, on the real server with the real engine:
- cancel or deadline mid-request, cancel mid-stream (during the upload and during compute): the
  engine computes at most the one batch that was running, every other tile is dropped; measured
  with the batcher's counters while a gate holds the engine's single worker thread
  (tests/server/gated.py);
- SIGTERM while 16 clients keep calls in flight: no call the server had started fails, the
  others fail only in ways rdn-client retries, the process exits 0 within the grace period;
- a truncated model file and a file that is not ONNX end rdn-serve start-up with one line.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server.client import is_retryable
from server.config import BatcherConfig, EngineConfig, ServerConfig, TilingConfig
from server.core.engine import Engine
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.gated import (
    DEADLINES,
    WAIT,
    GatedEngine,
    call_held_at_the_gate,
    gated_server,
    until,
)

CPU = EngineConfig(providers=("CPUExecutionProvider",))
MAX_BATCH = 2
TILES = 12  # the image below: 3 x 4 tiles of 32 px
RDN_SERVE = Path(sys.executable).with_name("rdn-serve")


@pytest.fixture(scope="module")
def engine(tiny_onnx_x2: Path) -> Engine:
    return Engine(tiny_onnx_x2, CPU)


def gated_config(model: Path) -> ServerConfig:
    return ServerConfig(
        model=model,
        host="127.0.0.1",
        port=0,
        grace_s=1.0,
        engine=CPU,
        tiling=TilingConfig(mode="grid", tile=32, pad=4),
        batcher=BatcherConfig(max_batch=MAX_BATCH, max_delay_ms=0.0, max_queue_tiles=64),
    )


@pytest.fixture
def gated(engine: Engine, tiny_onnx_x2: Path) -> Iterator[tuple[BackgroundServer, GatedEngine]]:
    with gated_server(gated_config(tiny_onnx_x2), engine) as (server, gated):
        yield server, gated


def image_request(request_id: str) -> upscale_pb2.UpscaleRequest:
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)  # 3 x 4 tiles
    shape = upscale_pb2.ImageShape(height=96, width=128, channels=3)
    raw = upscale_pb2.RawImage(shape=shape, data=pixels.tobytes())
    return upscale_pb2.UpscaleRequest(raw=raw, output_format=4, request_id=request_id)


def stream_request(request_id: str, hold: threading.Event | None) -> Iterator[Any]:
    """The image as an UpscaleStream upload; with ``hold``, stops half-way until it is set."""
    request = image_request(request_id)
    data = request.raw.data
    yield upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(
            raw_shape=request.raw.shape, total_bytes=len(data), output_format=4,
            request_id=request_id,
        )
    )  # fmt: skip
    half = len(data) // 2
    yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=0, data=data[:half]))
    if hold is not None:
        hold.wait(WAIT)
    yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=half, data=data[half:]))


def access_status(caplog: pytest.LogCaptureFixture, request_id: str) -> str | None:
    for record in caplog.records:
        fields = getattr(record, "fields", None)
        if record.name == "rdn.access" and fields and fields.get("request_id") == request_id:
            return str(fields["status"])
    return None


def assert_serving(server: BackgroundServer, gated: GatedEngine) -> None:
    gated.gate.set()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = upscale_pb2_grpc.UpscalerStub(channel).Upscale(
            image_request("after"), timeout=WAIT
        )
    assert (answer.width, answer.height) == (256, 192)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_unary_call_given_up_mid_compute_costs_at_most_the_running_batch(
    engine: Engine, tiny_onnx_x2: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdn.access")

    def start(
        server: BackgroundServer, stack: ExitStack, request_id: str, deadline: float
    ) -> grpc.Future:
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        return stub.Upscale.future(image_request(request_id), timeout=deadline)

    deadlines = (WAIT,) if how == "cancel" else DEADLINES
    config = gated_config(tiny_onnx_x2)
    with call_held_at_the_gate(config, engine, start, how, deadlines) as held:
        server, gated, future, request_id = held.server, held.gated, held.call, held.request_id
        batcher = server.running.batcher
        assert gated.calls == [MAX_BATCH]  # the first batch is held at the gate
        if how == "cancel":
            assert batcher.queued_tiles == TILES - MAX_BATCH
            future.cancel()
        else:
            with pytest.raises(grpc.RpcError) as late:
                future.result(WAIT)  # the engine is held: the deadline passes first
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        until(lambda: batcher.tiles_dropped == TILES - MAX_BATCH, "the queued tiles to be dropped")
        assert (batcher.queued_tiles, batcher.pending_requests) == (0, 0)
        gated.gate.set()
        until(lambda: batcher.tiles_computed == MAX_BATCH, "the running batch to finish")
        until(lambda: access_status(caplog, request_id) is not None, "the access log line")
        assert gated.calls == [MAX_BATCH]  # one batch: the one running when the client gave up
        status = access_status(caplog, request_id)
        assert status == ("CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED")
        assert_serving(server, gated)


@pytest.mark.parametrize("stage", ["upload", "compute"])
def test_stream_cancelled_mid_way_costs_at_most_the_running_batch(
    gated: tuple[BackgroundServer, GatedEngine], stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdn.access")
    caplog.set_level(logging.DEBUG, logger="server.doors.upscaler")
    server, engine = gated
    batcher = server.running.batcher
    hold = threading.Event() if stage == "upload" else None
    request_id = f"stream-{stage}"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = upscale_pb2_grpc.UpscalerStub(channel)
            call = stub.UpscaleStream(stream_request(request_id, hold), timeout=WAIT)
            if stage == "upload":  # the header arrived, the data stops half-way
                until(
                    lambda: any(request_id in r.getMessage() for r in caplog.records),
                    "the server to read the stream header",
                )
            else:
                until(lambda: engine.calls == [MAX_BATCH], "the first batch to reach the engine")
            call.cancel()
            until(lambda: access_status(caplog, request_id) is not None, "the access log line")
            if stage == "compute":
                until(lambda: batcher.tiles_dropped == TILES - MAX_BATCH, "dropped tiles")
            engine.gate.set()
            until(lambda: batcher.queued_tiles == 0, "an empty queue")
    finally:
        if hold is not None:
            hold.set()
    assert access_status(caplog, request_id) == "CANCELLED"
    if stage == "upload":  # nothing was queued: no tile computed, none dropped
        assert (engine.calls, batcher.tiles_computed, batcher.tiles_dropped) == ([], 0, 0)
    else:
        until(lambda: batcher.tiles_computed == MAX_BATCH, "the running batch to finish")
        assert engine.calls == [MAX_BATCH]
        assert batcher.tiles_dropped == TILES - MAX_BATCH
    assert_serving(server, engine)


# ------------------------------------------------------------------------- rdn-serve process


def serve_command(*args: str) -> list[str]:
    base = [str(RDN_SERVE)] if RDN_SERVE.exists() else [sys.executable, "-m", "server.main"]
    return [*base, *args]


SERVE_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--providers", "CPUExecutionProvider")


def test_sigterm_under_load_drains_every_started_call_and_exits_0(
    tiny_onnx_x2: Path, tmp_path: Path
) -> None:
    grace = 30.0
    log_path = tmp_path / "serve.jsonl"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            serve_command(
                "--model", str(tiny_onnx_x2), *SERVE_FLAGS, "--tile", "32", "--tile-pad", "4",
                "--max-batch", "4", "--grace", str(grace), "--log-json", "--log-level", "DEBUG",
            ),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )  # fmt: skip
    try:
        port = wait_for_listening(process, log_path)
        outcomes: dict[str, str] = {}  # request_id -> client-side status
        stop = threading.Event()

        def client(k: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = upscale_pb2_grpc.UpscalerStub(channel)
                for i in range(1000):
                    request_id = f"c{k}-{i}"
                    try:
                        stub.Upscale(image_request(request_id), timeout=WAIT)
                        outcomes[request_id] = "OK"
                    except grpc.RpcError as e:
                        outcomes[request_id] = e.code().name
                        if stop.is_set():
                            return  # refused after the signal: this client is done

        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
        for thread in clients:
            thread.start()
        until(lambda: list(outcomes.values()).count("OK") >= 32, "32 answered calls under load")
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stop.set()
        code = process.wait(grace + 30)
        exited_after = time.monotonic() - signalled
        for thread in clients:
            thread.join(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    started = {
        str(e["message"]).split("request_id='")[1].split("'")[0]
        for e in entries
        if "Upscale started (request_id=" in str(e["message"])
    }
    access = {e["request_id"]: e["status"] for e in entries if e["logger"] == "rdn.access"}
    drain = next(i for i, e in enumerate(entries) if "shutting down" in str(e["message"]))
    finished_in_drain = [e for e in entries[drain:] if e["logger"] == "rdn.access"]
    assert code == 0 and exited_after < grace
    assert finished_in_drain, "SIGTERM arrived when no call was in flight: nothing was drained"
    assert started and all(access.get(r) == "OK" == outcomes.get(r) for r in started), {
        r: (access.get(r), outcomes.get(r)) for r in started if outcomes.get(r) != "OK"
    }
    # Calls the server never started: refused (UNAVAILABLE), or CANCELLED by grpc itself when
    # they were still queued inside it at the stop; rdn-client retries both.
    failed = {r: c for r, c in outcomes.items() if c != "OK"}
    assert set(failed.values()) <= {"UNAVAILABLE", "CANCELLED"} and not set(failed) & started
    assert all(is_retryable(grpc.StatusCode[code], ()) for code in ("UNAVAILABLE", "CANCELLED"))


def wait_for_listening(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        for line in log_path.read_text().splitlines():
            message = str(json.loads(line)["message"])
            if message.startswith("listening on 127.0.0.1:"):
                return int(message.split(":")[1].split()[0])
        time.sleep(0.05)
    raise AssertionError("rdn-serve did not start within 60 s")


@pytest.mark.parametrize("kind", ["truncated", "not-onnx"])
def test_broken_model_file_ends_start_up_with_one_line(
    tiny_onnx_x2: Path, tmp_path: Path, set5_dir: Path, kind: str
) -> None:
    model = tmp_path / f"{kind}.onnx"
    if kind == "truncated":  # an interrupted copy or download
        data = tiny_onnx_x2.read_bytes()
        model.write_bytes(data[: len(data) * 2 // 3])
    else:  # a real file of another kind under a model's name
        model.write_bytes((set5_dir / "baby.png").read_bytes())
    done = subprocess.run(
        serve_command("--model", str(model), *SERVE_FLAGS),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr
    assert (
        f"model file {model}: onnxruntime cannot load it, not an ONNX model or truncated?"
        in (lines[0])
    )
