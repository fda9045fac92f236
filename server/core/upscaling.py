"""Upscaling one image file or raw image, whatever the protocol that carried it (rdn.v1 gRPC,
HTTP): verify, resolve the model and size, admit, decode, tile, batch, stitch, resize, encode.
The answer is a plain ``Upscaled``; each door writes it in its own wire form.

CPU-heavy steps run on the server's bounded codec pool so the event loop keeps answering
health checks and feeding the batcher while a large image is being prepared.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from server.config import LimitsConfig
from server.core.access import AccessRecord
from server.core.batcher import TileBatcher
from server.core.chunked import Progress, from_unit_float, to_unit_float
from server.core.errors import RequestError, RequestTooLarge
from server.core.model_choice import choose_model
from server.core.repository import Snapshot
from server.core.sizing import SizeOptions, resize_output
from server.core.worker_pool import in_pool
from server.imaging.alpha import alpha_planes, declares_alpha, fold_alpha
from server.imaging.codec import (
    DecodedImage,
    answer_notes,
    check_raw,
    check_side,
    decode_image,
    decode_raw,
    encode_image,
    finish_output,
    verify_image,
)
from server.imaging.options import DEFAULT_OPTIONS, ImageOptions
from server.wire import DEFAULT_QUALITY, RESPONSE_OVERHEAD_BYTES


@dataclass(frozen=True)
class OutputSpec:
    """How the answer is encoded."""

    name: str  # codec format name (png, jpeg, webp, avif, gif, tiff, raw) or "auto" (animated.py)
    quality: int  # 1..100
    image: ImageOptions = DEFAULT_OPTIONS  # profile, metadata and alpha handling


def output_spec(name: str, quality: int, image: ImageOptions = DEFAULT_OPTIONS) -> OutputSpec:
    """Validate the requested quality (0 = the default) of output format ``name``."""
    if quality > 100:
        raise RequestError(f"quality {quality} is out of range; use 1..100, or 0 for the default")
    return OutputSpec(name, quality or DEFAULT_QUALITY, image)


@dataclass(frozen=True)
class UpscaleContext:
    """What upscaling an image needs from the server it runs in."""

    batcher: TileBatcher
    pool: Executor  # the bounded codec pool: decode, merge, resize, encode
    limits: LimitsConfig


@dataclass(frozen=True)
class Upscaled:
    """One answered image and what the answer says about it."""

    image: bytes  # the encoded (or raw) answer
    width: int
    height: int
    channels: int
    scale: int
    format: str  # codec format name of ``image``
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    request_id: str
    tiles: int
    model: str
    model_reason: str  # why that model ran (model=auto: what the input showed)
    resized: bool  # the output size differs from scale x the input's
    notes: tuple[str, ...] = ()  # what the answer could not keep (16 bits in JPEG ...)
    frames: int = 1  # an animation's frames (server/core/animated.py); 1 for a still image
    source_bits: int = 8  # bits per sample of the decoded input (16: a 16-bit PNG or TIFF)
    source_profile: str = ""  # the input's ICC profile description; "" for none


@dataclass(frozen=True)
class ImageSource:
    """A request's image bytes: an encoded file, or raw pixels of ``raw_shape`` (H, W, C)."""

    data: bytes | bytearray  # bytearray: an HTTP body, read into one buffer
    raw_shape: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class UpscaleTicket:
    """An upscale request that passed every check made before its image is read: the model
    snapshot it will run on (whatever reloads follow) and its output."""

    request_id: str
    options: SizeOptions
    spec: OutputSpec
    snapshot: Snapshot
    received: float  # perf_counter when the request arrived


def check_output(
    size: tuple[int, int], channels: int, spec: OutputSpec, limits: LimitsConfig, unary: bool
) -> None:
    """Refuse, before any tile is computed, an answer of ``size`` (width, height) that could
    not be given: a JPEG or WebP larger than the format allows, or a unary raw answer larger
    than one message (an encoded answer's size is known once encoded: ``check_message``)."""
    out_w, out_h = size
    check_side(spec.name, out_w, out_h)
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
    ticket: UpscaleTicket,
    source: ImageSource,
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
    spec, options, snapshot = ticket.spec, ticket.options, ticket.snapshot
    request_id, received = ticket.request_id, ticket.received
    limits = server.limits
    if source.raw_shape is None:
        args = (source.data, limits.max_pixels, limits.max_request_bytes)
        width, height = await in_pool(server.pool, verify_image, *args)
        decode = functools.partial(decode_image, *args, verified=True, options=spec.image)
        has_alpha = declares_alpha(source.data)
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
        has_alpha = channels == 4
    pipeline, size = snapshot.resolve(options, width, height)
    images = 2 if has_alpha and spec.image.alpha == "model" else 1  # alpha through the model
    units = pipeline.units(height, width, images, turnable=source.raw_shape is None)
    pipeline.admit(units, f"a {width}x{height} image")
    try:
        with server.batcher.reserve(units) as reservation:
            decoded = await in_pool(server.pool, decode)
            if decoded.rgb.shape[:2] != (height, width):  # turned by its orientation tag
                height, width = decoded.rgb.shape[:2]
                pipeline, size = snapshot.resolve(options, width, height)
            encoded = source.data if source.raw_shape is None else None
            turnable = source.raw_shape is None
            args = (snapshot, options, pipeline, encoded, decoded.rgb, units, turnable, images)
            choice = await in_pool(server.pool, choose_model, *args)
            pipeline = choice.pipeline
            scale = pipeline.scale
            record.set(
                model=pipeline.name,
                model_reason=choice.reason,
                width=width,
                height=height,
                channels=decoded.channels,
                source=decoded.source_format,
            )
            check_output(size, decoded.channels, spec, limits, unary)
            # Chunk by chunk into the answer (server/core/chunked.py): bounded memory; 16-bit
            # input is fed and answered at 16 bits.
            dtype = decoded.rgb.dtype
            sr_rgb = np.empty((scale * height, scale * width, 3), dtype)
            sources, canvases = [decoded.rgb.transpose(2, 0, 1)], [sr_rgb.transpose(2, 0, 1)]
            sr_alpha = None
            if decoded.alpha is not None and spec.image.alpha == "model":
                sr_alpha = np.empty_like(sr_rgb)
                sources.append(alpha_planes(decoded.alpha))
                canvases.append(sr_alpha.transpose(2, 0, 1))
            result = await pipeline.run(
                server.batcher.lane(pipeline.engine),
                sources,
                canvases,
                request_id,
                reservation,
                to_model=to_unit_float,
                from_model=from_unit_float(dtype),
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
        image, notes = await in_pool(
            server.pool, _finish, sr_rgb, sr_alpha, decoded, spec, scale, size
        )
        finished = time.perf_counter()
    except Exception:
        pipeline.stats.failed(time.perf_counter() - received)
        raise
    pipeline.stats.succeeded(1, finished - received, result, finished - started)
    resized = size != (width * scale, height * scale)
    record.set(bytes_out=len(image), format=spec.name)
    if resized:
        record.set(output_size=f"{size[0]}x{size[1]}")
    if notes:
        record.set(notes="; ".join(notes))
    return Upscaled(
        image=image,
        width=size[0],
        height=size[1],
        channels=decoded.channels,
        scale=scale,
        format=spec.name,
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=time.perf_counter() - received,
        request_id=request_id,
        tiles=result.tiles,
        model=pipeline.name,
        model_reason=choice.reason,
        resized=resized,
        notes=notes,
        source_bits=8 * decoded.rgb.dtype.itemsize,
        source_profile=decoded.metadata.profile_name,
    )


def check_message(image: bytes, limits: LimitsConfig) -> None:
    """A unary answer's encoded image must fit one message (raw answers were checked before
    any compute, by ``check_output``)."""
    limit = limits.max_message_bytes - RESPONSE_OVERHEAD_BYTES
    if len(image) > limit:
        raise RequestTooLarge(
            f"the upscaled image is {len(image)} bytes, more than fits in one message "
            f"(--max-message-bytes {limits.max_message_bytes}); send it through "
            "UpscaleStream (rdn-client does so by itself) or raise the limit on both ends"
        )


def _finish(
    sr_rgb: np.ndarray,
    sr_alpha: np.ndarray | None,
    decoded: DecodedImage,
    spec: OutputSpec,
    scale: int,
    size: tuple[int, int],
) -> tuple[bytes, tuple[str, ...]]:
    """Worker thread: restore grey/alpha of the upscaled RGB, resize to ``size``, encode with
    the input's profile and metadata; also what the answer could not keep."""
    alpha = None if sr_alpha is None else fold_alpha(sr_alpha)
    image = resize_output(finish_output(sr_rgb, decoded, scale, alpha), size)
    encoded = encode_image(
        image, spec.name, spec.quality, side_checked=True, metadata=decoded.metadata
    )
    return encoded, answer_notes(decoded, spec.name)
