"""The exported files: graph, shapes, numbers against torch, metadata, float16, verification."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.to_onnx import (
    ExportError,
    ExportOptions,
    ExportReport,
    count_op,
    export_onnx,
    weights_sha256,
)
from export.verify import FP32_TOLERANCE, VERIFY_SHAPES, onnx_max_abs_diff
from rdn.checkpoint import load_checkpoint, load_model, make_payload, save_checkpoint
from rdn.metadata import KEY_TRAINING, read_metadata, read_model_metadata
from rdn.model import RDNConfig

SCALES = (2, 3, 4)
# Shapes the export never saw: not the traced example, not the verification shapes.
NEW_SHAPES = ((2, 3, 19, 41), (1, 3, 64, 33), (3, 3, 8, 8))


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_inputs(
    shapes: tuple[tuple[int, ...], ...], seed: int = 1
) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [("x".join(map(str, s)), rng.random(s, dtype=np.float32)) for s in shapes]


@pytest.mark.parametrize("scale", SCALES)
def test_graph_has_no_batchnorm_and_named_dynamic_io(
    scale: int, onnx_path: Callable[[int], Path]
) -> None:
    model = onnx.load(str(onnx_path(scale)))
    onnx.checker.check_model(model, full_check=True)
    assert count_op(model, "BatchNormalization") == 0
    assert count_op(model, "Conv") > 0
    assert count_op(model, "DepthToSpace") == (2 if scale == 4 else 1)
    # the RGB conv runs before the last shuffle (export/subpixel.py): it moves 3 channels/pixel
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    last_shuffle = [n for n in inferred.graph.node if n.op_type == "DepthToSpace"][-1]
    r = 2 if scale == 4 else scale
    assert shapes[last_shuffle.input[0]][1].dim_value == 3 * r * r
    assert last_shuffle.output[0] == "sr"
    (lr,) = model.graph.input
    (sr,) = model.graph.output
    assert (lr.name, sr.name) == ("lr", "sr")
    assert lr.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    lr_dims = [d.dim_param or d.dim_value for d in lr.type.tensor_type.shape.dim]
    assert lr_dims == ["batch", 3, "height", "width"]
    sr_dims = [d.dim_param or d.dim_value for d in sr.type.tensor_type.shape.dim]
    assert sr_dims[:2] == ["batch", 3] and all(isinstance(d, str) for d in sr_dims[2:])


@pytest.mark.parametrize("scale", SCALES)
def test_self_contained_single_file(scale: int, onnx_path: Callable[[int], Path]) -> None:
    path = onnx_path(scale)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(path.name)] == [path.name]
    model = onnx.load(str(path), load_external_data=False)
    assert model.graph.initializer
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def test_odd_non_square_input_and_batch_three_at_x2(onnx_path: Callable[[int], Path]) -> None:
    sess = session(onnx_path(2))
    (out,) = sess.run(None, {"lr": np.random.default_rng(0).random((1, 3, 37, 53), np.float32)})
    assert out.shape == (1, 3, 74, 106) and out.dtype == np.float32
    (out,) = sess.run(None, {"lr": np.zeros((3, 3, 37, 53), np.float32)})
    assert out.shape == (3, 3, 74, 106)


@pytest.mark.parametrize("scale", SCALES)
def test_onnxruntime_matches_torch_on_unseen_shapes(
    scale: int, onnx_path: Callable[[int], Path], tiny_checkpoint_factory: Callable[[int], Path]
) -> None:
    assert not set(NEW_SHAPES) & set(VERIFY_SHAPES)
    model, _ = load_model(tiny_checkpoint_factory(scale))  # unfolded, eval mode
    diff = onnx_max_abs_diff(session(onnx_path(scale)), model, random_inputs(NEW_SHAPES))
    assert diff <= FP32_TOLERANCE


@pytest.mark.parametrize("scale", (3, 4))
def test_library_report_numbers(scale: int, library_export: Callable[[int], ExportReport]) -> None:
    report = library_export(scale)
    assert report.max_abs_diff is not None and report.max_abs_diff <= FP32_TOLERANCE
    assert report.fold_max_abs_diff is not None and report.fold_max_abs_diff <= FP32_TOLERANCE
    assert report.verify_provider == "CPUExecutionProvider"
    assert len(report.verified_inputs) == len(VERIFY_SHAPES) + 1
    assert report.verified_inputs[-1].startswith("astronaut 1x3x")
    assert report.folded_batchnorms == 4 * 3  # D=3 blocks x (C=3 dense layers + LFF)
    assert report.size_bytes == report.output.stat().st_size
    assert report.notes == ()


@pytest.mark.parametrize("scale", SCALES)
def test_metadata_describes_the_checkpoint(
    scale: int, onnx_path: Callable[[int], Path], tiny_checkpoint_factory: Callable[[int], Path]
) -> None:
    data = load_checkpoint(tiny_checkpoint_factory(scale))
    meta = read_model_metadata(onnx_path(scale))
    assert RDNConfig(**meta.config) == RDNConfig(**data["config"])
    assert meta.scale == scale and meta.step == data["step"] == 3
    assert meta.weights_sha256 == weights_sha256(data["model"])
    assert meta.precision == "float32"
    assert meta.value_range == (0.0, 1.0)
    assert (meta.channel_order, meta.layout) == ("RGB", "NCHW")
    assert (meta.input_name, meta.output_name) == ("lr", "sr")
    props = read_metadata(onnx_path(scale))
    assert props["rdn.value_range"] == "0,1" and props["rdn.scale"] == str(scale)
    # onnxruntime exposes the same map: what the server reads
    assert session(onnx_path(scale)).get_modelmeta().custom_metadata_map["rdn.scale"] == str(scale)


def test_training_metadata_is_small_json(library_export: Callable[[int], ExportReport]) -> None:
    props = read_metadata(library_export(3).output)
    training = read_model_metadata(library_export(3).output).training
    assert training["train_config"] == {"preset": "tiny", "lr": 1e-4, "batch_size": 16, "patch": 48}
    assert training["best_psnr"] == pytest.approx(31.25)
    assert training["bn_frozen"] is True
    assert "optimizer" not in training and "rng" not in training
    assert len(props[KEY_TRAINING]) < 1024


def test_fp16_structure(fp16_x2: ExportReport) -> None:
    model = onnx.load(str(fp16_x2.output))
    onnx.checker.check_model(model, full_check=True)
    assert count_op(model, "BatchNormalization") == 0
    io = [*model.graph.input, *model.graph.output]
    assert [v.type.tensor_type.elem_type for v in io] == [onnx.TensorProto.FLOAT] * 2
    float_inits = [t for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64]
    assert float_inits and {t.data_type for t in float_inits} == {onnx.TensorProto.FLOAT16}
    assert read_model_metadata(fp16_x2.output).precision == "float16"
    sess = session(fp16_x2.output)  # loads and runs in onnxruntime
    (out,) = sess.run(None, {"lr": np.full((1, 3, 9, 7), 0.5, np.float32)})
    assert out.dtype == np.float32 and out.shape == (1, 3, 18, 14)


def test_fp16_numeric_check_runs_only_on_a_real_cuda_session(fp16_x2: ExportReport) -> None:
    if fp16_x2.verify_provider == "CUDAExecutionProvider":  # a GPU machine with CUDA 13/cuDNN 9
        assert fp16_x2.max_abs_diff is not None and fp16_x2.max_abs_diff <= 1e-2
    else:  # this project's CI and dev machines: said, not hidden
        assert fp16_x2.max_abs_diff is None
        assert any(note.startswith("fp16 numeric check skipped:") for note in fp16_x2.notes)
    assert fp16_x2.fold_max_abs_diff is not None and fp16_x2.fold_max_abs_diff <= FP32_TOLERANCE


def test_verification_catches_a_different_model(
    onnx_path: Callable[[int], Path], tiny_checkpoint_factory: Callable[[int], Path]
) -> None:
    model, _ = load_model(tiny_checkpoint_factory(3))
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.upsample.to_rgb.bias[1] += 0.01  # every green output pixel off by 0.01
    sess, inputs = session(onnx_path(3)), random_inputs(VERIFY_SHAPES)
    assert onnx_max_abs_diff(sess, model, inputs) <= FP32_TOLERANCE
    assert onnx_max_abs_diff(sess, wrong, inputs) == pytest.approx(0.01, rel=1e-3)


def test_failed_verification_writes_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(
        ExportError, match=r"verification failed: .* max \|diff\| [0-9.e-]+ > 1e-12"
    ):
        export_onnx(tiny_checkpoint, output, ExportOptions(tolerance=1e-12))
    assert not output.exists()
    assert list(tmp_path.rglob("*")) == []  # no temp file, no folder


def test_non_finite_model_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.sfe1.bias[0] = float("nan")
    broken = tmp_path / "nan.pt"
    save_checkpoint(broken, make_payload(model, step=7))
    with pytest.raises(ExportError, match="not finite"):
        export_onnx(broken, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


def test_no_verify_at_lowest_opset(tiny_checkpoint: Path, tmp_path: Path) -> None:
    report = export_onnx(
        tiny_checkpoint, tmp_path / "o17.onnx", ExportOptions(opset=17, verify=False)
    )
    assert report.max_abs_diff is None and report.fold_max_abs_diff is None
    assert report.verified_inputs == () and "verification skipped (--no-verify)" in report.notes
    model = onnx.load(str(report.output))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert count_op(model, "BatchNormalization") == 0
    # unverified by the exporter, so check it here: the opset conversion kept the function
    torch_model, _ = load_model(tiny_checkpoint)
    diff = onnx_max_abs_diff(session(report.output), torch_model, random_inputs(NEW_SHAPES[:2]))
    assert diff <= FP32_TOLERANCE
