"""rdn-export --int8: a QDQ int8 model with the model's own quantization, checked for its loss."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.int8 import activation_points, image_point, pad_rgb_conv
from rdn.checkpoint import load_model, make_payload, save_checkpoint
from rdn.imaging import from_tensor_layout
from rdn.int8 import calibrate, calibration_batches, int8_model
from rdn.metadata import read_model_metadata
from rdn.metrics import psnr_y

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def int8_export(cli: Cli, tiny_checkpoint: Path, set5_dir: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("int8") / "tiny_int8.onnx"
    result = cli(
        "--checkpoint", tiny_checkpoint, "--output", output, "--int8", "--calibrate", set5_dir,
        "--allow-int8-loss",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8 loses" in result.stdout and "dB lost on 5 photos" in result.stderr
    return output


def test_int8_file_is_qdq_with_a_float_first_conv_and_says_its_precision_and_loss(
    int8_export: Path,
) -> None:
    proto = onnx.load(str(int8_export))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and "DequantizeLinear" in ops
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    # the first conv reads float pixels with float weights; the RGB conv is int8, padded to
    # 16 output channels (onnxruntime's fast integer conv) and sliced back to 3 x 2 x 2
    assert convs[0].input[0] == "lr" and not convs[0].input[1].endswith("DequantizeLinear_Output")
    assert convs[-1].input[1].endswith("DequantizeLinear_Output")
    inits = {i.name: i for i in proto.graph.initializer}
    rgb_weight = inits[convs[-1].input[1].removesuffix("_DequantizeLinear_Output") + "_quantized"]
    assert rgb_weight.dims[0] == 16
    # the graph ends in the RGB values on the 8-bit image's grid: scale 1/255, zero point 0
    (last_dq,) = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits
    ][-1:]
    scale = onnx.numpy_helper.to_array(inits[last_dq.input[1]])
    assert float(scale) == np.float32(1 / 255) and ops[-1] == "DepthToSpace"
    meta = read_model_metadata(int8_export)
    assert meta.precision == "int8" and meta.int8_loss_db is not None
    assert meta.int8_verified_on == "5 photos of Set5" and meta.name == "rdn_x2_int8"


def test_int8_file_computes_what_the_fake_quantized_model_computes(
    int8_export: Path, tiny_checkpoint: Path, set5_dir: Path
) -> None:
    """Same calibration, same rounding: the onnxruntime int8 output and the torch model's
    fake-quantized output agree to a fraction of an 8-bit level on average. (Isolated values
    differ more: a value that the two engines' float sums put on either side of a rounding
    boundary moves one level, and the dense layers pass that on; docs/int8.md.)"""
    twin = int8_model(load_model(tiny_checkpoint)[0]).eval()
    calibrate(twin, calibration_batches(set5_dir, 2, limit=32))
    x = calibration_batches(set5_dir, 2, limit=5)[0]
    session = ort.InferenceSession(str(int8_export), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"lr": x.numpy()})
    with torch.no_grad():
        want = twin(x).numpy()
    levels = np.abs(got - want) * 255
    assert levels.mean() < 0.5
    images = [from_tensor_layout(a) for a in (got, want)]
    assert psnr_y(images[0], images[1], shave=2) > 40


def test_an_int8_file_over_the_loss_bound_is_refused_and_nothing_is_written(
    cli: Cli, tiny_checkpoint: Path, set5_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "refused.onnx"
    result = cli(
        "--checkpoint", tiny_checkpoint, "--output", output, "--int8", "--calibrate", set5_dir,
        "--int8-max-loss", "0",
    )  # fmt: skip
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("rdn-export: error")]
    assert len(error) == 1 and "over --int8-max-loss 0" in error[0] and "--qat" in error[0]
    assert not output.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--int8"], "--int8 needs --calibrate"),
        (["--int8", "--fp16", "--calibrate", "x"], "exclude"),
    ],
)
def test_int8_usage_errors_are_one_line(
    cli: Cli, tiny_checkpoint: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    result = cli("--checkpoint", tiny_checkpoint, "--output", tmp_path / "m.onnx", *extra)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_the_graph_rounds_exactly_the_tensors_the_model_rounds(int8_export: Path, cli_x2) -> None:
    """Every uint8 tensor of the int8 file is a quantization point of the float graph (conv,
    ReLU, concat and add outputs, the RGB output), and every point is rounded: none more, none
    fewer."""
    proto = onnx.load(str(int8_export))
    inits = {i.name for i in proto.graph.initializer}
    rounded = {
        n.input[0]
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }
    graph = pad_rgb_conv(onnx.load(str(cli_x2.output))).graph
    points, aliases = activation_points(graph)
    assert rounded == set(points) | set(aliases) | {image_point(graph)}
    assert len(points) == 2 + 3 * (3 * 2 + 2) + 4 + 1  # tiny preset: D=3 blocks of C=3 layers


def test_the_concats_of_a_block_share_one_scale_so_onnxruntime_copies_them(
    cli: Cli, tiny_checkpoint: Path, set5_dir: Path, tmp_path: Path
) -> None:
    """In each residual dense block the concat chain (cat_k = [cat_k-1, relu_k]) quantizes
    every concat with one scale and zero point: onnxruntime's QLinearConcat then copies the
    part already quantized instead of requantizing it. The ReLU outputs keep ranges from 0.
    The twin's first concat of each block is given a narrower range of its own than the
    others (calibration alone often gives them all the last one's), so only tying makes
    them one."""
    twin = int8_model(load_model(tiny_checkpoint)[0]).eval()
    calibrate(twin, calibration_batches(set5_dir, 2, limit=32))
    for block in twin.rdbs:
        first = block.layers[0].cat_q
        first.hi.mul_(0.5)
        first.lo.mul_(0.5)
    checkpoint, output = tmp_path / "twin.pt", tmp_path / "twin_int8.onnx"
    save_checkpoint(checkpoint, make_payload(twin, step=3))
    result = cli(
        "--checkpoint", checkpoint, "--output", output, "--int8", "--calibrate", set5_dir,
        "--allow-int8-loss",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    proto = onnx.load(str(output))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    qparams = {
        n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }
    chains: list[list[str]] = []
    for node in proto.graph.node:
        if node.op_type != "Concat" or len(node.input) != 2:
            continue
        first, second = (name.removesuffix("_DequantizeLinear_Output") for name in node.input)
        if chains and chains[-1][-1] == first:
            chains[-1].append(node.output[0])
        else:
            chains.append([node.output[0]])
        assert qparams[second][1] == 0  # the ReLU output: a range from 0
    assert [len(chain) for chain in chains] == [3, 3, 3]  # tiny preset: D=3 blocks, C=3 layers
    for chain in chains:
        assert len({qparams[name] for name in chain}) == 1, chain
    assert len({qparams[chain[0]] for chain in chains}) == 3  # one range per block, not one
