"""The KServe v2 / Open Inference Protocol servicer (``inference.GRPCInferenceService``).

It serves the models of the repository that rdn.v1.Upscaler serves, on the same port, for
clients that speak the protocol of Triton, KServe and MLServer (``tritonclient[grpc]`` among
them): each model by its name (``rdn_x2``, ``rdn_x4_photo`` ...), version "1", input ``lr``
FP32 [N, 3, H, W] in [0, 1] (RGB planes), output ``sr`` FP32 [N, 3, s*H, s*W], unclipped. Every
image of a request is cut into the same tiles as an Upscale image and all of them go to the one
shared ``TileBatcher``, so tiles of both protocols share engine batches.

Triton's extensions for the model repository are here too: RepositoryIndex, explicit model
control (RepositoryModelLoad / RepositoryModelUnload: a hot swap, calls in flight finish on the
version they started with), ModelConfig and ModelStatistics.

Errors go through ``calls.grpc_status`` like Upscale's: a malformed request answers
INVALID_ARGUMENT naming the field and what is accepted, an unknown model or version NOT_FOUND,
an oversized request or a full queue RESOURCE_EXHAUSTED. ServerLive, ServerReady and ModelReady
are probes: they write no access log line. Request-level parameters (priority, timeout ...)
are accepted and ignored; shared-memory and classification parameters are refused, since the
answer could not be what they ask for.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from server.batcher import TileBatcher
from server.calls import (
    AccessObserver,
    AccessRecord,
    check_request_id,
    check_serving,
    in_pool,
    unary,
)
from server.config import ServerConfig
from server.errors import NotFound, RequestError, RequestTooLarge, check_name
from server.limit_text import pixels_over
from server.pb.inference import grpc_service_pb2 as pb
from server.pb.inference import grpc_service_pb2_grpc as pb_grpc
from server.pipeline import Pipeline
from server.repository import READY, LoadFailed, ModelRepository, Snapshot
from server.uploads import UploadBudget
from server.wire import RESPONSE_OVERHEAD_BYTES

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "rdn-sr"  # the distribution; ServerMetadata answers its installed version
MODEL_VERSION = "1"
PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the model
BACKEND = "onnxruntime"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")  # Triton's names
INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
DATATYPE = "FP32"
TENSOR_SHAPE = (-1, 3, -1, -1)  # [N, 3, H, W]; -1 = any size
FLOAT32_LE = np.dtype("<f4")  # the protocol's raw byte layout
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "classification")
OTHER_CONTENTS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp64_contents",
    "bytes_contents",
)


class HealthSource(Protocol):
    """Where readiness is read (``grpc_health``'s aio ``HealthServicer`` is one)."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse: ...


# ------------------------------------------------------------------------- pure helpers


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


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_parameters(where: str, parameters: Any) -> None:
    for key in parameters:
        check_name(key, f"a parameter name of {where}")
        if key in UNSUPPORTED_PARAMETERS:
            raise RequestError(
                f"{where} sets parameter {key!r}, which this server does not support (no shared "
                "memory, no classification); send the tensor data in the request and read "
                "the whole output"
            )


def input_shape(request: pb.ModelInferRequest) -> tuple[int, int, int, int]:
    """The checked [N, 3, H, W] shape of the request's one input."""
    accepted = f"{INPUT_NAME!r} {DATATYPE} [N, 3, H, W] (RGB planes in [0, 1])"
    if len(request.inputs) != 1:
        names = [check_name(t.name, "input name") for t in request.inputs[:8]]
        raise RequestError(
            f"request has {len(request.inputs)} inputs (first: {names}); the model takes one: "
            f"{accepted}"
        )
    tensor = request.inputs[0]
    check_name(tensor.name, "input name")
    if tensor.name != INPUT_NAME:
        raise RequestError(f"unknown input {tensor.name!r}; the model takes one input: {accepted}")
    if tensor.datatype != DATATYPE:
        raise RequestError(
            f"input {INPUT_NAME!r} has datatype {tensor.datatype!r}; only {DATATYPE} is accepted "
            "(float32 RGB values in [0, 1])"
        )
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise RequestError(
            f"input {INPUT_NAME!r} has shape {_shape_text(shape)}; expected [N, 3, H, W] with "
            "N, H, W >= 1 (a batch of RGB images, channels first)"
        )
    _check_parameters(f"input {INPUT_NAME!r}", tensor.parameters)
    n, _, h, w = shape
    return n, 3, h, w


def check_outputs(request: pb.ModelInferRequest) -> None:
    """Requested outputs must name ``sr`` (once); none requested means ``sr``."""
    seen: set[str] = set()
    for output in request.outputs:
        check_name(output.name, "output name")
        if output.name != OUTPUT_NAME:
            raise RequestError(
                f"unknown output {output.name!r}; the model has one output {OUTPUT_NAME!r}"
            )
        if output.name in seen:
            raise RequestError(f"output {OUTPUT_NAME!r} is requested twice; request it once")
        seen.add(output.name)
        _check_parameters(f"output {OUTPUT_NAME!r}", output.parameters)


def check_limits(shape: tuple[int, int, int, int], config: ServerConfig, pipeline: Pipeline) -> int:
    """Refuse (RESOURCE_EXHAUSTED) a request that could never be answered, before any work;
    the queue units its images need."""
    n, _, h, w = shape
    limits = config.limits
    pixels = n * h * w
    if pixels > limits.max_pixels:
        raise RequestTooLarge(
            f"input {INPUT_NAME!r} holds {n} image(s) of {w}x{h}, together "
            f"{pixels_over(pixels, limits.max_pixels)} per request; send fewer or smaller images"
        )
    units = pipeline.units(h, w, images=n)
    pipeline.admit(units, f"input {INPUT_NAME!r} ({n} image(s) of {w}x{h})")
    scale = pipeline.scale
    out_bytes = n * 3 * (scale * h) * (scale * w) * FLOAT32_LE.itemsize
    if out_bytes > limits.max_message_bytes - RESPONSE_OVERHEAD_BYTES:
        raise RequestTooLarge(
            f"output {OUTPUT_NAME!r} would be {n}x3x{scale * h}x{scale * w} {DATATYPE} = "
            f"{out_bytes} bytes, more than one message carries (--max-message-bytes "
            f"{limits.max_message_bytes}); send fewer or smaller images per request, or raise "
            "the limit on both ends"
        )
    return units


def check_data(request: pb.ModelInferRequest, shape: tuple[int, int, int, int]) -> None:
    """The input's data is in exactly one place and has exactly the shape's size."""
    tensor = request.inputs[0]
    count = int(np.prod(shape))
    where_ok = (
        f"send {count * FLOAT32_LE.itemsize} bytes of little-endian float32 in "
        f"raw_input_contents[0], or {count} values in inputs[0].contents.fp32_contents"
    )
    for field in OTHER_CONTENTS:
        if len(getattr(tensor.contents, field)):
            raise RequestError(
                f"input {INPUT_NAME!r} is {DATATYPE} but carries data in contents.{field}; "
                f"{where_ok}"
            )
    values = len(tensor.contents.fp32_contents)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise RequestError(
                f"raw_input_contents has {len(raw)} entries for 1 input; send one entry per input"
            )
        if values:
            raise RequestError(
                f"input {INPUT_NAME!r} carries data both in contents.fp32_contents and in "
                "raw_input_contents[0]; send it once"
            )
        expected = count * FLOAT32_LE.itemsize
        if len(raw[0]) != expected:
            raise RequestError(
                f"raw_input_contents[0] holds {len(raw[0])} bytes; input {INPUT_NAME!r} of shape "
                f"{_shape_text(shape)} {DATATYPE} needs {expected} (4 bytes per value, "
                "little-endian, row-major)"
            )
    elif values != count:
        if values == 0:
            raise RequestError(f"input {INPUT_NAME!r} carries no data; {where_ok}")
        raise RequestError(
            f"inputs[0].contents.fp32_contents holds {values} values; input {INPUT_NAME!r} of "
            f"shape {_shape_text(shape)} needs {count}"
        )


def input_array(request: pb.ModelInferRequest, shape: tuple[int, int, int, int]) -> np.ndarray:
    """The checked input as float32 [N, 3, H, W] (raw bytes are viewed, not copied)."""
    if request.raw_input_contents:
        array = np.frombuffer(request.raw_input_contents[0], FLOAT32_LE)
    else:
        array = np.asarray(request.inputs[0].contents.fp32_contents, np.float32)
    return array.astype(np.float32, copy=False).reshape(shape)


def tensor_metadata(name: str) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=DATATYPE, shape=TENSOR_SHAPE)


def package_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- servicer


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on the repository and tile batcher that Upscale uses."""

    def __init__(
        self,
        repository: ModelRepository,
        batcher: TileBatcher,
        config: ServerConfig,
        health: HealthSource,
        *,
        uploads: UploadBudget,
        codec_pool: Executor,
        serving: Callable[[], bool],
        access_observer: AccessObserver | None = None,
    ) -> None:
        self._repository = repository
        self._config = config
        self._health = health
        self._pool = codec_pool
        self._serving = serving
        self.access_observer = access_observer  # read by calls.unary (metrics)
        self._context = TensorContext(batcher, codec_pool, uploads, config)
        self._server_metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=package_version(), extensions=list(EXTENSIONS)
        )

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        """SERVING in the server's health state: warmed up, not draining, a model loaded."""
        answer = await self._health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    # -- probes: no access log line -----------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._ready(context))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Not ready for a model or version not served (as Triton answers), else the server's
        readiness."""
        try:
            check_model(request.name, request.version, self._repository.snapshot)
        except (NotFound, RequestError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._ready(context))

    # -- calls --------------------------------------------------------------------------
    @unary
    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ServerMetadataResponse:
        return self._server_metadata

    @unary
    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelMetadataResponse:
        pipeline = check_model(request.name, request.version, self._repository.snapshot)
        record.set(model=request.name, version=request.version)
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor_metadata(INPUT_NAME)],
            outputs=[tensor_metadata(OUTPUT_NAME)],
        )

    @unary
    async def ModelConfig(
        self,
        request: pb.ModelConfigRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelConfigResponse:
        pipeline = check_model(request.name, request.version, self._repository.snapshot)
        record.set(model=request.name)
        return pb.ModelConfigResponse(config=model_config(pipeline))

    @unary
    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelStatisticsResponse:
        snapshot = self._repository.snapshot
        if request.name:
            pipelines = [check_model(request.name, request.version, snapshot)]
        else:
            pipelines = snapshot.ordered()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(p) for p in pipelines])

    @unary
    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.RepositoryIndexResponse:
        check_name(request.repository_name, "repository_name")
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=entry.name,
                version=MODEL_VERSION if entry.state == READY else "",
                state=entry.state,
                reason=entry.reason,
            )
            for entry in self._repository.index()
            if entry.state == READY or not request.ready
        ]
        return pb.RepositoryIndexResponse(models=models)

    @unary
    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.RepositoryModelLoadResponse:
        check_name(request.repository_name, "repository_name")
        for key in request.parameters:
            check_name(key, "a load parameter name")
            raise RequestError(
                f"load parameter {key!r} is not supported: models load from the repository's "
                "files (--model-dir / --model); send no parameters"
            )
        try:
            await self._repository.load(request.model_name)
        except LoadFailed as e:
            raise RequestError(str(e)) from e
        record.set(model=request.model_name)
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.RepositoryModelUnloadResponse:
        check_name(request.repository_name, "repository_name")
        await self._repository.unload(request.model_name)
        record.set(model=request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @unary
    async def ModelInfer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelInferResponse:
        received = time.perf_counter()
        record.set(request_id=check_request_id(request.id))
        pipeline = check_model(request.model_name, request.model_version, self._repository.snapshot)
        record.set(model=request.model_name)
        check_serving(self._serving)
        shape = input_shape(request)
        check_outputs(request)
        check_data(request, shape)
        canvas = await infer_tensor(
            self._context,
            pipeline,
            shape,
            lambda: input_array(request, shape),
            request.id,
            record,
            received,
        )
        started = time.perf_counter()
        data = await in_pool(self._pool, _output_bytes, canvas)
        record.set(bytes_out=len(data), stitch_ms=round(1e3 * (time.perf_counter() - started), 2))
        n, _, out_h, out_w = canvas.shape
        return pb.ModelInferResponse(
            model_name=pipeline.name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=OUTPUT_NAME,
                    datatype=DATATYPE,
                    shape=[n, 3, out_h, out_w],
                )
            ],
            raw_output_contents=[data],
        )


@dataclass(frozen=True)
class TensorContext:
    """What inferring a tensor needs from the server it runs in (gRPC or HTTP)."""

    batcher: TileBatcher
    pool: Executor
    uploads: UploadBudget
    config: ServerConfig


async def infer_tensor(
    server: TensorContext,
    pipeline: Pipeline,
    shape: tuple[int, int, int, int],
    load: Callable[[], np.ndarray],
    request_id: str,
    record: AccessRecord,
    received: float,
) -> np.ndarray:
    """Run the [N, 3, H, W] images ``load()`` returns (on the codec pool) through ``pipeline``
    on the shared batcher; the float32 [N, 3, sH, sW] answer. Admission first: the request's
    bytes are held and its tiles reserved, or it is refused before any work."""
    n, _, height, width = shape
    record.set(images=n, width=width, height=height)
    units = check_limits(shape, server.config, pipeline)
    bytes_in = int(np.prod(shape)) * FLOAT32_LE.itemsize
    record.set(bytes_in=bytes_in)
    scale = pipeline.scale
    try:
        with (
            server.uploads.hold(bytes_in, upload=False),
            server.batcher.reserve(units) as reservation,
        ):
            images = await in_pool(server.pool, load)
            # Chunk by chunk into the float32 answer (server/chunked.py): bounded memory.
            canvas = np.empty((n, 3, scale * height, scale * width), np.float32)
            result = await pipeline.run(
                server.batcher.lane(pipeline.engine),
                list(images),
                list(canvas),
                request_id,
                reservation,
            )
    except Exception:
        pipeline.stats.failed(time.perf_counter() - received)
        raise
    record.set(
        tiles=result.tiles,
        image_pixels=n * height * width,
        computed_pixels=result.computed_pixels,
        waste=round(result.computed_pixels / (n * height * width), 3),
        queue_ms=round(1e3 * result.queue_seconds, 2),
        compute_ms=round(1e3 * result.compute_seconds, 2),
    )
    pipeline.stats.succeeded(n, time.perf_counter() - received, result, 0.0)
    return canvas


def model_config(pipeline: Pipeline) -> pb.ModelConfig:
    """Triton's view of one model: no implicit batch dimension (max_batch_size 0), the batch
    is the first of the tensors' dims."""
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


def model_precision(pipeline: Pipeline) -> str:
    """The weights' precision its metadata states: float32, float16 or int8."""
    return pipeline.metadata.precision if pipeline.metadata else "float32"


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


def _output_bytes(canvas: np.ndarray) -> bytes:
    """Worker thread: stitched images as the protocol's raw little-endian float32 bytes."""
    return canvas.astype(FLOAT32_LE, copy=False).tobytes()
