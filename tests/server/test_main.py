"""rdn-serve as a real process: start-up errors, SIGTERM drain, JSON logs; flags -> ServerConfig."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdn.metadata import KEY_NAME, read_metadata
from server.app import ServerStartError
from server.client import (
    RetryPolicy,
    StreamAssembler,
    UpscaleClient,
    UpscaleError,
    make_payload,
    stream_messages,
)
from server.config import (
    BatcherConfig,
    EngineConfig,
    LimitsConfig,
    ServerConfig,
    TilingConfig,
    UploadConfig,
)
from server.core.engine import Engine
from server.core.sizing import SizeOptions
from server.main import build_parser, config_from_args
from server.models import MODELS_DIR
from server.ops.logging_setup import JsonFormatter, TextFormatter
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer

RDN_SERVE = Path(sys.executable).with_name("rdn-serve")  # the declared console script
START_TIMEOUT = 60.0  # seconds for a subprocess to print its first lines
FAST_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--tile", "32", "--tile-pad", "4")
CPU_FLAGS = ("--providers", "CPUExecutionProvider")


def serve_command(*args: str) -> list[str]:
    base = [str(RDN_SERVE)] if RDN_SERVE.exists() else [sys.executable, "-m", "server.main"]
    return [*base, *args]


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(*args), capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other socket is listening on: binding it must fail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ------------------------------------------------------------------------ start-up errors


def assert_one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_model_exits_1_with_one_line_before_binding(held_port: int) -> None:
    # The port is taken: had the server bound first, the error would be about the port.
    done = run_serve(
        "--model", "/nonexistent/model.onnx", "--host", "127.0.0.1", "--port", str(held_port),
        *CPU_FLAGS,
    )  # fmt: skip
    assert_one_error_line(done, "/nonexistent/model.onnx", "no such file")


def test_corrupt_model_exits_1_with_one_line(tmp_path: Path, held_port: int) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    done = run_serve(
        "--model", str(corrupt), "--host", "127.0.0.1", "--port", str(held_port), *CPU_FLAGS
    )
    assert_one_error_line(done, str(corrupt), "not an ONNX model")


def test_scale_mismatch_exits_1(tiny_onnx_x2: Path) -> None:
    done = run_serve("--model", str(tiny_onnx_x2), "--scale", "3", *FAST_FLAGS, *CPU_FLAGS)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert "--scale 3" in error and "upscales x2" in error
    assert "listening on" not in done.stderr


def test_a_scale_the_model_folder_lacks_lists_the_scales_found(
    tiny_onnx_factory: Callable[[int], Path], tmp_path: Path
) -> None:
    for scale in (2, 4):
        shutil.copy(tiny_onnx_factory(scale), tmp_path / f"tiny_x{scale}.onnx")
    done = run_serve("--model-dir", str(tmp_path), "--scale", "3", *FAST_FLAGS, *CPU_FLAGS)
    assert_one_error_line(done, f"no x3 model in {tmp_path}", "scales found: x2, x4")


def test_two_files_with_one_name_exit_1_naming_both(tiny_onnx_x2: Path, tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(tiny_onnx_x2, tmp_path / name)
    done = run_serve("--model-dir", str(tmp_path), *FAST_FLAGS, *CPU_FLAGS)
    assert_one_error_line(done, "two model files are both named 'rdn_x2'", "a.onnx", "b.onnx")


def test_without_flags_every_shipped_model_is_served_on_one_port() -> None:
    server = ServerProcess(*FAST_FLAGS, *CPU_FLAGS, "--threads", "1", "--log-json")
    try:
        started = server.wait_for("listening on 127.0.0.1:")
        port = int(str(started["message"]).split("listening on 127.0.0.1:")[1].split()[0])
        with UpscaleClient(f"127.0.0.1:{port}") as client:
            models = client.models(timeout=30)
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    shipped = {read_metadata(p)[KEY_NAME] for p in MODELS_DIR.glob("*.onnx")}
    assert {"rdn_x2", "rdn_x3", "rdn_x4", "rdn_x2_photo", "rdn_x4_photo"} <= shipped
    assert models[0].name == "rdn_x2" and {m.name for m in models} == shipped
    assert "rdn_x2 (x2, default)" in str(started["message"])


def test_sighup_rescans_the_model_folder(
    tiny_onnx_factory: Callable[[int], Path], tmp_path: Path, set5_dir: Path
) -> None:
    shutil.copy(tiny_onnx_factory(2), tmp_path / "x2.onnx")
    server = ServerProcess("--model-dir", str(tmp_path), *FAST_FLAGS, *CPU_FLAGS, "--log-json")
    try:
        started = server.wait_for("listening on 127.0.0.1:")
        port = int(str(started["message"]).split("listening on 127.0.0.1:")[1].split()[0])
        shutil.copy(tiny_onnx_factory(4), tmp_path / "x4.onnx")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("model repository re-scanned: 2 models served")
        with UpscaleClient(f"127.0.0.1:{port}") as client:
            names = [m.name for m in client.models(timeout=30)]
            image = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:10, :10]
            result = client.upscale(image, "raw", timeout=30, options=SizeOptions(scale=4))
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    assert names == ["rdn_x2", "rdn_x4"]
    assert (result.model, result.width, result.height) == ("rdn_x4", 40, 40)


def test_require_gpu_without_cuda_exits_1(tiny_onnx_x2: Path) -> None:
    done = run_serve("--model", str(tiny_onnx_x2), *FAST_FLAGS, *CPU_FLAGS, "--require-gpu")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert "--require-gpu" in error and "CUDAExecutionProvider is not active" in error


def test_port_in_use_is_a_start_error(tiny_onnx_x2: Path, held_port: int) -> None:
    config = ServerConfig(
        model=tiny_onnx_x2,
        host="127.0.0.1",
        port=held_port,
        engine=EngineConfig(providers=("CPUExecutionProvider",)),
    )
    unexpected = BackgroundServer(config)
    try:
        with pytest.raises(ServerStartError, match=f"127.0.0.1:{held_port}"):
            unexpected.start()
    finally:
        unexpected.stop()  # a server that started after all must not outlive the test


def test_flags_build_the_server_config(
    tiny_onnx_x2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        [
            "--model", str(tiny_onnx_x2), "--host", "::", "--port", "0", "--max-batch", "3",
            "--max-delay-ms", "1.5", "--max-queue-tiles", "99", "--tile", "48", "--tile-pad", "6",
            "--providers", "CUDAExecutionProvider, CPUExecutionProvider", "--require-gpu",
            "--threads", "2", "--max-pixels", "1000", "--max-request-bytes", "2000",
            "--max-message-bytes", "3000000", "--grace", "4", "--log-level", "DEBUG",
            "--log-json", "--self-ensemble", "--tiling", "grid", "--max-tile-pixels", "9000",
            "--max-uploads", "3", "--max-buffered-bytes", "5000", "--upload-idle-timeout", "2.5",
            "--upload-deadline", "60", "--decode-workers", "4",
        ]
    )  # fmt: skip
    assert config_from_args(args) == ServerConfig(
        model=tiny_onnx_x2,
        host="::",
        port=0,
        grace_s=4.0,
        engine=EngineConfig(
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            require_gpu=True,
            intra_op_threads=2,
        ),
        tiling=TilingConfig(mode="grid", tile=48, pad=6, max_tile_pixels=9000),
        batcher=BatcherConfig(max_batch=3, max_delay_ms=1.5, max_queue_tiles=99),
        limits=LimitsConfig(max_pixels=1000, max_request_bytes=2000, max_message_bytes=3000000),
        uploads=UploadConfig(
            idle_timeout_s=2.5, deadline_s=60.0, max_concurrent=3, max_buffered_bytes=5000
        ),
        decode_workers=4,
        log_level="DEBUG",
        log_json=True,
        self_ensemble=True,
    )
    defaults = config_from_args(build_parser().parse_args(["--model", str(tiny_onnx_x2)]))
    assert defaults == ServerConfig(model=tiny_onnx_x2)  # flag defaults = config defaults
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["--max-message-bytes", "1000"])  # below one stream chunk
    assert refused.value.code == 2
    assert "argument --max-message-bytes: must be at least 65536, got 1000" in (
        capsys.readouterr().err
    )


def test_serving_path_does_not_import_torch() -> None:
    code = "import sys, server.main, server.client; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------- graceful shutdown


class ServerProcess:
    """A running rdn-serve with its JSON log lines collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            serve_command(*args), stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(json.loads(line))  # --log-json: every line is one JSON object

    def wait_for(self, needle: str, timeout: float = START_TIMEOUT) -> dict[str, object]:
        """The next log entry whose message contains ``needle``."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(entry)
            if needle in str(entry["message"]):
                return entry


def test_sigterm_drains_in_flight_calls_and_exits_0(tiny_onnx_x2: Path, set5_dir: Path) -> None:
    server = ServerProcess(
        "--model", str(tiny_onnx_x2), *FAST_FLAGS, *CPU_FLAGS, "--max-batch", "1",
        "--max-delay-ms", "0", "--grace", "30", "--log-json", "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        started = server.wait_for("listening on 127.0.0.1:")
        port = int(str(started["message"]).split("listening on 127.0.0.1:")[1].split()[0])
        target = f"127.0.0.1:{port}"
        image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:160, :160]  # 25 tiles

        statuses: list[int] = []
        watch_channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
            health_pb2.HealthCheckRequest(service="rdn.v1.Upscaler"), timeout=60
        )
        watch_first = next(watch).status

        results: dict[str, object] = {}
        client = UpscaleClient(target, retry=RetryPolicy(max_attempts=1))
        # r2 streams its upload and holds the last chunk until the drain has begun: a call
        # surely in flight at the signal, however fast the engine (r0 and r1 may finish first).
        release = threading.Event()
        stream_channel = grpc.insecure_channel(target)

        def held_upload() -> Iterator[upscale_pb2.UpscaleChunk]:
            *head, last = stream_messages(make_payload(image), "raw", 0, "r2", 2**16)
            yield from head
            release.wait(60)
            yield last

        def call(name: str) -> None:
            try:
                if name == "r2":
                    stub = upscale_pb2_grpc.UpscalerStub(stream_channel)
                    answer = StreamAssembler()
                    for message in stub.UpscaleStream(held_upload(), timeout=60):
                        answer.add(message)
                    results[name] = answer.result()
                else:
                    results[name] = client.upscale(image, "raw", request_id=name, timeout=60)
            except (UpscaleError, grpc.RpcError) as e:
                results[name] = e

        workers = [threading.Thread(target=call, args=(f"r{i}",)) for i in range(3)]
        try:
            for worker in workers:
                worker.start()
            for _ in workers:  # all three are inside the server before the signal
                server.wait_for("started (request_id=")
            server.process.send_signal(signal.SIGTERM)
            statuses.append(next(watch).status)
            watch.cancel()  # an open watch would hold the drain for the whole grace
            server.wait_for("shutting down")
        finally:
            release.set()
        refused_new = None
        deadline = time.monotonic() + 30
        while refused_new is None and time.monotonic() < deadline:
            with UpscaleClient(target, retry=RetryPolicy(max_attempts=1)) as late:
                try:
                    late.upscale(image[:16, :16], "raw", timeout=10)
                except UpscaleError as e:
                    if e.code == grpc.StatusCode.UNAVAILABLE:
                        refused_new = e
        for worker in workers:
            worker.join(60)
        assert server.process.wait(60) == 0
        watch_channel.close()
        stream_channel.close()
        client.close()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert watch_first == health_pb2.HealthCheckResponse.SERVING
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert refused_new is not None  # new calls: UNAVAILABLE
    for name in ("r0", "r1", "r2"):  # in-flight calls: finished
        result = results[name]
        assert not isinstance(result, Exception), result
        assert result.width == 320 and len(result.image) == 320 * 320 * 3  # type: ignore[attr-defined]
    server.wait_for("stopped")
    access = [e for e in server.seen if e["logger"] == "rdn.access"]
    assert sorted(e["request_id"] for e in access if e["status"] == "OK") == ["r0", "r1", "r2"]
    messages = [str(e["message"]) for e in server.seen]
    drain_began = next(i for i, m in enumerate(messages) if "shutting down" in m)
    finished_during_drain = [
        e["request_id"] for e in server.seen[drain_began:] if e["logger"] == "rdn.access"
    ]
    assert "r2" in finished_during_drain  # the signal really arrived while calls were in flight


def test_in_process_server_answers_on_its_port(tiny_onnx_x2: Path) -> None:
    """build_server with port 0 reports the port it bound; stop() is idempotent."""
    config = ServerConfig(
        model=tiny_onnx_x2,
        host="127.0.0.1",
        port=0,
        engine=EngineConfig(providers=("CPUExecutionProvider",)),
        tiling=TilingConfig(mode="grid", tile=32, pad=4),
        batcher=BatcherConfig(max_batch=2),
    )
    bg = BackgroundServer(config, Engine(tiny_onnx_x2, config.engine)).start()
    try:
        assert bg.port > 0
        with UpscaleClient(f"127.0.0.1:{bg.port}") as client:
            assert client.health(timeout=10) == "SERVING"
        bg.call(bg.running.stop(0))
        bg.call(bg.running.stop(0))
    finally:
        bg.stop()


def test_log_formatters_keep_client_text_on_one_line() -> None:
    record = logging.LogRecord("rdn.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "evil\nstatus=OK", "tiles": 4}
    text = TextFormatter().format(record)
    assert "\n" not in text and text.endswith('request_id="evil\\nstatus=OK" tiles=4')
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "evil\nstatus=OK" and entry["tiles"] == 4
    assert (entry["logger"], entry["level"], entry["message"]) == ("rdn.access", "INFO", "request")


@pytest.mark.parametrize("moment", ["model load", "warm-up"])
def test_sigterm_during_start_up_exits_0_promptly(tiny_onnx_x2: Path, moment: str) -> None:
    """SIGTERM during warm-up ended rdn-serve with exit 143 and no log line."""
    server = ServerProcess(
        "--model", str(tiny_onnx_x2), *CPU_FLAGS, "--host", "127.0.0.1", "--port", "0",
        "--max-batch", "48", "--log-json", "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        server.wait_for("starting" if moment == "model load" else "warming up")
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = server.process.wait(30)
        took = time.monotonic() - started
        entry = server.wait_for("stop requested during start-up", timeout=10)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert code == 0
    assert entry["level"] == "INFO"
    assert took < 10.0, f"exit took {took:.1f} s after SIGTERM"
    assert not any("listening on" in str(e["message"]) for e in server.seen)
