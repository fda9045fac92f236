"""Engine: real onnxruntime sessions on tiny exported models, and every way a model can be bad."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rdn.constants import CPU, CUDA
from rdn.onnx_session import (
    ModelLoadError,
    cuda_provider_options,
    select_providers,
    session_options,
)
from server.config import EngineConfig
from server.core.engine import Engine

CPU_ONLY = EngineConfig(providers=(CPU,), intra_op_threads=1)
REPO = Path(__file__).resolve().parents[3]


def tiles(n: int, size: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


def identity_model(path: Path, shape: list, elem_type: int = TensorProto.FLOAT) -> Path:
    """A one-node ONNX model whose input has ``shape`` (strings are dynamic dims)."""
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def resize_model(path: Path, scale: int) -> Path:
    """A one-node nearest-neighbour upscaler by ``scale``, without metadata."""
    dims = ["n", 3, "h", "w"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "H", "W"])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, scale, scale])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph([node], "g", [x], [y], initializer=[scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def without_metadata(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save(model, str(dst))
    return dst


def test_run_upscales_a_batch_like_tile_by_tile(tiny_onnx_x2: Path) -> None:
    engine = Engine(tiny_onnx_x2, CPU_ONLY)
    batch = tiles(3)
    out = engine.run(batch)
    assert out.shape == (3, 3, 40, 40)
    assert out.dtype == np.float32
    singles = np.concatenate([engine.run(batch[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(out, singles, atol=1e-5)
    assert not np.allclose(out[0], out[1])  # different tiles, different outputs


def test_session_facts_are_exposed(tiny_onnx_x2: Path) -> None:
    engine = Engine(tiny_onnx_x2, CPU_ONLY)
    assert engine.active_provider == CPU
    assert engine.providers == (CPU,)
    assert engine.scale == 2
    assert engine.input_name and engine.output_name
    assert isinstance(engine.metadata, dict)


def test_scale_without_metadata_is_measured(tiny_onnx_x2: Path, tmp_path: Path) -> None:
    bare = without_metadata(tiny_onnx_x2, tmp_path / "bare.onnx")
    engine = Engine(bare, CPU_ONLY)
    assert engine.metadata == {}
    assert engine.scale == 2
    assert engine.run(tiles(1, 12)).shape == (1, 3, 24, 24)
    x3 = resize_model(tmp_path / "x3.onnx", 3)
    assert Engine(x3, CPU_ONLY).scale == 3


@pytest.mark.parametrize("claimed", ["2", "3"])
def test_scale_metadata_must_agree_with_the_graph(
    tiny_onnx_x2: Path, tmp_path: Path, claimed: str
) -> None:
    """The graph is measured at load: metadata that agrees is kept, a lie is a load error (a
    mislabelled model would fail every request)."""
    model = onnx.load(str(tiny_onnx_x2))
    del model.metadata_props[:]
    helper.set_model_props(model, {"rdn.scale": claimed})
    onnx.save(model, str(tmp_path / "tagged.onnx"))
    if claimed == "2":
        assert Engine(tmp_path / "tagged.onnx", CPU_ONLY).scale == 2
        return
    with pytest.raises(ModelLoadError, match=r"rdn\.scale=3 but the network upscales x2"):
        Engine(tmp_path / "tagged.onnx", CPU_ONLY)


def test_bad_scale_metadata_is_a_load_error(tiny_onnx_x2: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_onnx_x2))
    del model.metadata_props[:]
    helper.set_model_props(model, {"rdn.scale": "two"})
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match=r"rdn\.scale='two'"):
        Engine(tmp_path / "bad.onnx", CPU_ONLY)


def test_float16_model_runs(tiny_checkpoint: Path, tiny_onnx_x2: Path, tmp_path: Path) -> None:
    to_onnx = pytest.importorskip("export.to_onnx")
    fp16 = tmp_path / "tiny_fp16.onnx"
    to_onnx.export_onnx(tiny_checkpoint, fp16, to_onnx.ExportOptions(fp16=True, verify=False))
    engine16, engine32 = Engine(fp16, CPU_ONLY), Engine(tiny_onnx_x2, CPU_ONLY)
    batch = tiles(2)
    out16 = engine16.run(batch)
    assert out16.dtype == np.float32
    assert out16.shape == (2, 3, 40, 40)
    np.testing.assert_allclose(out16, engine32.run(batch), atol=0.02)


def test_warmup_runs_each_batch_size_once(tiny_onnx_x2: Path) -> None:
    class Recording(Engine):
        def run(self, batch: np.ndarray) -> np.ndarray:
            self.seen.append(batch.shape)
            return super().run(batch)

    engine = Recording.__new__(Recording)
    engine.seen = []
    Engine.__init__(engine, tiny_onnx_x2, CPU_ONLY)
    engine.seen.clear()  # a model without metadata probes once at load
    engine.warmup(20, [4, 1, 4])
    assert engine.seen == [(1, 3, 20, 20), (4, 3, 20, 20)]
    with pytest.raises(ValueError, match="positive"):
        engine.warmup(20, [0])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((2, 1, 8, 8), np.float32), r"\[N, 3, h, w\]"),
        (np.zeros((3, 8, 8), np.float32), r"\[N, 3, h, w\]"),
        (np.zeros((1, 3, 8, 8), np.float64), "float32"),
    ],
)
def test_run_rejects_wrong_input(tiny_onnx_x2: Path, batch: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Engine(tiny_onnx_x2, CPU_ONLY).run(batch)


def bad_model(kind: str, good: Path, folder: Path) -> Path:
    """A model file that is wrong in the way ``kind`` names."""
    path = folder / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-onnx":
        path.write_bytes((REPO / "tests" / "data" / "Set5" / "baby.png").read_bytes())
    elif kind == "grey":
        identity_model(path, ["n", 1, "h", "w"])
    elif kind == "rank3":
        identity_model(path, [3, "h", "w"])
    elif kind == "uint8":
        identity_model(path, ["n", 3, "h", "w"], TensorProto.UINT8)
    elif kind == "fixed":
        identity_model(path, [1, 3, 64, 64])
    return path


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("missing", "no such file"),
        ("directory", "not a regular file"),
        ("empty", "empty file"),
        ("truncated", "cannot load it"),
        ("not-onnx", "cannot load it"),
        ("grey", r"float32 \[n, 1, h, w\]; expected"),
        ("rank3", r"\[3, h, w\]; expected"),
        ("uint8", r"is uint8 \[n, 3, h, w\]; expected float32"),
        ("fixed", r"\[1, 3, 64, 64\]; expected .* dynamic N, H, W"),
    ],
)
def test_bad_model_files_raise_one_line_load_errors(
    kind: str, cause: str, tiny_onnx_x2: Path, tmp_path: Path
) -> None:
    path = bad_model(kind, tiny_onnx_x2, tmp_path)
    with pytest.raises(ModelLoadError, match=cause) as info:
        Engine(path, CPU_ONLY)
    message = str(info.value)
    assert message.startswith(f"model file {path}: ")
    assert "\n" not in message


def test_require_gpu_refuses_a_cpu_session(tiny_onnx_x2: Path) -> None:
    config = EngineConfig(providers=(CPU,), require_gpu=True)
    with pytest.raises(RuntimeError, match=r"--require-gpu: CUDAExecutionProvider is not active"):
        Engine(tiny_onnx_x2, config)


def test_default_providers_report_the_provider_actually_used(tiny_onnx_x2: Path) -> None:
    engine = Engine(tiny_onnx_x2, EngineConfig(intra_op_threads=1))
    assert engine.active_provider == engine.providers[0]
    if engine.active_provider != CUDA:  # the usual case here: CUDA listed, libraries missing
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            Engine(tiny_onnx_x2, EngineConfig(require_gpu=True, intra_op_threads=1))


def test_providers_missing_from_the_build_are_skipped(tiny_onnx_x2: Path) -> None:
    engine = Engine(tiny_onnx_x2, EngineConfig(providers=("NoSuchExecutionProvider", CPU)))
    assert engine.active_provider == CPU
    with pytest.raises(RuntimeError, match="none of the requested execution providers"):
        Engine(tiny_onnx_x2, EngineConfig(providers=("NoSuchExecutionProvider",)))


def test_cuda_options_for_fixed_tile_shapes() -> None:
    options = cuda_provider_options(EngineConfig())
    assert options == {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    limited = cuda_provider_options(EngineConfig(gpu_mem_limit_bytes=2**30))
    assert limited["gpu_mem_limit"] == str(2**30)
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        cuda_provider_options(EngineConfig(cudnn_conv_algo_search="FAST"))


def test_select_providers_keeps_order_and_configures_cuda() -> None:
    config = EngineConfig(cudnn_conv_algo_search="HEURISTIC")
    chosen = select_providers((CUDA, CPU), ["TensorrtExecutionProvider", CUDA, CPU], config)
    assert chosen[0] == (CUDA, cuda_provider_options(config))
    assert chosen[1] == CPU
    assert select_providers((CUDA, CPU), [CPU], config) == [CPU]


def test_engine_config_is_validated(tiny_onnx_x2: Path) -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        Engine(tiny_onnx_x2, EngineConfig(providers=(CPU,), intra_op_threads=-1))


def test_engine_module_does_not_import_torch() -> None:
    code = "import sys, server.core.engine; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


def test_spinning_and_arena_resolve_per_device_and_can_be_forced() -> None:
    cpu, cuda = session_options(EngineConfig(), "cpu"), session_options(EngineConfig(), "cuda")
    spin = "session.intra_op.allow_spinning"
    assert cpu.get_session_config_entry(spin) == "1" and cpu.enable_cpu_mem_arena
    assert cuda.get_session_config_entry(spin) == "0" and cuda.enable_cpu_mem_arena
    forced = session_options(EngineConfig(spinning="off", cpu_arena="off"), "cpu")
    assert forced.get_session_config_entry(spin) == "0" and not forced.enable_cpu_mem_arena
    with pytest.raises(ValueError, match=r"spinning must be one of \('auto', 'on', 'off'\)"):
        session_options(EngineConfig(spinning="sometimes"), "cpu")


def test_engine_reports_the_switches_it_created_its_session_with(tiny_onnx_x2: Path) -> None:
    engine = Engine(tiny_onnx_x2, EngineConfig(providers=(CPU,), intra_op_threads=1))
    assert (engine.spinning, engine.cpu_arena) == (True, True)
    off = EngineConfig(providers=(CPU,), intra_op_threads=1, spinning="off", cpu_arena="off")
    engine = Engine(tiny_onnx_x2, off)
    assert (engine.spinning, engine.cpu_arena) == (False, False)
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    assert engine.run(x).shape == (1, 3, 16, 16)


def test_auto_switches_follow_the_provider_that_runs_not_the_one_asked_first(
    tiny_onnx_x2: Path,
) -> None:
    """onnxruntime-gpu lists CUDA on a machine with no GPU and falls back to the CPU; the
    "auto" switches must then be the CPU's (spinning on), as ModelInfo reports them."""
    engine = Engine(tiny_onnx_x2, EngineConfig(providers=(CUDA, CPU), intra_op_threads=1))
    assert engine.spinning == (engine.active_provider == CPU)
    assert engine.cpu_arena
