"""The rdn.v1.Upscaler door: UpscaleRequest / UpscaleStream messages in, the serving core's
upscale, UpscaleResponse out.

A translator only: the checks, the model resolution and the work are the core's
(``server.core.serving``); what is rdn.v1's own is here: the format enum, the stream's header and
chunk reassembly, ModelInfo. Handlers raise domain errors and ``server.doors.grpc_calls`` turns them
into statuses and access records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from rdn.metadata import KEY_CONFIG
from server.config import LimitsConfig, ServerConfig
from server.core import upscaling
from server.core.access import AccessRecord, check_request_id
from server.core.errors import RequestError, RequestTooLarge, StreamEnded
from server.core.pipeline import Pipeline
from server.core.progress import TileProgress
from server.core.repository import Snapshot
from server.core.serving import ServingCore
from server.core.sizing import SizeOptions
from server.core.uploads import Hold, UploadBudget, timed
from server.core.upscaling import ImageSource, OutputSpec, Upscaled, UpscaleTicket
from server.doors.grpc_calls import streaming, unary
from server.imaging.animation import ANIMATED_INPUTS
from server.imaging.codec import RAW_CHANNELS
from server.imaging.headers import INPUT_FORMATS
from server.imaging.limit_text import over_bytes, over_pixels
from server.imaging.modern import PILLOW_INPUTS
from server.imaging.options import ImageOptions, alpha_mode
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import (
    ACCEPTED_FORMATS,
    ALPHA_MODES,
    FORMAT_NUMBERS,
    FORMATS,
    UPLOAD_ACCEPTED_KEY,
)

log = logging.getLogger(__name__)

MAX_OUT_CHUNK_BYTES = 1 * 2**20  # data per answer chunk of UpscaleStream

# ------------------------------------------------------------------------- pure helpers

Options = upscale_pb2.UpscaleRequest | upscale_pb2.UpscaleStreamHeader


def size_options(message: Options) -> SizeOptions:
    """The model and sizing options of a request or stream header."""
    return SizeOptions(
        model=message.model,
        scale=message.scale,
        target_width=message.target_width,
        target_height=message.target_height,
        outscale=message.outscale,
    )


def image_options(message: Options) -> ImageOptions:
    """The colour, metadata and alpha options of a request or stream header."""
    name = ALPHA_MODES.get(message.alpha)
    if name is None:
        raise RequestError(
            f"alpha {message.alpha} is not a known AlphaMode; accepted: 0 UNSPECIFIED (= the "
            "server's default), 1 MODEL, 2 BICUBIC"
        )
    return ImageOptions(
        convert_to_srgb=message.convert_to_srgb,
        strip_metadata=message.strip_metadata,
        alpha=alpha_mode(name),
    )


def format_name(output_format: int) -> str:
    """The codec format an OutputFormat number names (UNSPECIFIED is "auto": PNG, or an
    animation's own kind)."""
    name = FORMATS.get(output_format)
    if name is None:
        raise RequestError(
            f"output_format {output_format} is not a known OutputFormat; accepted: "
            f"{ACCEPTED_FORMATS}"
        )
    return name


def output_spec(output_format: int, quality: int) -> OutputSpec:
    """The output an OutputFormat number and quality ask for, checked."""
    return upscaling.output_spec(format_name(output_format), quality)


def admit(
    core: ServingCore, message: Options, record: AccessRecord, received: float, *, serving: bool
) -> UpscaleTicket:
    """The core's admission of the upscale a request or stream header asks for."""
    return core.admit_upscale(
        message.request_id,
        size_options(message),
        format_name(message.output_format),
        message.quality,
        record,
        received=received,
        check_serving=serving,
        image=image_options(message),
    )


def response(done: Upscaled) -> upscale_pb2.UpscaleResponse:
    """The UpscaleResponse of an answered image, every field but the image."""
    return upscale_pb2.UpscaleResponse(
        width=done.width,
        height=done.height,
        channels=done.channels,
        scale=done.scale,
        format=FORMAT_NUMBERS[done.format],
        timings=upscale_pb2.Timings(
            queue_seconds=done.queue_seconds,
            compute_seconds=done.compute_seconds,
            total_seconds=done.total_seconds,
        ),
        request_id=done.request_id,
        tiles=done.tiles,
        total_bytes=len(done.image),
        model=done.model,
        resized=done.resized,
        model_reason=done.model_reason,
        notes=done.notes,
        frames=done.frames,
    )


class UpscalerService(upscale_pb2_grpc.UpscalerServicer):
    """rdn.v1.Upscaler on the serving core."""

    def __init__(self, core: ServingCore) -> None:
        self._core = core
        self.access_observer = core.access_observer  # read by the unary / streaming wrappers

    @unary
    async def Upscale(
        self,
        request: upscale_pb2.UpscaleRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> upscale_pb2.UpscaleResponse:
        ticket = admit(self._core, request, record, time.perf_counter(), serving=True)
        log.debug("Upscale started (request_id=%r)", ticket.request_id)
        kind = request.WhichOneof("image")
        if kind == "encoded":
            source = ImageSource(request.encoded)
        elif kind == "raw":
            shape = request.raw.shape
            source = ImageSource(request.raw.data, (shape.height, shape.width, shape.channels))
        else:
            raise RequestError("request carries no image: set `encoded` (an image file) or `raw`")
        record.set(bytes_in=len(source.data))
        with self._core.hold(len(source.data)):
            done = await self._core.upscale(ticket, source, record, unary=True)
        answer = response(done)
        answer.image = done.image
        return answer

    @streaming
    async def UpscaleStream(
        self,
        requests: AsyncIterator[upscale_pb2.UpscaleChunk],
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> AsyncIterator[upscale_pb2.UpscaleChunk]:
        received = time.perf_counter()
        core = self._core
        core.check_serving()

        tickets: list[UpscaleTicket] = []

        def check_header(header: upscale_pb2.UpscaleStreamHeader) -> None:
            tickets.append(admit(core, header, record, received, serving=False))

        header, data, hold = await receive_stream(
            requests,
            core.config.limits,
            core.uploads,
            record,
            context.send_initial_metadata,
            check_header,
        )
        ticket = tickets[0]
        with hold:
            shape = header.raw_shape
            raw = (shape.height, shape.width, shape.channels)
            source = ImageSource(data, raw if header.HasField("raw_shape") else None)
            del data
            progress = TileProgress() if header.progress else None
            work = asyncio.ensure_future(
                core.upscale(
                    ticket,
                    source,
                    record,
                    unary=False,
                    progress=progress.update if progress is not None else None,
                )
            )
            del source  # the upload's bytes are not needed while the answer streams out
            try:
                if progress is not None:
                    async for tiles_done, tiles_total in progress.follow(work):
                        message = upscale_pb2.Progress(
                            tiles_done=tiles_done, tiles_total=tiles_total
                        )
                        yield upscale_pb2.UpscaleChunk(progress=message)
                done = await work
            finally:
                if not work.done():  # the call ended (cancelled, client gone): stop the work
                    work.cancel()
                    await asyncio.wait([work])
        yield upscale_pb2.UpscaleChunk(result=response(done))
        step = min(MAX_OUT_CHUNK_BYTES, core.config.limits.max_message_bytes // 4)
        for offset in range(0, len(done.image), step):
            piece = done.image[offset : offset + step]
            yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=piece))

    @unary
    async def GetModelInfo(
        self,
        request: upscale_pb2.GetModelInfoRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> upscale_pb2.ModelInfo:
        snapshot = self._core.snapshot
        pipeline = snapshot.get(request.model) if request.model else snapshot.default()
        record.set(model=pipeline.name)
        return model_info(pipeline, self._core.config, snapshot)

    @unary
    async def ListModels(
        self,
        request: upscale_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> upscale_pb2.ListModelsResponse:
        snapshot = self._core.snapshot
        config = self._core.config
        return upscale_pb2.ListModelsResponse(
            models=[model_info(p, config, snapshot) for p in snapshot.ordered()]
        )


def check_raw_shape(shape: upscale_pb2.RawShape, total: int, limits: LimitsConfig) -> None:
    """A stream header's raw shape must fit the pixel limit and match the announced bytes."""
    text = f"{shape.height}x{shape.width}x{shape.channels}"
    if shape.height < 1 or shape.width < 1 or shape.channels not in RAW_CHANNELS:
        raise RequestError(
            f"header.raw_shape {text}: height and width must be at least 1 and channels 1 "
            "(grey), 3 (RGB) or 4 (RGBA)"
        )
    if shape.height * shape.width > limits.max_pixels:
        raise RequestTooLarge(
            f"header.raw_shape {over_pixels(shape.width, shape.height, limits.max_pixels)}; "
            "send a smaller image"
        )
    expected = shape.height * shape.width * shape.channels
    if total != expected:
        raise RequestError(
            f"header.total_bytes is {total} but header.raw_shape {text} needs exactly "
            f"{expected} bytes (uint8, row-major H x W x C)"
        )


def check_output_options(header: upscale_pb2.UpscaleStreamHeader) -> None:
    """The checks of a header that need no server: request id, output format and quality."""
    check_request_id(header.request_id)
    output_spec(header.output_format, header.quality)


async def receive_stream(
    requests: AsyncIterator[upscale_pb2.UpscaleChunk],
    limits: LimitsConfig,
    uploads: UploadBudget,
    record: AccessRecord,
    send_initial_metadata: Callable[[tuple[tuple[str, str], ...]], Awaitable[None]] | None = None,
    check_header: Callable[[upscale_pb2.UpscaleStreamHeader], None] = check_output_options,
) -> tuple[upscale_pb2.UpscaleStreamHeader, bytes, Hold]:
    """The header, the reassembled bytes and the budget hold of an UpscaleStream upload.

    ``check_header`` checks the header (the door passes the core's admission) before any
    data is read; then the stream's own checks run and its bytes are reserved
    from ``uploads`` (``Busy`` when they do not fit); then ``send_initial_metadata`` tells the
    client (UPLOAD_ACCEPTED_KEY) that its upload is accepted. The data is collected as it
    arrives, so memory follows the bytes received. The caller releases the hold when the call
    ends.
    """
    pace = uploads.pace()  # the minimum rate, and the slot a slower upload gives up
    messages = timed(requests, uploads.config, pace)
    first = await anext(messages, None)
    if first is None:
        raise StreamEnded("stream ended before its header; send an UpscaleChunk.header first")
    kind = first.WhichOneof("kind")
    if kind != "header":
        what = "a data chunk" if kind == "data" else f"{kind or 'an empty message'!s}"
        raise RequestError(f"stream began with {what}; the first message must be the header")
    header = first.header
    check_header(header)  # request id, output, model and size: before the upload
    log.debug("UpscaleStream started (request_id=%r)", header.request_id)
    total = header.total_bytes
    if total == 0:
        raise RequestError("header.total_bytes is 0; an image needs at least one byte")
    if total > limits.max_request_bytes:
        raise RequestTooLarge(
            f"header.total_bytes {total}: {over_bytes(total, limits.max_request_bytes)}; "
            "send a smaller image"
        )
    if header.HasField("raw_shape"):
        check_raw_shape(header.raw_shape, total, limits)
    record.set(bytes_in=total)
    hold = uploads.hold(total, upload=True, pace=pace)
    try:
        if send_initial_metadata is not None:
            await send_initial_metadata(((UPLOAD_ACCEPTED_KEY, "1"),))
        parts: list[bytes] = []
        filled = 0
        async for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "header":
                raise RequestError(f"a second header arrived after {filled} bytes; send one header")
            if kind != "data":
                raise RequestError(
                    f"unexpected {kind or 'empty'} message; after the header send data"
                )
            chunk = message.data
            if chunk.offset != filled:
                raise RequestError(
                    f"data chunk at offset {chunk.offset} is out of order: expected offset "
                    f"{filled} (chunks must arrive in offset order, without gaps)"
                )
            end = filled + len(chunk.data)
            if end > total:
                raise RequestError(
                    f"data chunks carry more than header.total_bytes={total} bytes (a chunk "
                    f"ends at byte {end})"
                )
            parts.append(chunk.data)
            pace.add(len(chunk.data))
            filled = end
        if filled < total:
            raise StreamEnded(
                f"stream ended after {filled} of header.total_bytes={total} bytes (truncated "
                "upload)"
            )
        hold.end_upload()  # its bytes stay held until the call ends; its upload slot is free
        return header, b"".join(parts), hold
    except BaseException:
        hold.release()
        raise


def model_info(
    pipeline: Pipeline, config: ServerConfig, snapshot: Snapshot
) -> upscale_pb2.ModelInfo:
    """ModelInfo of one served model: its metadata (read once by the pipeline), its place in
    the repository, and the serving configuration (with the choices made for the active
    provider)."""
    engine, planner, meta = pipeline.engine, pipeline.planner, pipeline.metadata
    info = upscale_pb2.ModelInfo(
        name=pipeline.name,
        scale=pipeline.scale,
        precision=meta.precision if meta else "float32",
        weights_sha256=meta.weights_sha256 if meta else "",
        training_step=meta.step if meta else 0,
        execution_provider=engine.active_provider,
        providers=list(engine.providers),
        tile_size=config.tiling.tile,
        tile_pad=config.tiling.pad,
        max_batch=config.batcher.max_batch,
        max_delay_ms=config.batcher.max_delay_ms,
        max_queue_tiles=config.batcher.max_queue_tiles,
        max_pixels=config.limits.max_pixels,
        max_request_bytes=config.limits.max_request_bytes,
        max_message_bytes=config.limits.max_message_bytes,
        input_formats=[*INPUT_FORMATS, *PILLOW_INPUTS, *ANIMATED_INPUTS, "raw"],
        output_formats=[
            upscale_pb2.OUTPUT_FORMAT_PNG,
            upscale_pb2.OUTPUT_FORMAT_JPEG,
            upscale_pb2.OUTPUT_FORMAT_WEBP,
            upscale_pb2.OUTPUT_FORMAT_RAW,
            upscale_pb2.OUTPUT_FORMAT_AVIF,
            upscale_pb2.OUTPUT_FORMAT_GIF,
            upscale_pb2.OUTPUT_FORMAT_TIFF,
        ],
        self_ensemble=config.self_ensemble,
        tiling=planner.mode,
        max_tile_pixels=planner.max_tile_pixels,
        intra_op_threads=config.engine.intra_op_threads,
        decode_workers=config.decode_workers,
        max_uploads=config.uploads.max_concurrent,
        max_buffered_bytes=config.uploads.max_buffered_bytes,
        ort_spinning=engine.spinning,
        ort_cpu_arena=engine.cpu_arena,
        tile_windows=list(planner.windows) if planner.mode == "buckets" else [],
        is_default=snapshot.defaults.get(pipeline.scale) == pipeline.name,
        server_default=snapshot.primary == pipeline.name,
        file=pipeline.path.name,
        version=pipeline.version,
    )
    if meta is not None:
        arch = meta.config
        try:
            info.architecture.CopyFrom(
                upscale_pb2.ModelArchitecture(
                    g0=int(arch["G0"]),
                    d=int(arch["D"]),
                    c=int(arch["C"]),
                    g=int(arch["G"]),
                    norm=str(arch.get("norm", "")),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            log.warning(
                "model %s: %s is malformed (%s); architecture left empty",
                pipeline.name,
                KEY_CONFIG,
                e,
            )
    return info
