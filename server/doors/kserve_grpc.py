"""The KServe v2 / Open Inference Protocol gRPC door (``inference.GRPCInferenceService``).

It serves the models of the repository that rdn.v1.Upscaler serves, on the same port, for
clients that speak the protocol of Triton, KServe and MLServer (``tritonclient[grpc]`` among
them): each model by its name (``rdn_x2``, ``rdn_x4_photo`` ...), version "1", input ``lr``
FP32 [N, 3, H, W] in [0, 1] (RGB planes), output ``sr`` FP32 [N, 3, s*H, s*W], unclipped. Every
image of a request is cut into the same tiles as an Upscale image and all of them go to the one
shared ``TileBatcher``, so tiles of both protocols share engine batches.

A translator only: the protocol's rules live once in ``server.core.kserve_rules`` (shared with the
HTTP door's REST routes) and the work in the serving core; what is gRPC's own is here: where a
ModelInferRequest carries its tensor (raw_input_contents or typed contents) and the messages.
Triton's extensions for the model repository are here too: RepositoryIndex, explicit model
control (a hot swap: calls in flight finish on the version they started with), ModelConfig and
ModelStatistics. ServerLive, ServerReady and ModelReady are probes: they write no access log
line. Request-level parameters (priority, timeout ...) are accepted and ignored.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from server.core.access import AccessRecord, check_request_id
from server.core.errors import NotFound, RequestError, check_name
from server.core.kserve_rules import (
    DATATYPE,
    EXTENSIONS,
    FLOAT32_LE,
    INPUT_NAME,
    MODEL_VERSION,
    OUTPUT_NAME,
    SERVER_NAME,
    InferCall,
    Shape,
    TensorIn,
    TensorOut,
    check_infer,
    model_config,
    model_metadata,
    model_statistics,
    package_version,
    refuse_load_parameters,
    shape_text,
)
from server.core.serving import ServingCore
from server.doors.grpc_calls import unary
from server.pb.inference import grpc_service_pb2 as pb
from server.pb.inference import grpc_service_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"
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


def infer_call(request: pb.ModelInferRequest) -> InferCall:
    """The request's inputs and outputs as the protocol's rules read them."""
    return InferCall(
        inputs=[
            TensorIn(t.name, t.datatype, tuple(t.shape), list(t.parameters)) for t in request.inputs
        ],
        outputs=[TensorOut(o.name, list(o.parameters)) for o in request.outputs],
    )


def check_data(request: pb.ModelInferRequest, shape: Shape) -> None:
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
                f"{shape_text(shape)} {DATATYPE} needs {expected} (4 bytes per value, "
                "little-endian, row-major)"
            )
    elif values != count:
        if values == 0:
            raise RequestError(f"input {INPUT_NAME!r} carries no data; {where_ok}")
        raise RequestError(
            f"inputs[0].contents.fp32_contents holds {values} values; input {INPUT_NAME!r} of "
            f"shape {shape_text(shape)} needs {count}"
        )


def input_array(request: pb.ModelInferRequest, shape: Shape) -> np.ndarray:
    """The checked input as float32 [N, 3, H, W] (raw bytes are viewed, not copied)."""
    if request.raw_input_contents:
        array = np.frombuffer(request.raw_input_contents[0], FLOAT32_LE)
    else:
        array = np.asarray(request.inputs[0].contents.fp32_contents, np.float32)
    return array.astype(np.float32, copy=False).reshape(shape)


# ----------------------------------------------------------------------------- servicer


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on the serving core."""

    def __init__(self, core: ServingCore, health: HealthSource) -> None:
        self._core = core
        self._health = health
        self.access_observer = core.access_observer  # read by grpc_calls.unary (metrics)
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
            self._core.model(request.name, request.version)
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
        pipeline = self._core.model(request.name, request.version)
        record.set(model=request.name, version=request.version)
        return json_format.ParseDict(model_metadata(pipeline), pb.ModelMetadataResponse())

    @unary
    async def ModelConfig(
        self,
        request: pb.ModelConfigRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelConfigResponse:
        pipeline = self._core.model(request.name, request.version)
        record.set(model=request.name)
        return pb.ModelConfigResponse(config=model_config(pipeline))

    @unary
    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.ModelStatisticsResponse:
        pipelines = self._core.models(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(p) for p in pipelines])

    @unary
    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.RepositoryIndexResponse:
        check_name(request.repository_name, "repository_name")
        rows = self._core.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    @unary
    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> pb.RepositoryModelLoadResponse:
        check_name(request.repository_name, "repository_name")
        refuse_load_parameters(request.parameters)
        await self._core.load(request.model_name)
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
        await self._core.unload(request.model_name)
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
        pipeline = self._core.model(request.model_name, request.model_version)
        record.set(model=request.model_name)
        self._core.check_serving()
        shape = check_infer(infer_call(request))
        check_data(request, shape)
        canvas = await self._core.infer(
            pipeline, shape, lambda: input_array(request, shape), request.id, record, received
        )
        started = time.perf_counter()
        data = await self._core.in_pool(_output_bytes, canvas)
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


def _output_bytes(canvas: np.ndarray) -> bytes:
    """Worker thread: stitched images as the protocol's raw little-endian float32 bytes."""
    return canvas.astype(FLOAT32_LE, copy=False).tobytes()
