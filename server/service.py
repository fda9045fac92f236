"""The rdn.v1.Upscaler servicer: validate, decode, tile, batch, stitch, encode.

The engine and the batcher are passed into the constructor; nothing is shared through module
state. Handlers raise domain errors (``codec.ImageError``, ``batcher.QueueFull``,
``RequestError`` ...) and ``grpc_status`` is the one place that turns them into status codes,
applied by the ``_unary`` / ``_streaming`` wrappers, which also write the access log line.
CPU-heavy steps (decode, split, merge, encode) run in worker threads so the event loop keeps
answering health checks and feeding the batcher while a large image is being prepared.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from export.metadata import KEY_CONFIG, KEY_PRECISION, KEY_STEP, KEY_WEIGHTS_SHA256
from rdn.ensemble import N_TRANSFORMS, inverse_transform, transform
from server.batcher import BatcherStopped, QueueFull, Reservation, TileResult
from server.chunked import chunk_tiles, infer_chunked, to_uint8, to_unit_float
from server.codec import (
    INPUT_FORMATS,
    JPEG_MAX_SIDE,
    RAW_CHANNELS,
    WEBP_MAX_SIDE,
    DecodedImage,
    ImageError,
    ImageTooLarge,
    check_raw,
    decode_image,
    decode_raw,
    encode_image,
    finish_output,
    to_planar,
    verify_image,
)
from server.config import LimitsConfig, ServerConfig
from server.errors import (
    Busy,
    NotFound,
    NotServing,
    RequestError,
    RequestTooLarge,
    StreamEnded,
    UploadTimeout,
)
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.planner import Planner
from server.tiling import TilePlan, merge_tiles, plan_tiles, split_tiles
from server.uploads import Hold, UploadBudget, timed
from server.wire import RETRY_AFTER_KEY, UPLOAD_ACCEPTED_KEY

T = TypeVar("T")
log = logging.getLogger(__name__)
access_log = logging.getLogger("rdn.access")

SERVICE_NAME = "rdn.v1.Upscaler"
DEFAULT_QUALITY = 95  # the proto's meaning of quality 0 for JPEG / WebP
MAX_REQUEST_ID_CHARS = 128  # the proto's limit
MAX_OUT_CHUNK_BYTES = 1 * 2**20  # data per answer chunk of UpscaleStream
RESPONSE_OVERHEAD_BYTES = 4096  # room for the response fields besides the image
QUEUE_FULL_RETRY_AFTER_MS = 100  # a few batches' time on the tiny and small presets

FORMATS: dict[int, str] = {
    upscale_pb2.OUTPUT_FORMAT_UNSPECIFIED: "png",
    upscale_pb2.OUTPUT_FORMAT_PNG: "png",
    upscale_pb2.OUTPUT_FORMAT_JPEG: "jpeg",
    upscale_pb2.OUTPUT_FORMAT_WEBP: "webp",
    upscale_pb2.OUTPUT_FORMAT_RAW: "raw",
}
ACCEPTED_FORMATS = "0 UNSPECIFIED (= PNG), 1 PNG, 2 JPEG, 3 WEBP, 4 RAW"


class TileSource(Protocol):
    """What the servicer needs from the batcher (``server.batcher.TileBatcher`` is one)."""

    def reserve(self, tiles: int) -> Reservation: ...

    async def submit(
        self, tiles: np.ndarray, request_id: str = "", reservation: Reservation | None = None
    ) -> TileResult: ...


class ModelSource(Protocol):
    """What the servicer needs from the engine (``server.engine.Engine`` is one)."""

    scale: int
    active_provider: str
    providers: tuple[str, ...]
    metadata: dict[str, str]
    spinning: bool  # onnxruntime's intra-op threads spin between ops
    cpu_arena: bool  # onnxruntime's CPU memory arena is on


# ------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class OutputSpec:
    """How the answer is encoded."""

    number: int  # OutputFormat enum value as answered (UNSPECIFIED is answered as PNG)
    name: str  # codec format name
    quality: int  # 1..100


def output_spec(output_format: int, quality: int) -> OutputSpec:
    """Validate the requested output format and quality."""
    name = FORMATS.get(output_format)
    if name is None:
        raise RequestError(
            f"output_format {output_format} is not a known OutputFormat; accepted: "
            f"{ACCEPTED_FORMATS}"
        )
    if quality > 100:
        raise RequestError(f"quality {quality} is out of range; use 1..100, or 0 for the default")
    number = upscale_pb2.OUTPUT_FORMAT_PNG if name == "png" else output_format
    return OutputSpec(number, name, quality or DEFAULT_QUALITY)


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed"
        )
    return request_id


def tile_image(
    rgb: np.ndarray, tile: int, pad: int, ensemble: bool, max_tiles: int
) -> tuple[list[TilePlan], np.ndarray]:
    """Plans and tiles of an H x W x 3 uint8 image; with ``ensemble`` of its 8 dihedral views.

    An image needing more than ``max_tiles`` tiles could never enter the queue: it is refused
    (not retryable) before any tile is cut.
    """
    height, width = rgb.shape[:2]
    check_tile_count(height, width, tile, pad, ensemble, max_tiles)
    return tile_planar(to_planar(rgb), tile, pad, ensemble)


def check_tile_count(
    height: int, width: int, tile: int, pad: int, ensemble: bool, max_tiles: int
) -> int:
    """Tiles of an image (all 8 views with ``ensemble``); refused if over ``max_tiles``."""
    n_views = N_TRANSFORMS if ensemble else 1
    count = n_views * plan_tiles(height, width, tile, pad).count  # a turn swaps rows and cols
    if count > max_tiles:
        raise RequestTooLarge(
            f"a {width}x{height} image needs {count} tiles of {tile}x{tile}"
            f"{' (x8 self-ensemble)' if ensemble else ''}, more than the queue holds "
            f"({max_tiles}, --max-queue-tiles); send a smaller image"
        )
    return count


def admission_units(planner: Planner, height: int, width: int, ensemble: bool) -> int:
    """Queue units an image needs: all 8 views with ``ensemble``; else the larger of its two
    orientations (the header's size may be turned by an orientation tag when decoded)."""
    straight = planner.units(planner.plan(height, width))
    turned = planner.units(planner.plan(width, height))
    return N_TRANSFORMS // 2 * (straight + turned) if ensemble else max(straight, turned)


def check_units(
    units: int, width: int, height: int, ensemble: bool, max_units: int, tile: int
) -> None:
    """Refuse (not retryable) an image whose tiles could never enter the queue; ``units`` are
    counted in tiles of the grid (``tile`` cores with their context)."""
    if units > max_units:
        raise RequestTooLarge(
            f"a {width}x{height} image needs {units} tiles of {tile}x{tile}"
            f"{' (x8 self-ensemble)' if ensemble else ''}, more than the queue holds "
            f"({max_units}, --max-queue-tiles); send a smaller image"
        )


def tile_planar(
    planar: np.ndarray, tile: int, pad: int, ensemble: bool
) -> tuple[list[TilePlan], np.ndarray]:
    """Plans and tiles of a float32 [3, H, W] image; with ``ensemble`` of its 8 dihedral views."""
    views = [transform(planar[None], i)[0] for i in range(N_TRANSFORMS)] if ensemble else [planar]
    plans = [plan_tiles(v.shape[1], v.shape[2], tile, pad) for v in views]
    tiles = [split_tiles(v, p) for v, p in zip(views, plans, strict=True)]
    return plans, tiles[0] if len(tiles) == 1 else np.concatenate(tiles)


def stitch(outputs: np.ndarray, plans: list[TilePlan], scale: int) -> np.ndarray:
    """[3, sH, sW] float32 from tile outputs; several plans = ensemble views, averaged."""
    if len(plans) == 1:
        return merge_tiles(outputs, plans[0], scale)
    total: np.ndarray | None = None
    start = 0
    for index, plan in enumerate(plans):
        view = merge_tiles(outputs[start : start + plan.count], plan, scale)
        start += plan.count
        back = inverse_transform(view[None], index)[0].astype(np.float64)
        total = back if total is None else total + back
    assert total is not None
    return (total / len(plans)).astype(np.float32)


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, client-facing message and trailing metadata for a handler error.

    The one place that maps errors to codes. Unexpected errors get a generic message: their
    text may hold internals, and the server logs the traceback instead.
    """
    if isinstance(error, ImageTooLarge | RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ()
    if isinstance(error, QueueFull | Busy):
        retry = ((RETRY_AFTER_KEY, str(QUEUE_FULL_RETRY_AFTER_MS)),)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), retry
    if isinstance(error, UploadTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error), ()
    if isinstance(error, NotServing):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    if isinstance(error, ImageError | RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error), ()
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(error), ()
    if isinstance(error, BatcherStopped):
        return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry the call", ()
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details", ()


# ------------------------------------------------------------------ error mapping, access log


class AccessObserver(Protocol):
    """Sees every call's access record as it starts and once it is logged (server/metrics.py)."""

    def started(self, record: AccessRecord) -> None: ...

    def finished(self, record: AccessRecord) -> None: ...


class AccessRecord:
    """What one call did, filled in by the handler and logged once when the call ends."""

    def __init__(self, method: str, observer: AccessObserver | None = None) -> None:
        self.method = method
        self.start = time.perf_counter()
        self.fields: dict[str, Any] = {"method": method, "status": "OK"}
        self._observer = observer
        if observer is not None:
            observer.started(self)

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def log(self) -> None:
        self.fields["total_ms"] = round(1e3 * (time.perf_counter() - self.start), 2)
        status = self.fields["status"]
        level = (
            logging.INFO if status in ("OK", "CANCELLED", "DEADLINE_EXCEEDED") else logging.WARNING
        )
        access_log.log(level, "request", extra={"fields": self.fields})
        if self._observer is not None:
            self._observer.finished(self)


# The server's deadline clock starts when it reads the request, after the client's: a client
# whose deadline expired cancels the call while the server still sees a little time left.
DEADLINE_SLACK_S = 0.1
# How long a request stream that ended early waits for the client's cancel (see _abort).
CANCEL_GRACE_S = 0.25


def _ended_status(context: grpc.aio.ServicerContext) -> str:
    """CANCELLED or DEADLINE_EXCEEDED for a handler cancelled by grpc.aio."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return "DEADLINE_EXCEEDED" if expired else "CANCELLED"


async def _abort(error: Exception, context: grpc.aio.ServicerContext, record: AccessRecord) -> None:
    # A client that cancels mid-upload ends its request stream (-> StreamEnded) before grpc.aio
    # cancels the handler, and on a busy machine the cancel can take many loop turns to land:
    # wait up to CANCEL_GRACE_S for it, so the call is logged and counted as the client's cancel
    # rather than as its error. A client that really half-closed early gets its answer that late.
    try:
        await asyncio.sleep(CANCEL_GRACE_S if isinstance(error, StreamEnded) else 0)
    except asyncio.CancelledError:
        record.set(status=_ended_status(context))
        raise
    code, message, trailers = grpc_status(error)
    record.set(status=code.name)
    if code == grpc.StatusCode.INTERNAL:
        log.error(
            "%s failed (request_id=%r)",
            record.method,
            record.fields.get("request_id", ""),
            exc_info=error,
        )
    await context.abort(code, message, trailing_metadata=trailers)


_UnaryHandler = Callable[[Any, Any, grpc.aio.ServicerContext, AccessRecord], Awaitable[Any]]
_StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext, AccessRecord], AsyncIterator[Any]]


def _unary(method: _UnaryHandler) -> Callable[..., Awaitable[Any]]:
    """Map a unary handler's errors to statuses and log one access line per call."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        record = AccessRecord(method.__name__, getattr(self, "access_observer", None))
        try:
            return await method(self, request, context, record)
        except asyncio.CancelledError:
            record.set(status=_ended_status(context))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, record)
        finally:
            record.log()

    return handler


def _streaming(method: _StreamHandler) -> Callable[..., AsyncIterator[Any]]:
    """``_unary`` for a handler that is an async generator of answer messages."""

    @functools.wraps(method)
    async def handler(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        record = AccessRecord(method.__name__, getattr(self, "access_observer", None))
        try:
            async for message in method(self, requests, context, record):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            record.set(status=_ended_status(context))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, record)
        finally:
            record.log()

    return handler


# ----------------------------------------------------------------------------- servicer


@dataclass(frozen=True)
class _Upscaled:
    response: upscale_pb2.UpscaleResponse  # every field but the image
    image: bytes


async def in_pool(pool: Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``pool`` (the servicers' bounded codec pool), awaited."""
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)


@dataclass(frozen=True)
class _Source:
    """A request's image bytes: an encoded file, or raw pixels of ``raw_shape`` (H, W, C)."""

    data: bytes
    raw_shape: tuple[int, int, int] | None = None


def check_output(
    width: int,
    height: int,
    channels: int,
    scale: int,
    spec: OutputSpec,
    limits: LimitsConfig,
    unary: bool,
) -> None:
    """Refuse, before any tile is computed, an answer that could not be given: a JPEG or WebP
    larger than the format allows, or a unary raw answer larger than one message."""
    out_w, out_h = scale * width, scale * height
    side = {"jpeg": JPEG_MAX_SIDE, "webp": WEBP_MAX_SIDE}.get(spec.name)
    if side is not None and max(out_w, out_h) > side:
        raise RequestError(
            f"{spec.name} output is limited to {side}x{side} pixels and the result would be "
            f"{out_w}x{out_h}; choose png or raw"
        )
    size = out_w * out_h * channels
    limit = limits.max_message_bytes - RESPONSE_OVERHEAD_BYTES
    if unary and spec.name == "raw" and size > limit:
        raise RequestTooLarge(
            f"the raw answer would be {out_w}x{out_h}x{channels} = {size} bytes, more than fits "
            f"in one message (--max-message-bytes {limits.max_message_bytes}); send it through "
            "UpscaleStream (rdn-client does so by itself) or raise the limit on both ends"
        )


class UpscalerService(upscale_pb2_grpc.UpscalerServicer):
    """rdn.v1.Upscaler on one engine behind one tile batcher.

    ``uploads`` bounds the request bytes held by all calls, ``codec_pool`` is the bounded pool
    of threads that decode and encode images, and ``serving`` says whether warm-up is over.
    """

    def __init__(
        self,
        engine: ModelSource,
        batcher: TileSource,
        config: ServerConfig,
        *,
        uploads: UploadBudget,
        codec_pool: Executor,
        serving: Callable[[], bool],
        planner: Planner,
        access_observer: AccessObserver | None = None,
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._config = config
        self._planner = planner
        self._uploads = uploads
        self._pool = codec_pool
        self._serving = serving
        self.access_observer = access_observer  # read by the _unary / _streaming wrappers
        self._info = model_info(engine, config, planner)

    def _check_serving(self) -> None:
        if not self._serving():
            raise NotServing("the server is warming up or shutting down; retry shortly")

    @_unary
    async def Upscale(
        self,
        request: upscale_pb2.UpscaleRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> upscale_pb2.UpscaleResponse:
        received = time.perf_counter()
        request_id = check_request_id(request.request_id)
        record.set(request_id=request_id)
        self._check_serving()
        log.debug("Upscale started (request_id=%r)", request_id)
        spec = output_spec(request.output_format, request.quality)
        limits = self._config.limits
        kind = request.WhichOneof("image")
        if kind == "encoded":
            source = _Source(request.encoded)
        elif kind == "raw":
            shape = request.raw.shape
            source = _Source(request.raw.data, (shape.height, shape.width, shape.channels))
        else:
            raise RequestError("request carries no image: set `encoded` (an image file) or `raw`")
        record.set(bytes_in=len(source.data))
        with self._uploads.hold(len(source.data), upload=False):
            done = await self._upscale(source, spec, request_id, received, record, unary=True)
        limit = limits.max_message_bytes - RESPONSE_OVERHEAD_BYTES
        if len(done.image) > limit:
            raise RequestTooLarge(
                f"the upscaled image is {len(done.image)} bytes, more than fits in one message "
                f"(--max-message-bytes {limits.max_message_bytes}); send it through "
                "UpscaleStream (rdn-client does so by itself) or raise the limit on both ends"
            )
        done.response.image = done.image
        return done.response

    @_streaming
    async def UpscaleStream(
        self,
        requests: AsyncIterator[upscale_pb2.UpscaleChunk],
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> AsyncIterator[upscale_pb2.UpscaleChunk]:
        received = time.perf_counter()
        self._check_serving()
        limits = self._config.limits
        header, data, hold = await receive_stream(
            requests, limits, self._uploads, record, context.send_initial_metadata
        )
        with hold:
            spec = output_spec(header.output_format, header.quality)
            shape = header.raw_shape
            raw = (shape.height, shape.width, shape.channels)
            source = _Source(data, raw if header.HasField("raw_shape") else None)
            del data
            done = await self._upscale(
                source, spec, header.request_id, received, record, unary=False
            )
            del source  # the upload's bytes are not needed while the answer streams out
        yield upscale_pb2.UpscaleChunk(result=done.response)
        step = min(MAX_OUT_CHUNK_BYTES, limits.max_message_bytes // 4)
        for offset in range(0, len(done.image), step):
            piece = done.image[offset : offset + step]
            yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=piece))

    @_unary
    async def GetModelInfo(
        self,
        request: upscale_pb2.GetModelInfoRequest,
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
    ) -> upscale_pb2.ModelInfo:
        return self._info

    async def _upscale(
        self,
        source: _Source,
        spec: OutputSpec,
        request_id: str,
        received: float,
        record: AccessRecord,
        unary: bool,
    ) -> _Upscaled:
        """Verify, admit, decode, tile, run through the batcher, stitch and encode one image.

        The file is verified first (limits, integrity), keeping no pixels; then admission: the
        image's tiles must fit the tile queue, whose capacity for all of them is reserved at
        once, so no later chunk is refused; only then are the pixels decoded and kept.
        """
        scale, limits = self._engine.scale, self._config.limits
        if source.raw_shape is None:
            args = (source.data, limits.max_pixels, limits.max_request_bytes)
            width, height = await in_pool(self._pool, verify_image, *args)
            decode = functools.partial(decode_image, *args, verified=True)
        else:
            height, width, channels = source.raw_shape
            check_raw(
                len(source.data),
                height,
                width,
                channels,
                limits.max_pixels,
                limits.max_request_bytes,
            )
            decode = functools.partial(
                decode_raw,
                source.data,
                height,
                width,
                channels,
                limits.max_pixels,
                limits.max_request_bytes,
            )
        batching = self._config.batcher
        ensemble = self._config.self_ensemble
        units = admission_units(self._planner, height, width, ensemble)
        check_units(units, width, height, ensemble, batching.max_queue_tiles, self._planner.tile)
        with self._batcher.reserve(units) as reservation:
            decoded = await in_pool(self._pool, decode)
            height, width = decoded.rgb.shape[:2]
            record.set(
                width=width, height=height, channels=decoded.channels, source=decoded.source_format
            )
            check_output(width, height, decoded.channels, scale, spec, limits, unary)
            # Chunk by chunk into the uint8 answer (server/chunked.py): bounded memory per request.
            sr_rgb = np.empty((scale * height, scale * width, 3), np.uint8)
            result = await infer_chunked(
                self._batcher,
                [decoded.rgb.transpose(2, 0, 1)],
                [sr_rgb.transpose(2, 0, 1)],
                plan=self._planner.plan,
                scale=scale,
                ensemble=ensemble,
                chunk_pixels=chunk_tiles(batching.max_batch) * self._planner.unit_pixels,
                request_id=request_id,
                reservation=reservation,
                to_model=to_unit_float,
                from_model=to_uint8,
            )
        record.set(
            tiles=result.tiles,
            image_pixels=height * width,
            computed_pixels=result.computed_pixels,
            waste=round(result.computed_pixels / (height * width), 3),
            queue_ms=round(1e3 * result.queue_seconds, 2),
            compute_ms=round(1e3 * result.compute_seconds, 2),
        )
        image = await in_pool(self._pool, _finish, sr_rgb, decoded, spec, scale)
        response = upscale_pb2.UpscaleResponse(
            width=width * scale,
            height=height * scale,
            channels=decoded.channels,
            scale=scale,
            format=spec.number,
            timings=upscale_pb2.Timings(
                queue_seconds=result.queue_seconds,
                compute_seconds=result.compute_seconds,
                total_seconds=time.perf_counter() - received,
            ),
            request_id=request_id,
            tiles=result.tiles,
            total_bytes=len(image),
        )
        record.set(bytes_out=len(image), format=spec.name)
        return _Upscaled(response, image)


def _finish(sr_rgb: np.ndarray, decoded: DecodedImage, spec: OutputSpec, scale: int) -> bytes:
    """Worker thread: restore grey/alpha of the upscaled RGB, encode."""
    return encode_image(finish_output(sr_rgb, decoded, scale), spec.name, spec.quality)


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
            f"header.raw_shape {shape.width}x{shape.height} = {shape.width * shape.height} "
            f"pixels is over the limit of {limits.max_pixels} pixels; send a smaller image"
        )
    expected = shape.height * shape.width * shape.channels
    if total != expected:
        raise RequestError(
            f"header.total_bytes is {total} but header.raw_shape {text} needs exactly "
            f"{expected} bytes (uint8, row-major H x W x C)"
        )


async def receive_stream(
    requests: AsyncIterator[upscale_pb2.UpscaleChunk],
    limits: LimitsConfig,
    uploads: UploadBudget,
    record: AccessRecord,
    send_initial_metadata: Callable[[tuple[tuple[str, str], ...]], Awaitable[None]] | None = None,
) -> tuple[upscale_pb2.UpscaleStreamHeader, bytes, Hold]:
    """The header, the reassembled bytes and the budget hold of an UpscaleStream upload.

    Everything the header says is checked before any data is read, and its bytes are reserved
    from ``uploads`` (``Busy`` when they do not fit); then ``send_initial_metadata`` tells the
    client (UPLOAD_ACCEPTED_KEY) that its upload is accepted. The data is collected as it
    arrives, so memory follows the bytes received. The caller releases the hold when the call
    ends.
    """
    messages = timed(requests, uploads.config)
    first = await anext(messages, None)
    if first is None:
        raise StreamEnded("stream ended before its header; send an UpscaleChunk.header first")
    kind = first.WhichOneof("kind")
    if kind != "header":
        what = "a data chunk" if kind == "data" else f"{kind or 'an empty message'!s}"
        raise RequestError(f"stream began with {what}; the first message must be the header")
    header = first.header
    record.set(request_id=check_request_id(header.request_id))
    log.debug("UpscaleStream started (request_id=%r)", header.request_id)
    output_spec(header.output_format, header.quality)  # fail before the upload, not after
    total = header.total_bytes
    if total == 0:
        raise RequestError("header.total_bytes is 0; an image needs at least one byte")
    if total > limits.max_request_bytes:
        raise RequestTooLarge(
            f"header.total_bytes {total} exceeds the request limit of {limits.max_request_bytes} "
            "bytes (--max-request-bytes)"
        )
    if header.HasField("raw_shape"):
        check_raw_shape(header.raw_shape, total, limits)
    record.set(bytes_in=total)
    hold = uploads.hold(total, upload=True)
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
    engine: ModelSource, config: ServerConfig, planner: Planner
) -> upscale_pb2.ModelInfo:
    """ModelInfo from the engine's ONNX metadata and the serving configuration (with the
    choices made for the active provider)."""
    meta = engine.metadata
    info = upscale_pb2.ModelInfo(
        name=f"rdn_x{engine.scale}",
        scale=engine.scale,
        precision=meta.get(KEY_PRECISION, "float32"),
        weights_sha256=meta.get(KEY_WEIGHTS_SHA256, ""),
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
        input_formats=[*INPUT_FORMATS, "raw"],
        output_formats=[
            upscale_pb2.OUTPUT_FORMAT_PNG,
            upscale_pb2.OUTPUT_FORMAT_JPEG,
            upscale_pb2.OUTPUT_FORMAT_WEBP,
            upscale_pb2.OUTPUT_FORMAT_RAW,
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
    )
    try:
        info.training_step = int(meta.get(KEY_STEP, "0"))
    except ValueError:
        log.warning("model metadata %s=%r is not an integer", KEY_STEP, meta[KEY_STEP])
    if KEY_CONFIG in meta:
        try:
            arch = json.loads(meta[KEY_CONFIG])
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
                "model metadata %s is malformed (%s); architecture left empty", KEY_CONFIG, e
            )
    else:
        log.warning("model has no %s metadata; ModelInfo.architecture left empty", KEY_CONFIG)
    return info
