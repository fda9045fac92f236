"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) on the real server.

The client side is the real ``tritonclient.grpc``, run in its own interpreter (it pins
protobuf < 7) through tests/server/kserve_client_script.py against a server on 127.0.0.1:0.
Checks the protocol's own client cannot send (typed contents, malformed mixes, a held queue)
use this project's generated stubs in-process. Expected outputs are the engine run directly
on the same tiles, stitched: any error in decoding, tiling, batching or stitching shows up.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from server.config import (
    BatcherConfig,
    EngineConfig,
    LimitsConfig,
    MetricsConfig,
    ServerConfig,
)
from server.core.engine import Engine
from server.core.tiling import merge_tiles, plan_tiles, split_tiles
from server.pb.inference import grpc_service_pb2 as pb
from server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import RETRY_AFTER_KEY
from tests.background import BackgroundServer
from tests.server.loopback import CPU, PAD, TILE, loopback_config
from tests.server.reference import to_planar
from tests.server.triton_driver import tritonclient, value
from tests.tritonclient_env import tritonclient_python

MAX_PIXELS = 10_000  # per request, all images together
CALL_TIMEOUT = 60.0  # seconds: a broken server fails the test instead of hanging it
MODEL = "rdn_x2"
WIRE_MESSAGES = (
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
    "StatisticDuration",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "ModelRepositoryParameter",
    "RepositoryModelLoadRequest",
    "RepositoryModelLoadResponse",
    "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse",
)
# Messages of which this server defines a subset of Triton's fields (what it fills).
PARTIAL_MESSAGES = (
    "ModelConfig",
    "ModelInput",
    "ModelOutput",
    "InferStatistics",
    "ModelStatistics",
)


server_config = partial(loopback_config, limits=LimitsConfig(max_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    return server_config(tiny_onnx_x2, metrics=MetricsConfig(port=0, host="127.0.0.1"))


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def triton_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python interpreter that imports tritonclient.grpc."""
    return tritonclient_python(request.config, tmp_path_factory)


def _wait_until(condition: Callable[[], bool]) -> None:
    """Poll until ``condition()`` holds. An aborted call's status reaches the client before the
    server's handler has written its access record, so records are awaited, not assumed."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


# ------------------------------------------------------------------------------- images


def photo_planar(set5_dir: Path, height: int, width: int, y: int = 40) -> np.ndarray:
    """float32 [3, H, W] in [0, 1]: a crop of a Set5 photograph."""
    bgr = cv2.imread(str(set5_dir / "head.png"), cv2.IMREAD_COLOR)
    rgb = np.ascontiguousarray(
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[y : y + height, 20 : 20 + width]
    )
    return to_planar(rgb)


def reference(engine: Engine, image: np.ndarray) -> np.ndarray:
    """What the server must answer for one [3, H, W] image: the engine on its tiles, stitched."""
    plan = plan_tiles(image.shape[1], image.shape[2], TILE, PAD)
    return merge_tiles(engine.run(split_tiles(image, plan)), plan, engine.scale)


def assert_matches(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding: batches of other sizes may sum in another order."""
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def infer_request(images: np.ndarray, **fields: Any) -> pb.ModelInferRequest:
    """A raw-bytes ModelInferRequest for ``images`` [N, 3, H, W]."""
    request = pb.ModelInferRequest(**{"model_name": MODEL, **fields})
    request.inputs.add(name="lr", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    return request


def output_array(response: pb.ModelInferResponse) -> np.ndarray:
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype) == ("sr", "FP32")
    (data,) = response.raw_output_contents
    return np.frombuffer(data, "<f4").reshape(tuple(tensor.shape))


# ---------------------------------------------------------------------- through tritonclient


def test_wire_layout_is_the_protocols(triton_python: str) -> None:
    """Every field of every message we define has tritonclient's name, number and type."""
    describe = [{"op": "describe", "messages": [*WIRE_MESSAGES, *PARTIAL_MESSAGES]}]
    (result,) = tritonclient(triton_python, 1, describe)  # no call: the port is never dialled
    theirs = value(result)
    ours: dict[str, Any] = {}

    def add(descriptor: Any) -> None:
        ours[descriptor.full_name] = [
            [
                f.name,
                f.number,
                f.type,
                f.is_repeated,
                f.message_type.full_name if f.message_type else "",
            ]
            for f in descriptor.fields
        ]
        for nested in descriptor.nested_types:
            add(nested)

    for name in WIRE_MESSAGES:
        add(pb.DESCRIPTOR.message_types_by_name[name])
    whole = {k: v for k, v in ours.items() if k.split(".")[1] not in PARTIAL_MESSAGES}
    assert "inference.ModelInferRequest.InferInputTensor" in whole
    assert whole == {k: theirs[k] for k in whole}
    for name in PARTIAL_MESSAGES:
        add(pb.DESCRIPTOR.message_types_by_name[name])
        mine, full = ours[f"inference.{name}"], theirs[f"inference.{name}"]
        assert mine and all(field in full for field in mine), (name, mine)
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload",
    ]  # fmt: skip


def test_probes_and_metadata(server: BackgroundServer, triton_python: str) -> None:
    actions = [
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "model": MODEL},
        {"op": "model_ready", "model": MODEL, "version": "1"},
        {"op": "model_ready", "model": "rdn_x4"},
        {"op": "model_ready", "model": MODEL, "version": "2"},
        {"op": "server_metadata"},
        {"op": "model_metadata", "model": MODEL},
        {"op": "model_metadata", "model": "rdn_x4"},
        {"op": "model_metadata", "model": MODEL, "version": "9"},
    ]
    results = tritonclient(triton_python, server.port, actions)
    assert [value(r) for r in results[:6]] == [True, True, True, True, False, False]
    assert value(results[6]) == {
        "name": "rdn-sr",
        "version": importlib.metadata.version("rdn-sr"),
        "extensions": ["model_repository", "model_configuration", "statistics"],
    }
    tensor = {"datatype": "FP32", "shape": ["-1", "3", "-1", "-1"]}
    assert value(results[7]) == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "lr", **tensor}],
        "outputs": [{"name": "sr", **tensor}],
    }
    assert results[8]["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'rdn_x4'" in results[8]["error"]["message"]
    assert "models served: rdn_x2" in results[8]["error"]["message"]
    assert results[9]["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no version '9'" in results[9]["error"]["message"]


def test_readiness_follows_the_servers_health(server: BackgroundServer, triton_python: str) -> None:
    health = server.running.health
    actions = [{"op": "live"}, {"op": "ready"}, {"op": "model_ready", "model": MODEL}]
    server.call(health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        results = tritonclient(triton_python, server.port, actions)
    finally:
        server.call(health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert [value(r) for r in results] == [True, False, False]


def test_infer_equals_the_engine_on_the_same_tiles(
    server: BackgroundServer, engine: Engine, triton_python: str, set5_dir: Path, tmp_path: Path
) -> None:
    one = photo_planar(set5_dir, 37, 53)[None]  # 2 x 2 tiles, partial ones at the far edges
    two = np.stack([photo_planar(set5_dir, 40, 45, y=10), photo_planar(set5_dir, 40, 45, y=90)])
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "two.npy", two)
    actions = [
        {
            "op": "infer",
            "model": MODEL,
            "id": "tc-one",
            "input": {"name": "lr", "datatype": "FP32", "npy": str(tmp_path / "one.npy")},
            "out": str(tmp_path / "sr_one.npy"),
        },
        {
            "op": "infer",
            "model": MODEL,
            "version": "1",
            "id": "tc-two",
            "input": {"name": "lr", "datatype": "FP32", "npy": str(tmp_path / "two.npy")},
            "outputs": ["sr"],
            "out": str(tmp_path / "sr_two.npy"),
        },
    ]
    first, second = (value(r) for r in tritonclient(triton_python, server.port, actions))
    assert (first["model_name"], first["model_version"], first["id"]) == (MODEL, "1", "tc-one")
    assert first["outputs"] == [{"name": "sr", "datatype": "FP32", "shape": [1, 3, 74, 106]}]
    assert_matches(np.load(tmp_path / "sr_one.npy"), reference(engine, one[0])[None])
    assert second["id"] == "tc-two"
    assert second["outputs"] == [{"name": "sr", "datatype": "FP32", "shape": [2, 3, 80, 90]}]
    sr_two = np.load(tmp_path / "sr_two.npy")
    assert not np.allclose(sr_two[0], sr_two[1], atol=0.05)  # two different images came back
    assert_matches(sr_two, np.stack([reference(engine, image) for image in two]))


BAD_INFERS: dict[str, tuple[dict[str, Any], str, str]] = {
    # case: (changes to a good action, status, part of the message)
    "input name": ({"name": "image"}, "INVALID_ARGUMENT", "unknown input 'image'"),
    "datatype": ({"datatype": "FP64"}, "INVALID_ARGUMENT", "datatype 'FP64'; only FP32"),
    "shape": ({"channels": 4}, "INVALID_ARGUMENT", "shape [1, 4, 8, 8]; expected [N, 3, H, W]"),
    "byte count": (
        {"shape": [1, 3, 8, 9]},
        "INVALID_ARGUMENT",
        "holds 768 bytes; input 'lr' of shape [1, 3, 8, 9] FP32 needs 864",
    ),
    "model": ({"model": "rdn_x3"}, "NOT_FOUND", "unknown model 'rdn_x3'"),
    "version": ({"version": "2"}, "NOT_FOUND", "model 'rdn_x2' has no version '2'"),
    "output": ({"outputs": ["hr"]}, "INVALID_ARGUMENT", "unknown output 'hr'"),
    "pixels": (
        {"batch": 2, "side": 80},
        "RESOURCE_EXHAUSTED",
        "2 image(s) of 80x80, together 12800 pixels is over --max-pixels 100x100 = 10000 pixels",
    ),
}


@pytest.fixture(scope="module")
def bad_infer_results(
    server: BackgroundServer, triton_python: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Every BAD_INFERS case sent by tritonclient, in one subprocess."""
    folder = tmp_path_factory.mktemp("bad_infers")
    actions = []
    for case, (changes, _, _) in BAD_INFERS.items():
        c = dict(changes)
        side = c.pop("side", 8)
        dtype = np.float64 if c.get("datatype") == "FP64" else np.float32
        array = np.full((c.pop("batch", 1), c.pop("channels", 3), side, side), 0.5, dtype)
        npy = folder / f"{case.replace(' ', '_')}.npy"
        np.save(npy, array)
        spec: dict[str, Any] = {"name": c.pop("name", "lr"), "datatype": c.pop("datatype", "FP32")}
        if "shape" in c:
            spec["shape"] = c.pop("shape")
        actions.append({"op": "infer", "model": MODEL, "input": {**spec, "npy": str(npy)}, **c})
    results = tritonclient(triton_python, server.port, actions)
    return dict(zip(BAD_INFERS, results, strict=True))


@pytest.mark.parametrize("case", BAD_INFERS)
def test_bad_infer_gets_a_precise_status(case: str, bad_infer_results: dict[str, Any]) -> None:
    _, status, message = BAD_INFERS[case]
    error = bad_infer_results[case].get("error")
    assert error is not None, f"{case}: the server accepted it: {bad_infer_results[case]}"
    assert error["status"] == f"StatusCode.{status}"
    assert message in error["message"]


# ------------------------------------------------------------------- with the project's stubs


def test_typed_contents_give_the_same_answer_as_raw_bytes(
    stub: pb_grpc.GRPCInferenceServiceStub, set5_dir: Path
) -> None:
    images = photo_planar(set5_dir, 20, 30)[None]
    raw = stub.ModelInfer(infer_request(images, id="raw"), timeout=CALL_TIMEOUT)
    typed = pb.ModelInferRequest(model_name=MODEL, id="typed")
    typed.inputs.add(name="lr", datatype="FP32", shape=list(images.shape))
    typed.inputs[0].contents.fp32_contents.extend(images.ravel().tolist())
    answer = stub.ModelInfer(typed, timeout=CALL_TIMEOUT)
    assert (raw.id, answer.id) == ("raw", "typed")
    assert output_array(answer).shape == (1, 3, 40, 60)
    np.testing.assert_array_equal(output_array(answer), output_array(raw))


def _mutate(change: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    request = infer_request(np.full((1, 3, 4, 4), 0.25, np.float32))
    change(request)
    return request


def _typed_and_raw(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend([0.0] * 48)


def _no_data(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[:]


def _int_contents(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[:]
    r.inputs[0].contents.int_contents.extend([0] * 48)


def _short_typed(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[:]
    r.inputs[0].contents.fp32_contents.extend([0.0] * 47)


def _two_raw(r: pb.ModelInferRequest) -> None:
    r.raw_input_contents.append(b"")


def _two_inputs(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="lr2", datatype="FP32", shape=[1, 3, 4, 4])


def _shared_memory(r: pb.ModelInferRequest) -> None:
    r.inputs[0].parameters["shared_memory_region"].string_param = "region0"


def _twice_sr(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name="sr")
    r.outputs.add(name="sr")


def _zero_height(r: pb.ModelInferRequest) -> None:
    r.inputs[0].shape[2] = 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_typed_and_raw, "both in contents.fp32_contents and in raw_input_contents[0]"),
        (_no_data, "carries no data; send 192 bytes of little-endian float32"),
        (_int_contents, "carries data in contents.int_contents"),
        (_short_typed, "fp32_contents holds 47 values; input 'lr' of shape [1, 3, 4, 4] needs 48"),
        (_two_raw, "raw_input_contents has 2 entries for 1 input"),
        (_two_inputs, "request has 2 inputs (first: ['lr', 'lr2']); the model takes one"),
        (_shared_memory, "sets parameter 'shared_memory_region'"),
        (_twice_sr, "output 'sr' is requested twice"),
        (_zero_height, "shape [1, 3, 0, 4]; expected [N, 3, H, W] with N, H, W >= 1"),
    ],
)
def test_malformed_requests_are_invalid_arguments(
    stub: pb_grpc.GRPCInferenceServiceStub,
    change: Callable[[pb.ModelInferRequest], None],
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(_mutate(change), timeout=CALL_TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_infer_writes_one_access_line(
    stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdn.access")
    stub.ModelInfer(
        infer_request(np.zeros((2, 3, 10, 40), np.float32), id="acc-1"), timeout=CALL_TIMEOUT
    )
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(
            infer_request(np.zeros((1, 3, 1, 1), np.float32), model_version="3", id="acc-2"),
            timeout=CALL_TIMEOUT,
        )
    _wait_until(lambda: "acc-2" in _access(caplog))
    # The previous test's last (aborted) call may log its line during this one: count only ours.
    ids = [
        r.fields["request_id"]
        for r in caplog.records
        if r.name == "rdn.access" and r.fields.get("request_id", "").startswith("acc-")
    ]
    assert sorted(ids) == ["acc-1", "acc-2"], ids  # one line per call
    records = _access(caplog)
    ok, missing = records["acc-1"], records["acc-2"]
    assert (ok["method"], ok["status"], ok["images"], ok["tiles"]) == ("ModelInfer", "OK", 2, 4)
    assert ok["bytes_in"] == 2 * 3 * 10 * 40 * 4 and ok["bytes_out"] == 4 * ok["bytes_in"]
    assert (missing["method"], missing["status"]) == ("ModelInfer", "NOT_FOUND")


def test_infer_calls_are_counted_in_the_servers_metrics(
    server: BackgroundServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    metrics = server.running.metrics
    assert metrics is not None

    def count(code: str) -> float:
        value = metrics.registry.get_sample_value(
            "rdn_requests_total", {"protocol": "grpc", "method": "ModelInfer", "code": code}
        )
        return value or 0.0

    ok, not_found = count("OK"), count("NOT_FOUND")
    stub.ModelInfer(infer_request(np.zeros((1, 3, 8, 8), np.float32)), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(
            infer_request(np.zeros((1, 3, 8, 8), np.float32), model_name="x"), timeout=CALL_TIMEOUT
        )
    _wait_until(lambda: count("NOT_FOUND") >= not_found + 1)
    assert (count("OK"), count("NOT_FOUND")) == (ok + 1, not_found + 1)


def _access(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    return {
        r.fields["request_id"]: r.fields
        for r in caplog.records
        if r.name == "rdn.access" and r.fields.get("method") == "ModelInfer"
    }


# ------------------------------------------------------------- one batcher for both protocols


class HeldEngine(Engine):
    """The real engine; each call first records its batch and waits while the test holds it."""

    def __init__(self, path: Path, config: EngineConfig) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        super().__init__(path, config)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        if not self.gate.wait(CALL_TIMEOUT):
            raise TimeoutError("the test never released the engine")
        return super().run(batch)


@pytest.fixture(scope="module")
def held(tiny_onnx_x2: Path) -> Iterator[tuple[BackgroundServer, HeldEngine]]:
    engine = HeldEngine(tiny_onnx_x2, CPU)
    config = server_config(
        tiny_onnx_x2,
        batcher=BatcherConfig(max_batch=4, max_delay_ms=2.0, max_queue_tiles=6),
        limits=LimitsConfig(max_pixels=MAX_PIXELS, max_message_bytes=256 * 2**10),
    )
    with BackgroundServer(config, engine) as bg:
        yield bg, engine


def _rgb(planar: np.ndarray) -> np.ndarray:
    """The uint8 H x W x 3 image that ``to_planar`` turned into ``planar``."""
    return np.round(planar.transpose(1, 2, 0) * 255).astype(np.uint8)


def _raw_upscale(planar: np.ndarray, request_id: str) -> upscale_pb2.UpscaleRequest:
    rgb = _rgb(planar)
    height, width = rgb.shape[:2]
    shape = upscale_pb2.ImageShape(height=height, width=width, channels=3)
    return upscale_pb2.UpscaleRequest(
        raw=upscale_pb2.RawImage(shape=shape, data=rgb.tobytes()),
        output_format=upscale_pb2.OUTPUT_FORMAT_RAW,
        request_id=request_id,
    )


def test_both_protocols_share_engine_batches(
    held: tuple[BackgroundServer, HeldEngine], set5_dir: Path
) -> None:
    bg, engine = held
    batcher = bg.running.batcher
    blocker = photo_planar(set5_dir, 20, 20)  # 1 tile: holds the engine
    upscale = photo_planar(set5_dir, 20, 40, y=60)  # 2 tiles
    kserve = photo_planar(set5_dir, 20, 40, y=100)[None]  # 2 tiles
    full = np.zeros((1, 3, 20, 96), np.float32)  # 3 tiles: 4 queued + 3 > 6
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        upscaler = upscale_pb2_grpc.UpscalerStub(channel)
        inference = pb_grpc.GRPCInferenceServiceStub(channel)
        engine.gate.clear()
        try:
            engine.batches.clear()
            first = upscaler.Upscale.future(_raw_upscale(blocker, "a"), timeout=CALL_TIMEOUT)
            _wait_until(lambda: len(engine.batches) == 1)
            second = upscaler.Upscale.future(_raw_upscale(upscale, "b"), timeout=CALL_TIMEOUT)
            third = inference.ModelInfer.future(infer_request(kserve, id="c"), timeout=CALL_TIMEOUT)
            _wait_until(lambda: batcher.queued_tiles == 4)
            with pytest.raises(grpc.RpcError) as refused:
                inference.ModelInfer(infer_request(full, id="d"), timeout=CALL_TIMEOUT)
        finally:
            engine.gate.set()
        answers = [f.result() for f in (first, second, third)]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in refused.value.details()
    assert dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY]
    tiles = {
        "upscale": split_tiles(to_planar(_rgb(upscale)), plan_tiles(20, 40, TILE, PAD)),
        "kserve": split_tiles(kserve[0], plan_tiles(20, 40, TILE, PAD)),
    }
    second_batch = engine.batches[1]
    sources = [_source(tile, tiles) for tile in second_batch]
    assert len(second_batch) == 4 and sorted(sources) == ["kserve", "kserve", "upscale", "upscale"]
    assert answers[1].request_id == "b" and answers[2].id == "c"
    expected = merge_tiles(engine.run(tiles["kserve"]), plan_tiles(20, 40, TILE, PAD), 2)
    assert_matches(output_array(answers[2])[0], expected)


def _source(tile: np.ndarray, known: dict[str, np.ndarray]) -> str:
    """Which request's tiles ``tile`` is one of."""
    (name,) = [name for name, tiles in known.items() if any((t == tile).all() for t in tiles)]
    return name


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (1, 3, 20, 256),
            "needs 8 tiles of 32x32, more than the queue holds (6, --max-queue-tiles)",
        ),
        ((1, 3, 60, 90), "more than one message carries (--max-message-bytes 262144)"),
    ],
)
def test_requests_that_could_never_run_are_refused_up_front(
    held: tuple[BackgroundServer, HeldEngine], shape: tuple[int, ...], message: str
) -> None:
    bg, engine = held
    calls = len(engine.batches)
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        inference = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            inference.ModelInfer(infer_request(np.zeros(shape, np.float32)), timeout=CALL_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message in refused.value.details()
    assert RETRY_AFTER_KEY not in dict(refused.value.trailing_metadata() or ())
    assert len(engine.batches) == calls


def test_names_of_megabytes_are_refused_without_being_echoed_or_logged(
    stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1-7 MiB model name was logged whole and echoed in NOT_FOUND, whose metadata then
    overflowed the client's limit ("received metadata size exceeds hard limit")."""
    caplog.set_level(logging.INFO, logger="rdn.access")
    huge = "m" * 2**20
    calls = {
        "ModelInfer model_name": lambda: stub.ModelInfer(
            infer_request(np.zeros((1, 3, 4, 4), np.float32), model_name=huge, id="long-name"),
            timeout=CALL_TIMEOUT,
        ),
        "ModelInfer model_version": lambda: stub.ModelInfer(
            infer_request(np.zeros((1, 3, 4, 4), np.float32), model_version=huge, id="long-v"),
            timeout=CALL_TIMEOUT,
        ),
        "ModelMetadata name": lambda: stub.ModelMetadata(
            pb.ModelMetadataRequest(name=huge), timeout=CALL_TIMEOUT
        ),
        "input name": lambda: stub.ModelInfer(
            _mutate(lambda r: setattr(r.inputs[0], "name", huge)), timeout=CALL_TIMEOUT
        ),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        details = error.value.details()
        assert f"is {2**20} bytes long; at most 256 are accepted" in details, what
        assert len(details) < 200, what
    ready = stub.ModelReady(pb.ModelReadyRequest(name=huge), timeout=CALL_TIMEOUT)
    assert not ready.ready
    _wait_until(lambda: "long-v" in _access(caplog))
    assert (
        max(len(r.getMessage()) + len(str(getattr(r, "fields", ""))) for r in caplog.records) < 2000
    )
