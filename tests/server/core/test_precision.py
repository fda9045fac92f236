"""int8 twins in the repository: which model answers a request naming only a scale
(``--precision auto|int8|fp32``), what ModelInfo and Triton's ModelConfig say, and the local
API's answer byte for byte (real exports, real servers on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import pytest

from export.to_onnx import ExportOptions, export_onnx
from rdn.metadata import INT8_MAX_LOSS_DB, ModelMetadata, read_model_metadata
from server.config import TilingConfig
from server.core.repository import choose_defaults
from server.local import LocalUpscaler
from server.pb.inference import grpc_service_pb2 as kpb
from server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from server.pb.rdn.v1 import upscale_pb2 as pb
from server.pb.rdn.v1 import upscale_pb2_grpc as pb_grpc
from tests.background import BackgroundServer
from tests.server.loopback import PAD, TILE, loopback_config

CALL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def twin_dir(
    tiny_checkpoint_factory: Callable[[int], Path],
    tiny_onnx_factory: Callable[[int], Path],
    set5_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """rdn_x2 (the tiny float model) and rdn_x2_int8, its int8 export with a measured loss."""
    folder = tmp_path_factory.mktemp("twins")
    (folder / "rdn_x2.onnx").write_bytes(tiny_onnx_factory(2).read_bytes())
    options = ExportOptions(
        verify=False, int8=True, calibrate=set5_dir, allow_int8_loss=True, name="rdn_x2_int8"
    )
    export_onnx(tiny_checkpoint_factory(2), folder / "rdn_x2_int8.onnx", options)
    return folder


def defaults_of(folder: Path, precision: str) -> tuple[dict[str, bool], dict[str, pb.ModelInfo]]:
    config = loopback_config(None, model_dir=folder, precision=precision)
    with BackgroundServer(config) as bg, grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        stub = pb_grpc.UpscalerStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT).models
        answered = stub.Upscale(pb.UpscaleRequest(encoded=_png(), scale=2), timeout=CALL_TIMEOUT)
        assert answered.model == next(m.name for m in listed if m.is_default)
    return {m.name: m.is_default for m in listed}, {m.name: m for m in listed}


def _png() -> bytes:
    image = cv2.imread(str(Path(__file__).parents[2] / "data" / "Set5" / "baby.png"))[:40, :48]
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_int8_precision_makes_the_twin_the_default_of_its_scale(twin_dir: Path) -> None:
    defaults, info = defaults_of(twin_dir, "int8")
    assert defaults == {"rdn_x2": False, "rdn_x2_int8": True}
    assert info["rdn_x2_int8"].precision == "int8" and info["rdn_x2"].precision == "float32"


def test_fp32_precision_never_picks_the_twin(twin_dir: Path) -> None:
    defaults, _ = defaults_of(twin_dir, "fp32")
    assert defaults == {"rdn_x2": True, "rdn_x2_int8": False}


def test_auto_picks_the_twin_on_a_cpu_exactly_when_its_measured_loss_is_within_bound(
    twin_dir: Path,
) -> None:
    loss = read_model_metadata(twin_dir / "rdn_x2_int8.onnx").int8_loss_db
    assert loss is not None
    defaults, _ = defaults_of(twin_dir, "auto")
    assert defaults["rdn_x2_int8"] is (loss <= INT8_MAX_LOSS_DB)


def test_a_model_named_in_the_request_is_that_model(twin_dir: Path) -> None:
    config = loopback_config(None, model_dir=twin_dir, precision="int8")
    with BackgroundServer(config) as bg, grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        stub = pb_grpc.UpscalerStub(channel)
        request = pb.UpscaleRequest(encoded=_png(), model="rdn_x2")
        assert stub.Upscale(request, timeout=CALL_TIMEOUT).model == "rdn_x2"
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        for name, precision in (("rdn_x2", "float32"), ("rdn_x2_int8", "int8")):
            config_of = kserve.ModelConfig(kpb.ModelConfigRequest(name=name), timeout=CALL_TIMEOUT)
            assert config_of.config.parameters["precision"].string_value == precision


def test_the_local_api_answers_the_servers_int8_bytes(twin_dir: Path) -> None:
    tiling = TilingConfig(mode="grid", tile=TILE, pad=PAD)
    local = LocalUpscaler(twin_dir / "rdn_x2_int8.onnx", tiling=tiling)
    config = loopback_config(None, model_dir=twin_dir, precision="int8")
    with BackgroundServer(config) as bg, grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        stub = pb_grpc.UpscalerStub(channel)
        theirs = stub.Upscale(pb.UpscaleRequest(encoded=_png(), scale=2), timeout=CALL_TIMEOUT)
    assert theirs.model == "rdn_x2_int8"
    assert local.upscale_bytes(_png(), "png").image == theirs.image


@dataclass
class _Engine:
    active_provider: str


@dataclass
class _Model:
    scale: int
    metadata: ModelMetadata | None
    engine: Any
    name: str = ""


def _meta(precision: str, loss: float | None = None) -> ModelMetadata:
    return ModelMetadata(2, {"scale": 2}, 0, "", precision=precision, int8_loss_db=loss)


@pytest.mark.parametrize(
    ("loss", "provider", "precision", "want"),
    [
        (0.05, "CPUExecutionProvider", "auto", "rdn_x2_int8"),
        (0.15, "CPUExecutionProvider", "auto", "rdn_x2"),  # loses too much
        (None, "CPUExecutionProvider", "auto", "rdn_x2"),  # loss never measured
        (0.05, "CUDAExecutionProvider", "auto", "rdn_x2"),  # auto is float on CUDA
        (0.15, "CPUExecutionProvider", "int8", "rdn_x2_int8"),
        (0.05, "CPUExecutionProvider", "fp32", "rdn_x2"),
    ],
)
def test_the_precision_rule(loss: float | None, provider: str, precision: str, want: str) -> None:
    models: dict[str, Any] = {
        "rdn_x2": _Model(2, _meta("float32"), _Engine(provider), "rdn_x2"),
        "rdn_x2_int8": _Model(2, _meta("int8", loss), _Engine(provider), "rdn_x2_int8"),
    }
    assert choose_defaults(models, (), precision) == {2: want}
    assert choose_defaults(models, ("rdn_x2",), "int8") == {2: "rdn_x2"}  # chosen by name
