"""What travels between the clients and rdn.v1.Upscaler, as pure functions and plain values.

Building a request or a stream's messages from an image, and reading an answer back into an
``UpscaleResult`` with its sizes checked against what the request can produce: both clients
(``server.client``) use these, and so do tests that speak the protocol by hand. No channel, no
retries here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.sizing import SizeOptions
from server.imaging.options import ImageOptions
from server.pb.rdn.v1 import upscale_pb2
from server.wire import ALPHA_NUMBERS
from server.wire import FORMAT_NUMBERS as FORMATS
from server.wire import FORMATS as FORMAT_NAMES

MAX_SCALE = 4  # largest upscaling factor, assumed until a response tells the real one
MAX_CHANNELS = 4  # RGBA
UNKNOWN_INPUT_ANSWER_BYTES = 2**32  # cap on an answer when the input's size could not be read
ENCODING_SLACK_BYTES = 2**20  # a PNG may be a little larger than its raw pixels


class AnswerError(ValueError):
    """The server's answer is inconsistent with itself or with the request (a broken or
    hostile server); the clients raise it as ``UpscaleError`` with DATA_LOSS."""


@dataclass(frozen=True)
class UpscaleResult:
    """An upscaled image and what the server reported about it."""

    image: bytes  # encoded in `format`, or raw uint8 H x W x C
    width: int
    height: int
    channels: int
    scale: int
    format: str  # "png", "jpeg", "webp", "avif", "gif", "tiff" or "raw"
    tiles: int
    request_id: str
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    streamed: bool  # travelled through UpscaleStream
    model: str = ""  # the model that ran
    model_reason: str = ""  # why it ran (model=auto: what the server saw in the input)
    resized: bool = False  # the model's output was resized to the requested size
    notes: tuple[str, ...] = ()  # what the answer could not keep (16 bits in a JPEG ...)
    frames: int = 1  # an animation's frames (GIF, APNG, animated WebP)

    def to_array(self) -> np.ndarray:
        """The image as uint8 H x W x C (RGB order; C = 1, 3 or 4)."""
        if self.format == "raw":
            shape = (self.height, self.width, self.channels)
            return np.frombuffer(self.image, np.uint8).reshape(shape)
        import cv2  # only needed to look at encoded results

        image = cv2.imdecode(np.frombuffer(self.image, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"response image is not a decodable {self.format} file")
        if image.ndim == 2:
            return image[:, :, None]
        code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(image, code)


@dataclass(frozen=True)
class Payload:
    """Image bytes ready to send: encoded file bytes, or raw pixels with their shape."""

    data: bytes
    raw_shape: tuple[int, int, int] | None  # (height, width, channels) for raw pixels
    estimated_output_pixels: int  # input pixels, 0 when unknown (unreadable header)
    channels: int  # 1, 3 or 4 (4 when unknown)


def make_payload(image: bytes | bytearray | memoryview | np.ndarray) -> Payload:
    """Wrap file bytes or a uint8 H x W [x C] array (C = 1, 3, 4, RGB order) for sending."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array images must be uint8, got {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"array images must be H x W or H x W x 1/3/4, got {image.shape}")
        h, w, c = (int(v) for v in image.shape)
        return Payload(np.ascontiguousarray(image).tobytes(), (h, w, c), h * w, c)
    data = bytes(image)
    pixels, channels = _peek_size(data)
    return Payload(data, None, pixels, channels)


def _peek_size(data: bytes) -> tuple[int, int]:
    """(pixels, channels) from the file header alone, or (0, 4) when it cannot be read."""
    from PIL import Image, UnidentifiedImageError  # reads headers without decoding pixels

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height, len(img.getbands())
    except (UnidentifiedImageError, OSError, ValueError):
        return 0, 4


def estimated_response_bytes(payload: Payload, scale: int) -> int:
    """An upper estimate of the response size: the uncompressed upscaled image."""
    return payload.estimated_output_pixels * scale * scale * payload.channels


def max_answer_bytes(payload: Payload) -> int:
    """The most image bytes an answer to ``payload`` can hold: its pixels at the largest scale,
    4 channels, plus encoding slack (a PNG of noise is a little larger than raw)."""
    pixels = payload.estimated_output_pixels
    if pixels == 0:
        return UNKNOWN_INPUT_ANSWER_BYTES
    raw = pixels * MAX_SCALE * MAX_SCALE * MAX_CHANNELS
    return raw + raw // 64 + ENCODING_SLACK_BYTES


def check_answer(response: upscale_pb2.UpscaleResponse, max_bytes: int) -> None:
    """Raise ``AnswerError`` unless the answer's sizes are ones the request can produce."""
    if response.channels not in (1, 3, MAX_CHANNELS):
        raise AnswerError(f"the answer claims {response.channels} channels; expected 1, 3 or 4")
    if response.total_bytes > max_bytes:
        raise AnswerError(
            f"the answer announces {response.total_bytes} bytes, more than this request can "
            f"produce ({max_bytes})"
        )
    if FORMAT_NAMES.get(response.format) == "raw":
        expected = response.width * response.height * response.channels
        if response.total_bytes != expected:
            raise AnswerError(
                f"the raw answer announces {response.total_bytes} bytes for "
                f"{response.width}x{response.height}x{response.channels} (= {expected})"
            )


def format_number(output_format: str) -> int:
    """The OutputFormat enum value of a format name ("auto": UNSPECIFIED, an animation's own
    kind, else PNG)."""
    if output_format.lower() == "auto":
        return 0
    try:
        return FORMATS[output_format.lower()]
    except KeyError:
        raise ValueError(
            f"unknown output format {output_format!r}; choose one of {sorted(FORMATS)}"
        ) from None


def option_fields(options: SizeOptions | None) -> dict[str, Any]:
    """The model and sizing fields of a request or stream header (both have them)."""
    if options is None:
        return {}
    return {
        "model": options.model,
        "scale": options.scale,
        "target_width": options.target_width,
        "target_height": options.target_height,
        "outscale": options.outscale,
    }


def image_fields(image: ImageOptions | None) -> dict[str, Any]:
    """The colour, metadata and alpha fields of a request or stream header (both have them)."""
    if image is None:
        return {}
    return {
        "convert_to_srgb": image.convert_to_srgb,
        "strip_metadata": image.strip_metadata,
        "alpha": ALPHA_NUMBERS[image.alpha],
    }


def unary_request(
    payload: Payload,
    output_format: str,
    quality: int,
    request_id: str,
    options: SizeOptions | None = None,
    image: ImageOptions | None = None,
) -> upscale_pb2.UpscaleRequest:
    """The Upscale request for a payload."""
    request = upscale_pb2.UpscaleRequest(
        output_format=format_number(output_format),
        quality=quality,
        request_id=request_id,
        **option_fields(options),
        **image_fields(image),
    )
    if payload.raw_shape is None:
        request.encoded = payload.data
    else:
        h, w, c = payload.raw_shape
        request.raw.shape.height, request.raw.shape.width, request.raw.shape.channels = h, w, c
        request.raw.data = payload.data
    return request


def stream_messages(
    payload: Payload,
    output_format: str,
    quality: int,
    request_id: str,
    chunk_bytes: int,
    options: SizeOptions | None = None,
    progress: bool = False,
    image: ImageOptions | None = None,
) -> Iterator[upscale_pb2.UpscaleChunk]:
    """Header (asking for Progress messages when ``progress``), then data chunks of at most
    ``chunk_bytes`` in offset order."""
    header = upscale_pb2.UpscaleStreamHeader(
        total_bytes=len(payload.data),
        output_format=format_number(output_format),
        quality=quality,
        request_id=request_id,
        progress=progress,
        **option_fields(options),
        **image_fields(image),
    )
    if payload.raw_shape is not None:
        h, w, c = payload.raw_shape
        header.raw_shape.height, header.raw_shape.width, header.raw_shape.channels = h, w, c
    yield upscale_pb2.UpscaleChunk(header=header)
    view = memoryview(payload.data)
    for offset in range(0, len(view), chunk_bytes):
        piece = bytes(view[offset : offset + chunk_bytes])
        yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=piece))


def result_from_response(response: upscale_pb2.UpscaleResponse, streamed: bool) -> UpscaleResult:
    """An UpscaleResult from a unary response (or a stream's result with its image filled in)."""
    return UpscaleResult(
        image=bytes(response.image),
        width=response.width,
        height=response.height,
        channels=response.channels,
        scale=response.scale,
        format=FORMAT_NAMES.get(response.format, str(response.format)),
        tiles=response.tiles,
        request_id=response.request_id,
        queue_seconds=response.timings.queue_seconds,
        compute_seconds=response.timings.compute_seconds,
        total_seconds=response.timings.total_seconds,
        streamed=streamed,
        model=response.model,
        model_reason=response.model_reason,
        resized=response.resized,
        notes=tuple(response.notes),
        frames=response.frames or 1,
    )


ProgressCallback = Callable[[int, int], None]  # (tiles done, tiles in all)


class StreamAssembler:
    """Rebuilds an UpscaleResult from UpscaleStream's answer: result first, then data chunks;
    Progress messages before the result go to ``on_progress``.

    Sizes the server announces are checked against ``max_bytes`` (what the request can
    produce, ``max_answer_bytes``) before anything is stored, and memory grows only with the
    bytes received. Every inconsistency raises ``AnswerError``.
    """

    def __init__(
        self,
        max_bytes: int = UNKNOWN_INPUT_ANSWER_BYTES,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._on_progress = on_progress
        self._head: upscale_pb2.UpscaleResponse | None = None
        self._parts: list[bytes] = []
        self._filled = 0

    def add(self, message: upscale_pb2.UpscaleChunk) -> None:
        """Take the answer's next message (progress, result or data), checked."""
        kind = message.WhichOneof("kind")
        if self._head is None and kind == "progress":
            if self._on_progress is not None:
                self._on_progress(message.progress.tiles_done, message.progress.tiles_total)
            return
        if self._head is None:
            if kind != "result":
                raise AnswerError(f"stream answer began with {kind!r}, expected 'result'")
            check_answer(message.result, self._max_bytes)
            self._head = message.result
            return
        if kind != "data":
            raise AnswerError(f"stream answer sent {kind!r} after its result, expected 'data'")
        chunk = message.data
        total = self._head.total_bytes
        end = chunk.offset + len(chunk.data)
        if chunk.offset != self._filled or end > total:
            raise AnswerError(
                f"stream answer chunk at offset {chunk.offset} (+{len(chunk.data)} bytes) does "
                f"not follow byte {self._filled} of {total}"
            )
        self._parts.append(chunk.data)
        self._filled = end

    def result(self) -> UpscaleResult:
        """The whole answer, once every announced byte has arrived."""
        if self._head is None:
            raise AnswerError("stream answer ended before its result message")
        if self._filled != self._head.total_bytes:
            raise AnswerError(
                f"stream answer ended after {self._filled} of {self._head.total_bytes} bytes"
            )
        response = upscale_pb2.UpscaleResponse()
        response.CopyFrom(self._head)
        response.image = b"".join(self._parts)
        return result_from_response(response, streamed=True)


def checked_unary(response: upscale_pb2.UpscaleResponse, payload: Payload) -> UpscaleResult:
    """A unary answer as an UpscaleResult, its sizes checked as a stream's are."""
    check_answer(response, max_answer_bytes(payload))
    if len(response.image) != response.total_bytes:
        raise AnswerError(
            f"the answer holds {len(response.image)} image bytes but announces "
            f"{response.total_bytes}"
        )
    return result_from_response(response, streamed=False)
