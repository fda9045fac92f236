"""The KServe v2 / Open Inference Protocol rules, once, on plain Python values: what a model
looks like to the protocol, which inference requests are valid, and Triton's model
configuration and statistics.

Both KServe doors (gRPC ``inference.GRPCInferenceService`` and the HTTP/REST routes) turn their
wire form into an ``InferCall`` and ask ``check_infer`` for its shape, so a request means the
same and is refused with the same words whichever way it came. How the tensor's bytes travel
(raw_input_contents, JSON numbers, the binary data extension) stays with each door.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rdn.constants import INPUT_NAME, OUTPUT_NAME
from server.core.errors import NotFound, RequestError, RequestTooLarge, check_name
from server.core.pipeline import Pipeline
from server.core.repository import READY, IndexEntry, Snapshot
from server.imaging.limit_text import pixels_over
from server.pb.inference import grpc_service_pb2 as pb
from server.wire import RESPONSE_OVERHEAD_BYTES

SERVER_NAME = "rdn-sr"  # the distribution; ServerMetadata answers its installed version
MODEL_VERSION = "1"
PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the model
BACKEND = "onnxruntime"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")  # Triton's names
DATATYPE = "FP32"
TENSOR_SHAPE = (-1, 3, -1, -1)  # [N, 3, H, W]; -1 = any size
FLOAT32_LE = np.dtype("<f4")  # the protocol's raw byte layout
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "classification")
ACCEPTED_INPUT = f"{INPUT_NAME!r} {DATATYPE} [N, 3, H, W] (RGB planes in [0, 1])"

Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class TensorIn:
    """One input tensor of a request as the wire carried it (values not yet checked)."""

    name: object
    datatype: object
    shape: object  # a sequence of dimensions, as sent
    parameters: Sequence[str]  # the names of its parameters


@dataclass(frozen=True)
class TensorOut:
    """One requested output, as the wire carried it."""

    name: object
    parameters: Sequence[str]


@dataclass(frozen=True)
class InferCall:
    """An inference request's inputs and requested outputs, in plain values."""

    inputs: Sequence[TensorIn]
    outputs: Sequence[TensorOut]


def shown(value: object) -> str:
    """A client's value quoted in an error: scalars as they are (cut short), containers by
    their type only (their repr could be huge or nested past the recursion limit)."""
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(check_name(value, "a name") if isinstance(value, str) else value)
        return text if len(text) <= 80 else text[:77] + "..."
    return "a list" if isinstance(value, list | tuple) else f"a {type(value).__name__}"


def shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) if type(d) is int else shown(d) for d in shape) + "]"


def check_parameters(where: str, names: Sequence[str]) -> None:
    """Parameter names are bounded, and none asks for what this server cannot do."""
    for key in names:
        check_name(key, f"a parameter name of {where}")
        if key in UNSUPPORTED_PARAMETERS:
            raise RequestError(
                f"{where} sets parameter {key!r}, which this server does not support (no shared "
                "memory, no classification); send the tensor data in the request and read "
                "the whole output"
            )


def check_infer(call: InferCall) -> Shape:
    """The checked [N, 3, H, W] shape of the request's one input; its outputs checked too."""
    if len(call.inputs) != 1:
        names = [shown(t.name) for t in call.inputs[:8]]
        raise RequestError(
            f"request has {len(call.inputs)} inputs (first: [{', '.join(names)}]); the model "
            f"takes one: {ACCEPTED_INPUT}"
        )
    tensor = call.inputs[0]
    if tensor.name != INPUT_NAME:
        raise RequestError(
            f"unknown input {shown(tensor.name)}; expected one input {ACCEPTED_INPUT}"
        )
    if tensor.datatype != DATATYPE:
        raise RequestError(
            f"input {INPUT_NAME!r} has datatype {shown(tensor.datatype)}; only {DATATYPE} is "
            "accepted (float32 RGB values in [0, 1])"
        )
    shape = tensor.shape
    if (
        not isinstance(shape, Sequence)
        or len(shape) != 4
        or not all(type(d) is int and d >= 1 for d in shape)
        or shape[1] != 3
    ):
        given = shape_text(shape) if isinstance(shape, Sequence) else shown(shape)
        raise RequestError(
            f"input {INPUT_NAME!r} has shape {given}; expected [N, 3, H, W] with N, H, W >= 1, "
            "whole numbers (a batch of RGB images, channels first)"
        )
    check_parameters(f"input {INPUT_NAME!r}", tensor.parameters)
    seen = False
    for output in call.outputs:
        if output.name != OUTPUT_NAME:
            raise RequestError(
                f"unknown output {shown(output.name)}; the model has one output {OUTPUT_NAME!r}"
            )
        if seen:
            raise RequestError(f"output {OUTPUT_NAME!r} is requested twice; request it once")
        seen = True
        check_parameters(f"output {OUTPUT_NAME!r}", output.parameters)
    n, _, h, w = shape
    return n, 3, h, w


def check_model(name: str, version: str, snapshot: Snapshot) -> Pipeline:
    """The served model ``name`` at ``version`` ("" = latest); ``NotFound`` otherwise,
    ``RequestError`` (without echoing them) when either is longer than any name can be."""
    check_name(version, "model version")
    pipeline = snapshot.get(name)
    if version not in ("", MODEL_VERSION):
        raise NotFound(
            f"model {name!r} has no version {version!r}; available: {MODEL_VERSION!r} "
            "(or empty for the latest)"
        )
    return pipeline


def check_limits(shape: Shape, max_pixels: int, max_message_bytes: int, pipeline: Pipeline) -> int:
    """Refuse (RESOURCE_EXHAUSTED) a request that could never be answered, before any work;
    the queue units its images need."""
    n, _, h, w = shape
    pixels = n * h * w
    if pixels > max_pixels:
        raise RequestTooLarge(
            f"input {INPUT_NAME!r} holds {n} image(s) of {w}x{h}, together "
            f"{pixels_over(pixels, max_pixels)} per request; send fewer or smaller images"
        )
    units = pipeline.units(h, w, images=n)
    pipeline.admit(units, f"input {INPUT_NAME!r} ({n} image(s) of {w}x{h})")
    scale = pipeline.scale
    out_bytes = n * 3 * (scale * h) * (scale * w) * FLOAT32_LE.itemsize
    if out_bytes > max_message_bytes - RESPONSE_OVERHEAD_BYTES:
        raise RequestTooLarge(
            f"output {OUTPUT_NAME!r} would be {n}x3x{scale * h}x{scale * w} {DATATYPE} = "
            f"{out_bytes} bytes, more than one message carries (--max-message-bytes "
            f"{max_message_bytes}); send fewer or smaller images per request, or raise "
            "the limit on both ends"
        )
    return units


def package_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_metadata(pipeline: Pipeline) -> dict[str, object]:
    """ModelMetadata of one model, as the REST protocol writes it (gRPC: the same fields)."""
    tensor = {"datatype": DATATYPE, "shape": list(TENSOR_SHAPE)}
    return {
        "name": pipeline.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, **tensor}],
        "outputs": [{"name": OUTPUT_NAME, **tensor}],
    }


def model_precision(pipeline: Pipeline) -> str:
    """The weights' precision its metadata states: float32, float16 or int8."""
    return pipeline.metadata.precision if pipeline.metadata else "float32"


def model_config(pipeline: Pipeline) -> pb.ModelConfig:
    """Triton's view of one model (its schema, for both doors): no implicit batch dimension
    (max_batch_size 0), the batch is the first of the tensors' dims."""
    return pb.ModelConfig(
        name=pipeline.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=0,
        input=[pb.ModelInput(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=TENSOR_SHAPE)],
        output=[pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=TENSOR_SHAPE)],
        default_model_filename=pipeline.path.name,
        parameters={
            "precision": pb.ModelParameter(string_value=model_precision(pipeline)),
            "scale": pb.ModelParameter(string_value=str(pipeline.scale)),
        },
    )


def _duration(pair: tuple[int, int]) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=pair[0], ns=pair[1])


def model_statistics(pipeline: Pipeline) -> pb.ModelStatistics:
    """Triton's ModelStatistics of one model from its pipeline's counters."""
    stats = pipeline.stats.snapshot()
    return pb.ModelStatistics(
        name=pipeline.name,
        version=MODEL_VERSION,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=pb.StatisticDuration(),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
    )


def index_rows(entries: Sequence[IndexEntry], ready_only: bool) -> list[dict[str, str]]:
    """RepositoryIndex rows (name, version, state, reason) of the repository's entries."""
    return [
        {
            "name": e.name,
            "version": MODEL_VERSION if e.state == READY else "",
            "state": e.state,
            "reason": e.reason,
        }
        for e in entries
        if e.state == READY or not ready_only
    ]


def refuse_load_parameters(names: Iterable[str]) -> None:
    """RepositoryModelLoad takes no parameters: models load from the repository's files."""
    for key in names:
        check_name(key, "a load parameter name")
        raise RequestError(
            f"load parameter {key!r} is not supported: models load from the repository's "
            "files (--model-dir / --model); send no parameters"
        )
