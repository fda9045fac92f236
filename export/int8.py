"""Int8 export: the float graph of an int8 RDN, quantized exactly where and as the model says.

onnxruntime's static quantizer writes the QDQ graph (QuantizeLinear / DequantizeLinear pairs,
which onnxruntime fuses into integer convolutions at load); every scale and zero point in it
is the one the model's fake quantizers used (``TensorQuantOverrides``), so the exported file
computes what quantization-aware training trained and what calibration measured. The first
conv stays float; the RGB output conv is int8 and writes the 8-bit image's grid, so the graph
ends in one DequantizeLinear of the RGB values (see ``rdn.quant``).

``int8_loss`` is the export's quality check: Y-PSNR of the float and the int8 model on photos,
the benchmark's protocol (HR modcropped, bicubic LR, shave = scale).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from rdn.constants import CPU
from rdn.imaging import (
    downscale,
    from_tensor_layout,
    list_images,
    modcrop,
    read_rgb,
    to_tensor_layout,
)
from rdn.metadata import INT8_MAX_LOSS_DB
from rdn.metrics import psnr_y
from rdn.model import RDN
from rdn.quant import ActQuant, ImageQuant, execution_order, weight_scales

DEFAULT_MAX_LOSS_DB = INT8_MAX_LOSS_DB  # the most Y-PSNR an int8 file may lose (rdn-export)
VERIFY_MAX_SIDE = 256  # LR pixels: larger photos are centre-cropped for the PSNR check
_PROBE = np.zeros((1, 3, 8, 8), np.float32)  # the quantizer's own calibration pass; overridden
# onnxruntime's x64 integer convs take their fast "symmetric" path (an indirection buffer, the
# int32 sums requantized in registers) only for at least 16 output channels, a multiple of 8
# (AVX2; 4 for AVX-512); any other conv im2col-copies its whole input, kernel_size times over,
# and keeps all int32 sums: for the RGB conv (12 or 27 channels) at x4 on a 384x384 input, some
# 600 MiB. The RGB conv is padded with zero channels to such a count and sliced back.
SYMMETRIC_CONV_MIN_CHANNELS = 16
SYMMETRIC_CONV_CHANNEL_MULTIPLE = 8


class Int8Error(ValueError):
    """The float graph does not match the int8 model's quantizers; the message says where."""


@dataclass(frozen=True)
class Int8Loss:
    images: int
    float_psnr_y: float  # mean over the images
    int8_psnr_y: float

    @property
    def loss_db(self) -> float:
        return self.float_psnr_y - self.int8_psnr_y


class _OneProbe(CalibrationDataReader):
    def __init__(self, input_name: str) -> None:
        self._feeds = iter([{input_name: _PROBE}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def float_convs(graph: onnx.GraphProto) -> tuple[str, str]:
    """Names of the first Conv node (reads pixels; stays float) and the last (RGB; int8)."""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if len(convs) < 3 or convs[0].input[0] != graph.input[0].name:
        raise Int8Error("graph does not start with a conv on its input; export it with rdn-export")
    return convs[0].name, convs[-1].name


def image_point(graph: onnx.GraphProto) -> str:
    """The RGB conv's output: uint8 on the 8-bit image's fixed grid (``rdn.quant.ImageQuant``)."""
    _, last = float_convs(graph)
    return next(n.output[0] for n in graph.node if n.name == last)


def pad_rgb_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose RGB conv has zero output channels added (to a count that
    onnxruntime's fast integer conv takes), then a Slice that drops them: the same function."""
    padded_proto = onnx.ModelProto()
    padded_proto.CopyFrom(proto)
    graph = padded_proto.graph
    _, last = float_convs(graph)
    index, conv = next((i, n) for i, n in enumerate(graph.node) if n.name == last)
    inits = {i.name: i for i in graph.initializer}
    weight = onnx.numpy_helper.to_array(inits[conv.input[1]])
    channels = weight.shape[0]
    multiple = SYMMETRIC_CONV_CHANNEL_MULTIPLE
    padded = max(SYMMETRIC_CONV_MIN_CHANNELS, -(-channels // multiple) * multiple)
    if padded == channels or len(conv.input) < 3:
        return padded_proto
    bias = onnx.numpy_helper.to_array(inits[conv.input[2]])
    extra = padded - channels
    new_weight = np.concatenate([weight, np.zeros((extra, *weight.shape[1:]), weight.dtype)])
    new_bias = np.concatenate([bias, np.zeros(extra, bias.dtype)])
    for name, array in ((conv.input[1], new_weight), (conv.input[2], new_bias)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    stale = {conv.input[1], conv.input[2]}  # the exporter's shapes of the unpadded tensors
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    output = conv.output[0]
    conv.output[0] = f"{output}_padded"
    bounds = {"starts": 0, "ends": channels, "axes": 1}
    for key, value in bounds.items():
        graph.initializer.append(
            onnx.numpy_helper.from_array(np.array([value], np.int64), f"{last}_{key}")
        )
    cut = onnx.helper.make_node(
        "Slice",
        [conv.output[0], *(f"{last}_{key}" for key in bounds)],
        [output],
        name=f"{last}_drop_padding",
    )
    graph.node.insert(index + 1, cut)
    return padded_proto


def activation_points(graph: onnx.GraphProto) -> tuple[list[str], dict[str, str]]:
    """Tensors the int8 graph holds as uint8 on observed ranges, in graph order, and aliases.

    A conv's output (its ReLU's, where one follows), every Concat and Add output; the RGB
    conv's output is on a fixed grid instead (``image_point``). A DepthToSpace between two int8
    convs, or the Slice that drops the RGB conv's padding (``pad_rgb_conv``), only moves
    values, so its output takes its input's quantization (alias output -> input); the final
    DepthToSpace moves float values after the last DequantizeLinear.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    _, last = float_convs(graph)
    outputs = {o.name for o in graph.output}
    points: list[str] = []
    aliases: dict[str, str] = {}
    for node in graph.node:
        out = node.output[0]
        if node.op_type == "Conv" and node.name != last:
            after = consumers.get(out, [])
            if not (len(after) == 1 and after[0].op_type == "Relu"):
                points.append(out)
        elif node.op_type in ("Relu", "Concat", "Add"):
            points.append(out)
        elif node.op_type == "Slice" or (node.op_type == "DepthToSpace" and out not in outputs):
            aliases[out] = node.input[0]
    return points, aliases


def quantization_overrides(model: RDN, graph: onnx.GraphProto) -> dict[str, list[dict]]:
    """onnxruntime ``TensorQuantOverrides``: each uint8 tensor's and int8 weight's parameters."""
    points, aliases = activation_points(graph)
    quantizers: list[ActQuant] = execution_order(model)
    if len(points) != len(quantizers):
        raise Int8Error(
            f"the float graph has {len(points)} int8 tensors, the model {len(quantizers)} "
            "quantizers; was the graph exported from this model?"
        )
    overrides: dict[str, list[dict]] = {}
    for name, quantizer in zip(points, quantizers, strict=True):
        if int(quantizer.count) == 0:
            raise Int8Error("the model is not calibrated: rdn-export --int8 --calibrate DIR")
        scale, zero_point = quantizer.qparams()
        overrides[name] = [
            {"scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, np.uint8)}
        ]
    if not isinstance(model.upsample.to_rgb.out_q, ImageQuant):
        raise Int8Error("the model's RGB conv is not quantized; was it made by rdn.int8?")
    scale, zero_point = model.upsample.to_rgb.out_q.qparams()
    overrides[image_point(graph)] = [
        {"scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, np.uint8)}
    ]
    for alias, source in aliases.items():
        overrides[alias] = overrides[source]
    state = model.state_dict()
    inits = {i.name: i for i in graph.initializer}
    first, last = float_convs(graph)
    for node in graph.node:
        if node.op_type != "Conv" or node.name == first:
            continue
        weight_name = node.input[1]
        if node.name == last:
            # the RGB conv moved before the shuffle (rdn.subpixel): its [3r^2, Gr^2, 3, 3]
            # weight holds the model's [3, G, 3, 3] one r^2 times over, plus zeros, so each
            # channel's absmax, and scale, is the model's
            weight = torch.from_numpy(onnx.numpy_helper.to_array(inits[weight_name]).copy())
        elif weight_name in state:
            weight = state[weight_name]
        else:
            raise Int8Error(f"conv weight {weight_name} is not a tensor of the model")
        overrides[weight_name] = [
            {"axis": 0, "scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
            for s in weight_scales(weight).tolist()
        ]
    return overrides


def quantize_graph(float_proto: onnx.ModelProto, model: RDN) -> onnx.ModelProto:
    """The QDQ int8 model of ``float_proto`` (the float graph of ``model``), metadata kept."""
    float_proto = pad_rgb_conv(float_proto)
    graph = float_proto.graph
    overrides = quantization_overrides(model, graph)
    with tempfile.TemporaryDirectory(prefix="rdn-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        scratch = onnx.ModelProto()
        scratch.CopyFrom(float_proto)  # the quantizer moves its input's weights to a side file
        with _without_preprocessing_advice():
            quantize_static(
                scratch,
                out,
                _OneProbe(graph.input[0].name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=[float_convs(graph)[0]],
                extra_options={
                    "TensorQuantOverrides": overrides,
                    "QDQDisableWeightAdjustForInt32Bias": True,
                    "WeightSymmetric": True,
                    "ActivationSymmetric": False,
                },
            )
        quantized = onnx.load(str(out))
    _check_scales(quantized, overrides)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(float_proto.metadata_props)
    return quantized


class _NoAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


@contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """The quantizer advises shape-inference pre-processing on the root logger at every call;
    rdn-export's graphs are already shape-inferred by the exporter."""
    root, advice = logging.getLogger(), _NoAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _check_scales(proto: onnx.ModelProto, overrides: dict[str, list[dict]]) -> None:
    """Every activation the quantizer rounded is one the model rounds, at the model's scale."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        name = node.input[0]
        if name not in overrides:
            raise Int8Error(f"onnxruntime quantized {name}, which the model keeps float")
        scale = float(onnx.numpy_helper.to_array(inits[node.input[1]]))
        if scale != float(overrides[name][0]["scale"]):
            raise Int8Error(f"{name}: scale {scale} in the graph, the model's is different")


def int8_loss(
    float_bytes: bytes, int8_bytes: bytes, photos: Sequence[Path], scale: int
) -> Int8Loss:
    """Mean Y-PSNR of both models on ``photos`` (HR -> bicubic LR -> model), CPU."""
    sessions = [_cpu_session(b) for b in (float_bytes, int8_bytes)]
    scores: list[list[float]] = [[], []]
    for path in photos:
        hr = modcrop(read_rgb(path), scale)
        full = downscale(hr, scale)
        top, left = _centre_origin(full.shape[:2], VERIFY_MAX_SIDE)
        lr = full[top : top + VERIFY_MAX_SIDE, left : left + VERIFY_MAX_SIDE]
        hr = hr[
            top * scale : (top + lr.shape[0]) * scale, left * scale : (left + lr.shape[1]) * scale
        ]
        x = to_tensor_layout(lr)
        for session, score in zip(sessions, scores, strict=True):
            (y,) = session.run(None, {session.get_inputs()[0].name: x})
            score.append(psnr_y(from_tensor_layout(np.asarray(y)), hr, shave=scale))
    if not photos:
        raise Int8Error("no photos to verify the int8 model on")
    return Int8Loss(len(photos), float(np.mean(scores[0])), float(np.mean(scores[1])))


def verification_photos(folder: Path, limit: int | None) -> list[Path]:
    photos = list_images(folder)[:limit]
    if not photos:
        raise Int8Error(f"calibration folder {folder}: no images")
    return photos


def _centre_origin(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """Top-left corner of the centre crop of at most ``side`` pixels a side."""
    h, w = shape[:2]
    return max(0, (h - side) // 2), max(0, (w - side) // 2)


def _cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=[CPU])
