"""Upscaling an animation (GIF, APNG, animated WebP): every frame through the shared batcher at
once, so one animation's frames batch together like concurrent requests.

The order is a still image's (server/core/upscaling.py): the headers are checked first (frame
count, canvas, frames x pixels against ``--max-pixels``, decoding nothing), the model and size
are resolved from the canvas, the tiles of every frame are admitted and reserved in one
reservation, and only then are the frames decoded. ``pipeline.run`` takes the frames as one
list of images: their tiles go to the batcher as one request's chunks. The answer keeps each
frame's duration and disposal and the loop count; its format is the input's own unless the
request names png (APNG), gif or webp (``server.imaging.animation.container_of``).

``upscale_any`` is what the serving core calls for an encoded file or raw image: animations
here, everything else through ``upscale_image``; the output format "auto" (the request named
none) is PNG for a still image.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from server.core.access import AccessRecord
from server.core.chunked import Progress, to_uint8, to_unit_float
from server.core.model_choice import choose_model
from server.core.sizing import resize_output
from server.core.upscaling import (
    ImageSource,
    OutputSpec,
    UpscaleContext,
    Upscaled,
    UpscaleTicket,
    check_output,
    upscale_image,
)
from server.core.worker_pool import in_pool
from server.imaging.animation import (
    FORMAT_OF,
    Animation,
    check_animation_side,
    container_of,
    decode_animation,
    encode_animation,
    probe,
    read_animation_header,
)
from server.imaging.codec import DecodedImage, encode_image, finish_output

AUTO = "auto"  # the output format of a request that names none: the input's kind, else PNG
STILL_DEFAULT = "png"


async def upscale_any(
    server: UpscaleContext,
    ticket: UpscaleTicket,
    source: ImageSource,
    record: AccessRecord,
    unary: bool,
    progress: Progress | None = None,
) -> Upscaled:
    """An animation through ``upscale_animation``, anything else through ``upscale_image``."""
    run = upscale_image
    if source.raw_shape is None and probe(source.data) is not None:
        run = upscale_animation
    elif ticket.spec.name == AUTO:
        spec = dataclasses.replace(ticket.spec, name=STILL_DEFAULT)
        ticket = dataclasses.replace(ticket, spec=spec)
    return await run(server, ticket, source, record, unary, progress)


async def upscale_animation(
    server: UpscaleContext,
    ticket: UpscaleTicket,
    source: ImageSource,
    record: AccessRecord,
    unary: bool,
    progress: Progress | None = None,
) -> Upscaled:
    """Check, resolve, admit and reserve all frames' tiles, decode, run every frame through
    the batcher together, stitch, resize and encode one animation."""
    spec, options, snapshot = ticket.spec, ticket.options, ticket.snapshot
    request_id, received = ticket.request_id, ticket.received
    limits = server.limits
    data = source.data
    header = await in_pool(
        server.pool, read_animation_header, data, limits.max_pixels, limits.max_request_bytes
    )
    width, height, count = header.width, header.height, header.frames
    kind = container_of(spec.name, header.kind, count)
    pipeline, size = snapshot.resolve(options, width, height)
    if kind is None:  # one frame, written as a still image
        check_output(size, 4, spec, limits, unary)
    else:
        check_animation_side(kind, *size)
    units = pipeline.units(height, width, images=count)
    pipeline.admit(units, f"an animation of {count} frames of {width}x{height}")
    scale = pipeline.scale
    try:
        with server.batcher.reserve(units) as reservation:
            animation, frames = await in_pool(server.pool, decode_animation, data, header)
            # model=auto reads the first frame (a GIF/APNG/WebP carries no JPEG tables)
            args = (snapshot, options, pipeline, None, frames[0].rgb, units, False, count)
            choice = await in_pool(server.pool, choose_model, *args)
            pipeline = choice.pipeline
            record.set(
                model=pipeline.name,
                model_reason=choice.reason,
                width=width,
                height=height,
                channels=frames[0].channels,
                source=header.kind,
                frames=count,
            )
            canvases = [np.empty((scale * height, scale * width, 3), np.uint8) for _ in frames]
            result = await pipeline.run(
                server.batcher.lane(pipeline.engine),
                [frame.rgb.transpose(2, 0, 1) for frame in frames],
                [canvas.transpose(2, 0, 1) for canvas in canvases],
                request_id,
                reservation,
                to_model=to_unit_float,
                from_model=to_uint8,
                progress=progress,
                in_flight=pipeline.frames_in_flight(height, width, count),
            )
        record.set(
            tiles=result.tiles,
            image_pixels=count * height * width,
            computed_pixels=result.computed_pixels,
            queue_ms=round(1e3 * result.queue_seconds, 2),
            compute_ms=round(1e3 * result.compute_seconds, 2),
        )
        started = time.perf_counter()
        image, fmt = await in_pool(
            server.pool, finish_frames, canvases, frames, animation, kind, spec, scale, size
        )
        finished = time.perf_counter()
    except Exception:
        pipeline.stats.failed(time.perf_counter() - received)
        raise
    pipeline.stats.succeeded(count, finished - received, result, finished - started)
    resized = size != (width * scale, height * scale)
    record.set(bytes_out=len(image), format=fmt)
    return Upscaled(
        image=image,
        width=size[0],
        height=size[1],
        channels=frames[0].channels,
        scale=scale,
        format=fmt,
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=time.perf_counter() - received,
        request_id=request_id,
        tiles=result.tiles,
        model=pipeline.name,
        model_reason=choice.reason,
        resized=resized,
        frames=count,
    )


def finish_frames(
    canvases: list[np.ndarray],
    frames: list[DecodedImage],
    animation: Animation,
    kind: str | None,
    spec: OutputSpec,
    scale: int,
    size: tuple[int, int],
) -> tuple[bytes, str]:
    """Worker thread: restore each frame's alpha, resize to ``size`` and encode the animation
    as ``kind`` (None: the single frame as a still image of ``spec``); (bytes, format name)."""
    done = [
        resize_output(finish_output(canvas, frame, scale), size)
        for canvas, frame in zip(canvases, frames, strict=True)
    ]
    if kind is None:
        return encode_image(done[0], spec.name, spec.quality, side_checked=True), spec.name
    return encode_animation(done, animation, kind, spec.quality), FORMAT_OF[kind]
