"""Upscaling one image file or raw image, whatever the protocol that carried it (rdn.v1 gRPC,
HTTP): verify, resolve the model and size, admit, decode, tile, batch, stitch, resize, encode.

CPU-heavy steps run on the server's bounded codec pool so the event loop keeps answering
health checks and feeding the batcher while a large image is being prepared.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from server.batcher import TileBatcher
from server.calls import AccessRecord, in_pool
from server.chunked import Progress, to_uint8, to_unit_float
from server.codec import (
    JPEG_MAX_SIDE,
    WEBP_MAX_SIDE,
    DecodedImage,
    check_raw,
    decode_image,
    decode_raw,
    encode_image,
    finish_output,
    verify_image,
)
from server.config import LimitsConfig
from server.errors import RequestError, RequestTooLarge
from server.pb.rdn.v1 import upscale_pb2
from server.repository import Snapshot
from server.sizing import SizeOptions, resize_output
from server.wire import ACCEPTED_FORMATS, DEFAULT_QUALITY, FORMATS, RESPONSE_OVERHEAD_BYTES


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


# ----------------------------------------------------------------------------- servicer


@dataclass(frozen=True)
class UpscaleContext:
    """What upscaling an image needs from the server it runs in."""

    batcher: TileBatcher
    pool: Executor  # the bounded codec pool: decode, merge, resize, encode
    limits: LimitsConfig


@dataclass(frozen=True)
class Upscaled:
    response: upscale_pb2.UpscaleResponse  # every field but the image
    image: bytes


@dataclass(frozen=True)
class ImageSource:
    """A request's image bytes: an encoded file, or raw pixels of ``raw_shape`` (H, W, C)."""

    data: bytes | bytearray  # bytearray: an HTTP body, read into one buffer
    raw_shape: tuple[int, int, int] | None = None


def check_output(
    size: tuple[int, int], channels: int, spec: OutputSpec, limits: LimitsConfig, unary: bool
) -> None:
    """Refuse, before any tile is computed, an answer of ``size`` (width, height) that could
    not be given: a JPEG or WebP larger than the format allows, or a unary raw answer larger
    than one message."""
    out_w, out_h = size
    side = {"jpeg": JPEG_MAX_SIDE, "webp": WEBP_MAX_SIDE}.get(spec.name)
    if side is not None and max(out_w, out_h) > side:
        raise RequestError(
            f"{spec.name} output is limited to {side}x{side} pixels and the result would be "
            f"{out_w}x{out_h}; choose png or raw"
        )
    nbytes = out_w * out_h * channels
    limit = limits.max_message_bytes - RESPONSE_OVERHEAD_BYTES
    if unary and spec.name == "raw" and nbytes > limit:
        raise RequestTooLarge(
            f"the raw answer would be {out_w}x{out_h}x{channels} = {nbytes} bytes, more than "
            f"fits in one message (--max-message-bytes {limits.max_message_bytes}); send it "
            "through UpscaleStream (rdn-client does so by itself) or raise the limit on both ends"
        )


async def upscale_image(
    server: UpscaleContext,
    source: ImageSource,
    spec: OutputSpec,
    options: SizeOptions,
    snapshot: Snapshot,
    request_id: str,
    received: float,
    record: AccessRecord,
    unary: bool,
    progress: Progress | None = None,
) -> Upscaled:
    """Verify, resolve, admit, decode, tile, run through the batcher, stitch, resize and
    encode one image; ``progress(done, total)`` follows its tiles.

    The file is verified first (limits, integrity), keeping no pixels; the model and the
    output size are resolved from its header; then admission: the image's tiles must fit
    the tile queue, whose capacity for all of them is reserved at once, so no later chunk is
    refused; only then are the pixels decoded and kept.
    """
    limits = server.limits
    if source.raw_shape is None:
        args = (source.data, limits.max_pixels, limits.max_request_bytes)
        width, height = await in_pool(server.pool, verify_image, *args)
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
    pipeline, size = snapshot.resolve(options, width, height)
    units = pipeline.units(height, width, turnable=source.raw_shape is None)
    pipeline.admit(units, f"a {width}x{height} image")
    try:
        with server.batcher.reserve(units) as reservation:
            decoded = await in_pool(server.pool, decode)
            if decoded.rgb.shape[:2] != (height, width):  # turned by its orientation tag
                height, width = decoded.rgb.shape[:2]
                pipeline, size = snapshot.resolve(options, width, height)
            scale = pipeline.scale
            record.set(
                model=pipeline.name,
                width=width,
                height=height,
                channels=decoded.channels,
                source=decoded.source_format,
            )
            check_output(size, decoded.channels, spec, limits, unary)
            # Chunk by chunk into the uint8 answer (server/chunked.py): bounded memory.
            sr_rgb = np.empty((scale * height, scale * width, 3), np.uint8)
            result = await pipeline.run(
                server.batcher.lane(pipeline.engine),
                [decoded.rgb.transpose(2, 0, 1)],
                [sr_rgb.transpose(2, 0, 1)],
                request_id,
                reservation,
                to_model=to_unit_float,
                from_model=to_uint8,
                progress=progress,
            )
        record.set(
            tiles=result.tiles,
            image_pixels=height * width,
            computed_pixels=result.computed_pixels,
            waste=round(result.computed_pixels / (height * width), 3),
            queue_ms=round(1e3 * result.queue_seconds, 2),
            compute_ms=round(1e3 * result.compute_seconds, 2),
        )
        started = time.perf_counter()
        image = await in_pool(server.pool, _finish, sr_rgb, decoded, spec, scale, size)
        finished = time.perf_counter()
    except Exception:
        pipeline.stats.failed(time.perf_counter() - received)
        raise
    pipeline.stats.succeeded(1, finished - received, result, finished - started)
    resized = size != (width * scale, height * scale)
    response = upscale_pb2.UpscaleResponse(
        width=size[0],
        height=size[1],
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
        model=pipeline.name,
        resized=resized,
    )
    record.set(bytes_out=len(image), format=spec.name)
    if resized:
        record.set(output_size=f"{size[0]}x{size[1]}")
    return Upscaled(response, image)


def _finish(
    sr_rgb: np.ndarray,
    decoded: DecodedImage,
    spec: OutputSpec,
    scale: int,
    size: tuple[int, int],
) -> bytes:
    """Worker thread: restore grey/alpha of the upscaled RGB, resize to ``size``, encode."""
    image = resize_output(finish_output(sr_rgb, decoded, scale), size)
    return encode_image(image, spec.name, spec.quality)
