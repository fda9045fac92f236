"""What a reload may not break (real servers on 127.0.0.1): a model whose metadata lies about
its scale is refused and the old version serves on; readiness follows whether any model is
loaded, the same on all three probes; SIGHUPs coalesce; a load reads only its own file."""

from __future__ import annotations

import http.client
import json
import queue
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import server.core.repository
from rdn.metadata import KEY_CONFIG, KEY_NAME, KEY_SCALE
from server.core.repository import LoadFailed
from server.models import MODELS_DIR
from server.pb.inference import grpc_service_pb2 as kpb
from server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from server.pb.rdn.v1 import upscale_pb2 as pb
from server.pb.rdn.v1 import upscale_pb2_grpc as pb_grpc
from tests.background import BackgroundServer
from tests.server.loopback import loopback_config
from tests.server.test_main import CPU_FLAGS, FAST_FLAGS, ServerProcess

CALL_TIMEOUT = 60.0
SIGHUP_BURST = 30  # signals over about a second, as in the issue
SIGHUP_GAP_S = 0.035  # apart: the kernel merges signals that arrive before one is handled
QUIET_S = 5.0  # no re-scan line for this long: the burst's re-scans are over


def relabelled(source: Path, folder: Path, file_name: str, name: str, scale: int) -> Path:
    """``source``'s network saved as ``file_name`` with ``rdn.name`` = ``name`` and metadata
    that claims ``scale`` (``rdn.scale`` and the config agree with each other, not with the
    graph)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    config = {**json.loads(props[KEY_CONFIG]), "scale": scale}
    props.update({KEY_NAME: name, KEY_SCALE: str(scale), KEY_CONFIG: json.dumps(config)})
    onnx.helper.set_model_props(model, props)
    path = folder / file_name
    onnx.save(model, str(path))
    return path


@pytest.fixture
def folder(tiny_onnx_factory: Callable[[int], Path], tmp_path: Path) -> Path:
    """rdn_x2 (a.onnx) and rdn_x4 (b.onnx), honest."""
    relabelled(tiny_onnx_factory(2), tmp_path, "a.onnx", "rdn_x2", 2)
    relabelled(tiny_onnx_factory(4), tmp_path, "b.onnx", "rdn_x4", 4)
    return tmp_path


def upscale_width(port: int, scale: int, side: int = 12) -> tuple[str, int]:
    image = cv2.imencode(".png", np.full((side, side, 3), 128, np.uint8))[1].tobytes()
    request = pb.UpscaleRequest(encoded=image, scale=scale)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = pb_grpc.UpscalerStub(channel).Upscale(request, timeout=CALL_TIMEOUT)
    return answer.model, answer.width


# ------------------------------------------------ metadata that lies about the scale


def test_a_mislabelled_file_swapped_in_is_refused_and_the_old_version_serves(
    tiny_onnx_factory: Callable[[int], Path], folder: Path
) -> None:
    with BackgroundServer(loopback_config(None, model_dir=folder)) as bg:
        repository = bg.running.repository
        # an x4 network labelled rdn_x2 / scale 2 replaces the x2 model; SIGHUP's re-scan
        relabelled(tiny_onnx_factory(4), folder, "a.onnx", "rdn_x2", 2)
        bg.call(repository.rescan(), timeout=CALL_TIMEOUT)
        after_rescan = repository.snapshot.models["rdn_x2"].version
        reason = {e.name: e for e in repository.index()}["rdn_x2"].reason
        with pytest.raises(LoadFailed) as refused:  # and a load call
            bg.call(repository.load("rdn_x2"), timeout=CALL_TIMEOUT)
        answer = upscale_width(bg.port, 2)
    assert after_rescan == 1 and repository.snapshot.models["rdn_x2"].version == 1
    assert "rdn.scale=2" in reason and "upscales x4" in reason
    assert "previous version keeps serving" in str(refused.value)
    assert answer == ("rdn_x2", 24)


# ------------------------------------------------------------ readiness without models


def readiness(bg: BackgroundServer) -> tuple[list[int], bool, int]:
    """(gRPC health of "" and rdn.v1.Upscaler, KServe ServerReady, /v2/health/ready status)."""
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = [
            health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
            for s in ("", "rdn.v1.Upscaler")
        ]
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        ready = kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
    assert bg.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", bg.running.http.port, timeout=10)
    try:
        connection.request("GET", "/v2/health/ready")
        answer = connection.getresponse()
        answer.read()
    finally:
        connection.close()
    return statuses, ready, answer.status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_server_with_no_model_loaded_is_not_ready_on_any_probe(folder: Path) -> None:
    with BackgroundServer(loopback_config(None, model_dir=folder, http_port=0)) as bg:
        repository = bg.running.repository
        with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT
            )
            seen = [next(watch).status]
            before = readiness(bg)
            bg.call(repository.unload("rdn_x2"), timeout=CALL_TIMEOUT)
            one_left = readiness(bg)
            bg.call(repository.unload("rdn_x4"), timeout=CALL_TIMEOUT)
            empty = readiness(bg)
            seen.append(next(watch).status)
            with pytest.raises(grpc.RpcError) as refused:
                upscale_width(bg.port, 2)
            bg.call(repository.load("rdn_x4"), timeout=CALL_TIMEOUT)
            again = readiness(bg)
            seen.append(next(watch).status)
            watch.cancel()
    assert before == one_left == again == ([SERVING, SERVING], True, 200)
    assert empty == ([NOT_SERVING, NOT_SERVING], False, 503)
    assert seen == [SERVING, NOT_SERVING, SERVING]
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # says why: no model is loaded
    assert "no model of scale x2" in (refused.value.details() or "")


# ------------------------------------------------------------------- SIGHUP and loads


def rescans_after(server: ServerProcess) -> list[dict[str, object]]:
    """The re-scans' log entries, until none has come for QUIET_S seconds."""
    done = []
    while True:
        try:
            done.append(server.wait_for("model repository re-scanned", timeout=QUIET_S))
        except queue.Empty:
            return done


def rescan_seconds(entry: dict[str, object]) -> float:
    """How long the re-scan of this log entry took, as it says."""
    found = re.search(r"\((\d+\.\d+) s\)", str(entry["message"]))
    assert found is not None, entry
    return float(found.group(1))


def test_a_burst_of_sighups_is_coalesced(tmp_path: Path) -> None:
    """30 SIGHUPs over about a second, as in the issue. One re-scan runs at a time and at most
    one waits: every re-scan but the last starts within the burst, after the one before it
    ended, so they number at most 2 + burst / shortest re-scan, instead of one per signal.
    The last sees what changed before the last signal."""
    shipped = ("default_x2", "default_x4", "rdn_x2_photo", "rdn_x4_photo")
    for stem in shipped:  # real models: a re-scan takes longer than the gap between signals
        shutil.copy(MODELS_DIR / f"{stem}.onnx", tmp_path)
    server = ServerProcess("--model-dir", str(tmp_path), *FAST_FLAGS, *CPU_FLAGS, "--log-json")
    try:
        server.wait_for("listening on 127.0.0.1:")
        started = time.monotonic()
        for _ in range(SIGHUP_BURST - 1):
            server.process.send_signal(signal.SIGHUP)
            time.sleep(SIGHUP_GAP_S)
        shutil.copy(MODELS_DIR / "default_x3.onnx", tmp_path)
        server.process.send_signal(signal.SIGHUP)
        burst_s = time.monotonic() - started
        done = rescans_after(server)
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    shortest_s = min(rescan_seconds(e) for e in done)
    bound = 2 + int(burst_s / shortest_s)
    assert 1 <= len(done) <= bound, (len(done), burst_s, shortest_s)
    assert "5 models served" in str(done[-1]["message"])  # the file added before the last signal


@pytest.fixture
def metadata_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every model file whose metadata the repository reads (the real function, observed)."""
    reads: list[Path] = []
    real = server.core.repository.read_metadata

    def observed(path: Path) -> dict[str, str]:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(server.core.repository, "read_metadata", observed)
    yield reads


def test_a_load_reads_only_its_own_file(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, metadata_reads: list[Path]
) -> None:
    """A broken file and a large one beside the model neither break nor slow its load."""
    with BackgroundServer(loopback_config(None, model_dir=folder)) as bg:
        repository = bg.running.repository
        (folder / "broken.onnx").write_bytes(b"\x08" * 1000)
        with (folder / "large.onnx").open("wb") as large:
            large.truncate(256 * 2**20)  # sparse: 256 MiB for any reader, no disk used
        metadata_reads.clear()
        loaded = bg.call(repository.load("rdn_x2"), timeout=CALL_TIMEOUT)
        own = list(metadata_reads)
        # a name the repository does not know yet is looked for in the folder
        relabelled(folder / "a.onnx", folder, "c.onnx", "rdn_x2_new", 2)
        new = bg.call(repository.load("rdn_x2_new"), timeout=CALL_TIMEOUT)
    assert loaded.version == 2
    assert own == [folder / "a.onnx"], own
    assert (new.name, new.path.name) == ("rdn_x2_new", "c.onnx")
