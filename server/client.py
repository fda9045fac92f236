"""Clients for rdn.v1.Upscaler and the ``rdn-client`` command line.

``UpscaleClient`` (blocking, ``grpc.Channel``) and ``AsyncUpscaleClient`` (``grpc.aio``) share
the pure helpers below: request building, chunking, stream reassembly and the retry policy.
Both send an image in one ``Upscale`` call when it fits well inside the message limit and
through ``UpscaleStream`` otherwise, and both retry UNAVAILABLE, and RESOURCE_EXHAUSTED when the
server marks it as transient (a full tile queue), with capped exponential backoff and full
jitter inside one overall deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.security import (
    PLAINTEXT,
    ClientSecurity,
    add_client_security_flags,
    client_security_from_args,
)
from server.sizing import SizeOptions
from server.wire import DEFAULT_QUALITY, HTTP2_MAX_FRAME_BYTES, RETRY_AFTER_KEY, UPLOAD_ACCEPTED_KEY
from server.wire import FORMAT_NUMBERS as FORMATS
from server.wire import FORMATS as FORMAT_NAMES

log = logging.getLogger("rdn.client")

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 2**20  # the server's --max-message-bytes default
MAX_CHUNK_BYTES = 1 * 2**20  # data per stream message: far below any sane message limit
MAX_SCALE = 4  # largest upscaling factor, assumed until a response tells the real one
LB_POLICIES = ("pick_first", "round_robin")
MAX_CHANNELS = 4  # RGBA
UNKNOWN_INPUT_ANSWER_BYTES = 2**32  # cap on an answer when the input's size could not be read
ENCODING_SLACK_BYTES = 2**20  # a PNG may be a little larger than its raw pixels

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "raw": ".raw"}
CLI_FORMATS = ("png", "jpeg", "webp")


class AnswerError(ValueError):
    """The server's answer is inconsistent with itself or with the request (a broken or
    hostile server); the clients raise it as ``UpscaleError`` with DATA_LOSS."""


class UpscaleError(Exception):
    """A call failed: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class UpscaleResult:
    """An upscaled image and what the server reported about it."""

    image: bytes  # encoded in `format`, or raw uint8 H x W x C
    width: int
    height: int
    channels: int
    scale: int
    format: str  # "png", "jpeg", "webp" or "raw"
    tiles: int
    request_id: str
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    streamed: bool  # travelled through UpscaleStream
    model: str = ""  # the model that ran
    resized: bool = False  # the model's output was resized to the requested size

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
class RetryPolicy:
    """Bounded retries with capped exponential backoff and full jitter."""

    max_attempts: int = 4  # first try included
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


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
    """The OutputFormat enum value of a format name."""
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


def unary_request(
    payload: Payload,
    output_format: str,
    quality: int,
    request_id: str,
    options: SizeOptions | None = None,
) -> upscale_pb2.UpscaleRequest:
    """The Upscale request for a payload."""
    request = upscale_pb2.UpscaleRequest(
        output_format=format_number(output_format),
        quality=quality,
        request_id=request_id,
        **option_fields(options),
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
        resized=response.resized,
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


def _answer_failure(error: AnswerError) -> UpscaleError:
    return UpscaleError(grpc.StatusCode.DATA_LOSS, f"broken answer from the server: {error}")


def channel_options(max_message_bytes: int, lb: str | None = None) -> list[tuple[str, Any]]:
    """Message limits both ways (as the server sets them) and an optional LB policy."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),
    ]
    if lb is not None:
        if lb not in LB_POLICIES:
            raise ValueError(f"unknown load-balancing policy {lb!r}; choose one of {LB_POLICIES}")
        config = {"loadBalancingConfig": [{lb: {}}]}
        options.append(("grpc.service_config", json.dumps(config)))
    return options


def retry_after_s(trailing_metadata: Any) -> float | None:
    """The server's retry hint in seconds, or None when it did not mark the error transient."""
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except ValueError:
                return 0.0
    return None


def is_retryable(code: grpc.StatusCode, trailing_metadata: Any) -> bool:
    """UNAVAILABLE always; RESOURCE_EXHAUSTED only when the server says retrying can help.

    CANCELLED too: it reaches a caller only from the other side (the caller's own cancel raises
    asyncio.CancelledError), e.g. for a call still queued inside gRPC when a draining server
    stopped, which no handler ran. Upscaling is idempotent, so a retry is safe.
    """
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    return (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s(trailing_metadata) is not None
    )


def backoff_s(policy: RetryPolicy, attempt: int, rng: random.Random, hint_s: float | None) -> float:
    """Full-jitter backoff before attempt ``attempt + 1``, never shorter than the server's hint."""
    cap = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier**attempt)
    return max(rng.uniform(0.0, cap), hint_s or 0.0)


def _error_from(error: grpc.RpcError) -> tuple[UpscaleError, Any]:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
    return UpscaleError(code or grpc.StatusCode.UNKNOWN, details or ""), trailers


class _Common:
    """Settings and decisions both clients share."""

    def __init__(
        self,
        max_message_bytes: int,
        retry: RetryPolicy,
        stream_threshold_bytes: int | None,
        chunk_bytes: int | None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.retry = retry
        # Half the limit leaves room for the response estimate's slack and message framing.
        self.stream_threshold_bytes = stream_threshold_bytes or max_message_bytes // 2
        self.chunk_bytes = chunk_bytes or min(MAX_CHUNK_BYTES, max_message_bytes // 4)
        self.scale = MAX_SCALE  # refined from the first response
        self._rng = random.Random()

    def use_stream(
        self, payload: Payload, stream: bool | None, options: SizeOptions | None = None
    ) -> bool:
        if stream is not None:
            return stream
        scale = self.scale
        if options is not None and (options.model or options.sized):
            scale = MAX_SCALE  # another model or size than the last answer's
        elif options is not None and options.scale:
            scale = options.scale
        response_bytes = estimated_response_bytes(payload, scale)
        return max(len(payload.data), response_bytes) > self.stream_threshold_bytes

    def attempt_timeout(self, deadline: float | None, error: UpscaleError | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise error or UpscaleError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return remaining

    def next_delay(
        self, attempt: int, error: UpscaleError, trailers: Any, deadline: float | None
    ) -> float:
        """Seconds to wait before retrying, or raise ``error`` when retrying is not allowed."""
        if attempt + 1 >= self.retry.max_attempts or not is_retryable(error.code, trailers):
            raise error
        delay = backoff_s(self.retry, attempt, self._rng, retry_after_s(trailers))
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise error
        log.debug("retrying after %s (attempt %d, waiting %.3f s)", error.code.name, attempt, delay)
        return delay

    def learn(self, result: UpscaleResult, options: SizeOptions | None) -> UpscaleResult:
        if result.scale and (options is None or options == SizeOptions()):
            self.scale = result.scale  # what a request without options gets
        return result


class UpscaleClient:
    """Blocking client; thread-safe (one channel, any number of threads)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        lb: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        stream_threshold_bytes: int | None = None,
        chunk_bytes: int | None = None,
        security: ClientSecurity = PLAINTEXT,
    ) -> None:
        self._common = _Common(max_message_bytes, retry, stream_threshold_bytes, chunk_bytes)
        self._channel = security.channel(target, channel_options(max_message_bytes, lb))
        self._metadata = security.metadata()
        self._stub = upscale_pb2_grpc.UpscalerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> UpscaleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def upscale(
        self,
        data: bytes | np.ndarray,
        output_format: str = "png",
        quality: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        stream: bool | None = None,
        options: SizeOptions | None = None,
    ) -> UpscaleResult:
        """Upscale file bytes or a uint8 array; ``timeout`` bounds all attempts together;
        ``options`` names a model or scale and the output size (the server's default model
        and factor when None)."""
        payload = make_payload(data)
        use_stream = self._common.use_stream(payload, stream, options)
        deadline = None if timeout is None else time.monotonic() + timeout
        error: UpscaleError | None = None
        for attempt in range(self._common.retry.max_attempts):
            remaining = self._common.attempt_timeout(deadline, error)
            try:
                if use_stream:
                    result = self._stream(
                        payload, output_format, quality, request_id, remaining, options
                    )
                else:
                    request = unary_request(payload, output_format, quality, request_id, options)
                    response = self._stub.Upscale(
                        request, timeout=remaining, metadata=self._metadata
                    )
                    result = checked_unary(response, payload)
                return self._common.learn(result, options)
            except AnswerError as e:
                raise _answer_failure(e) from None
            except grpc.RpcError as e:
                error, trailers = _error_from(e)
                time.sleep(self._common.next_delay(attempt, error, trailers, deadline))
        raise AssertionError("unreachable: the last attempt raises")

    def _stream(
        self,
        payload: Payload,
        fmt: str,
        quality: int,
        request_id: str,
        timeout: float | None,
        options: SizeOptions | None,
    ) -> UpscaleResult:
        messages = stream_messages(
            payload, fmt, quality, request_id, self._common.chunk_bytes, options
        )
        assembler = StreamAssembler(max_answer_bytes(payload))
        call = self._stub.UpscaleStream(messages, timeout=timeout, metadata=self._metadata)
        try:
            for message in call:
                assembler.add(message)
        except AnswerError:
            call.cancel()
            raise
        return assembler.result()

    def info(self, timeout: float | None = None, model: str = "") -> upscale_pb2.ModelInfo:
        """What the server serves (GetModelInfo): ``model``, or its default model."""
        try:
            return self._stub.GetModelInfo(
                upscale_pb2.GetModelInfoRequest(model=model),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _error_from(e)[0] from None

    def models(self, timeout: float | None = None) -> list[upscale_pb2.ModelInfo]:
        """Every model the server serves, its default first (ListModels)."""
        try:
            reply = self._stub.ListModels(
                upscale_pb2.ListModelsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise _error_from(e)[0] from None
        return list(reply.models)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name of ``service`` ("" = the whole server), e.g. "SERVING"."""
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _error_from(e)[0] from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


ACK_WAIT_S = 10.0  # longest wait for UPLOAD_ACCEPTED_KEY before uploading anyway
STATUS_WAIT_S = 0.5  # metadata without the key: how long a refusal's status may take to land


async def _upload_accepted(call: Any) -> bool:
    """Whether to send the upload's data: the server acknowledged the header, or it sent no
    acknowledgement at all (a server that predates it, or a proxy that drops the key) and has
    not ended the call."""
    try:
        async with asyncio.timeout(ACK_WAIT_S):
            metadata = dict(await call.initial_metadata() or ())
    except TimeoutError:
        return not call.done()
    if UPLOAD_ACCEPTED_KEY in metadata:
        return True
    try:  # metadata without the key: most likely the status of a refusal, arriving with it
        async with asyncio.timeout(STATUS_WAIT_S):
            await call.code()
    except TimeoutError:
        return True  # still live: a server that does not acknowledge
    return False


class AsyncUpscaleClient:
    """asyncio client (grpc.aio); create and use it inside one running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        lb: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        stream_threshold_bytes: int | None = None,
        chunk_bytes: int | None = None,
        security: ClientSecurity = PLAINTEXT,
    ) -> None:
        self._common = _Common(max_message_bytes, retry, stream_threshold_bytes, chunk_bytes)
        options = channel_options(max_message_bytes, lb)
        self._channel = security.aio_channel(target, options)
        self._metadata = security.metadata()
        self._stub = upscale_pb2_grpc.UpscalerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncUpscaleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def upscale(
        self,
        data: bytes | np.ndarray,
        output_format: str = "png",
        quality: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        stream: bool | None = None,
        options: SizeOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        """Upscale file bytes or a uint8 array; ``timeout`` bounds all attempts together;
        ``options`` names a model or scale and the output size (the server's default model
        and factor when None); ``progress(done, total)`` follows the image's tiles (the call
        then goes through UpscaleStream whatever the image's size)."""
        payload = make_payload(data)
        use_stream = progress is not None or self._common.use_stream(payload, stream, options)
        deadline = None if timeout is None else time.monotonic() + timeout
        error: UpscaleError | None = None
        for attempt in range(self._common.retry.max_attempts):
            remaining = self._common.attempt_timeout(deadline, error)
            try:
                if use_stream:
                    result = await self._stream(
                        payload, output_format, quality, request_id, remaining, options, progress
                    )
                else:
                    request = unary_request(payload, output_format, quality, request_id, options)
                    response = await self._stub.Upscale(
                        request, timeout=remaining, metadata=self._metadata
                    )
                    result = checked_unary(response, payload)
                return self._common.learn(result, options)
            except AnswerError as e:
                raise _answer_failure(e) from None
            except grpc.RpcError as e:
                error, trailers = _error_from(e)
                await asyncio.sleep(self._common.next_delay(attempt, error, trailers, deadline))
        raise AssertionError("unreachable: the last attempt raises")

    async def _stream(
        self,
        payload: Payload,
        fmt: str,
        quality: int,
        request_id: str,
        timeout: float | None,
        options: SizeOptions | None,
        progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        """The header first; the data once the server acknowledged it in its initial metadata
        (UPLOAD_ACCEPTED_KEY). A refusal at the header then ends the call before any data is
        sent. grpc.aio reports a call the server ended while a write was in progress as
        INTERNAL (grpc/grpc#36066): a refusal at the header never meets a write, and a call
        ended mid-upload (a draining server, an upload timeout) is answered UNAVAILABLE, which
        is retried. A server that does not acknowledge within ACK_WAIT_S gets the data anyway.
        """
        messages = stream_messages(
            payload,
            fmt,
            quality,
            request_id,
            self._common.chunk_bytes,
            options,
            progress is not None,
        )
        call = self._stub.UpscaleStream(timeout=timeout, metadata=self._metadata)
        assembler = StreamAssembler(max_answer_bytes(payload), progress)
        write_failed = False
        try:
            await call.write(next(messages))
            if await _upload_accepted(call):
                try:
                    for message in messages:
                        await call.write(message)
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    write_failed = True  # the call ended; its status is read below
            async for message in call:  # a refused upload raises its status here
                assembler.add(message)
        except (asyncio.CancelledError, AnswerError):
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            if write_failed and e.code() == grpc.StatusCode.INTERNAL:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "the server ended the call during the upload (grpc.aio reported it as "
                    f"INTERNAL: {e.details()}); retry",
                ) from e
            raise
        return assembler.result()

    async def info(self, timeout: float | None = None, model: str = "") -> upscale_pb2.ModelInfo:
        """What the server serves (GetModelInfo): ``model``, or its default model."""
        try:
            return await self._stub.GetModelInfo(
                upscale_pb2.GetModelInfoRequest(model=model),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _error_from(e)[0] from None

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name of ``service`` ("" = the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._health.Check(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error_from(e)[0] from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------------------------------------------------------------------------- command line


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def output_path(relative: Path, output: Path, to_file: bool, fmt: str, tag: str) -> Path:
    """Where the upscaled input goes: ``output`` itself, or ``<stem>_<tag>.<ext>`` at its
    ``relative`` place under ``output`` (``tag``: ``x2``, or ``1000x750`` when resized)."""
    if to_file:
        return output
    return output / relative.parent / f"{relative.stem}_{tag}{EXTENSIONS[fmt]}"


def expand_inputs(inputs: Sequence[Path], recursive: bool) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output folder) for each input file and each image in
    an input folder (its sub-folders too with ``recursive``), sorted within a folder.

    Raises ``ValueError`` for a folder without images or a missing input, and when two
    outputs would collide."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            pattern = "**/*" if recursive else "*"
            images = sorted(
                p for p in item.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                deep = " (or its sub-folders)" if recursive else "; --recursive looks deeper"
                raise ValueError(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in it{deep}")
            found += [(p, p.relative_to(item)) for p in images]
        elif item.exists():
            found.append((item, Path(item.name)))
        else:
            raise ValueError(f"{item}: no such file or folder")
    keys = [r.with_suffix("") for _, r in found]
    if len(set(keys)) != len(keys):
        raise ValueError(
            "two inputs share a name (apart from the extension); outputs would collide"
        )
    return found


FORMAT_OF_EXTENSION = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def resolve_format(output: Path, to_file: bool, given: str | None) -> str:
    """The output format: ``--format`` when given, else the single output file's extension
    (.png, .jpg/.jpeg, .webp), else PNG."""
    if given is not None:
        return given
    if to_file:
        return FORMAT_OF_EXTENSION.get(output.suffix.lower(), "png")
    return "png"


def option_warnings(output: Path, to_file: bool, fmt: str, quality: int) -> list[str]:
    """One line for each option that has no effect or contradicts another."""
    warnings = []
    if quality and fmt == "png":
        warnings.append(f"--quality {quality} has no effect on PNG output (lossless)")
    implied = FORMAT_OF_EXTENSION.get(output.suffix.lower()) if to_file else None
    if to_file and implied is not None and implied != fmt:
        warnings.append(f"writing {fmt} data to {output.name} (--format {fmt} overrides the name)")
    return warnings


def writes_single_file(inputs: Sequence[Path], output: Path) -> bool:
    """One input file and an output that is not a folder and names a file (has a suffix)."""
    single = len(inputs) == 1 and not inputs[0].is_dir()
    return single and not output.is_dir() and output.suffix != ""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 (default) or 1..100, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"HOST:PORT or dns:///HOST:PORT ({DEFAULT_TARGET})"
    )
    common.add_argument("--deadline", type=float, default=None, help="seconds per image (none)")
    common.add_argument(
        "--retries", type=int, default=3, help="retries on UNAVAILABLE / full queue (3)"
    )
    common.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="gRPC message limit, both directions; match the server's (8 MiB)",
    )
    common.add_argument("--lb", choices=LB_POLICIES, default=None, help="load-balancing policy")
    add_client_security_flags(common)

    parser = argparse.ArgumentParser(
        prog="rdn-client", description="Upscale images with an rdn-serve server (rdn.v1.Upscaler)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upscale", parents=[common], help="upscale image files")
    up.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders")
    up.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder, or file for one input"
    )
    up.add_argument("--recursive", action="store_true", help="images in sub-folders of IN too")
    up.add_argument("--model", default="", help="model name (rdn-client models lists them)")
    up.add_argument(
        "--scale", type=int, choices=(2, 3, 4), default=0, help="that scale's default model"
    )
    up.add_argument("--width", type=_positive_int, default=0, help="output width in pixels")
    up.add_argument("--height", type=_positive_int, default=0, help="output height in pixels")
    up.add_argument(
        "--outscale", type=_positive_float, default=0.0, help="output size / input size, e.g. 1.5"
    )
    up.add_argument(
        "--local",
        metavar="MODEL",
        help="upscale in this process with MODEL, a shipped model's name (rdn_x2, rdn_x4_photo "
        "...) or an .onnx file (no server; same tiling and resize)",
    )
    up.add_argument(
        "--format",
        choices=CLI_FORMATS,
        default=None,
        help="output format (default: the extension of -o for one file, else png)",
    )
    up.add_argument("--quality", type=_quality, default=0, help="JPEG/WebP 1..100; 0 = default")
    up.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (4)")
    info = commands.add_parser("info", parents=[common], help="print ModelInfo as JSON")
    info.add_argument("--model", default="", help="a model's name (default: the server's default)")
    commands.add_parser(
        "models", parents=[common], help="list the served models, one line each, default first"
    )
    commands.add_parser("health", parents=[common], help="print SERVING or NOT_SERVING")
    return parser


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {args.retries}")
    return {
        "max_message_bytes": args.max_message_bytes,
        "lb": args.lb,
        "retry": RetryPolicy(max_attempts=args.retries + 1),
        "security": client_security_from_args(args),
    }


def size_options(args: argparse.Namespace) -> SizeOptions:
    """The model and sizing options of ``rdn-client upscale``, checked."""
    options = SizeOptions(
        model=args.model,
        scale=args.scale,
        target_width=args.width,
        target_height=args.height,
        outscale=args.outscale,
    )
    if options.outscale and (options.target_width or options.target_height):
        raise ValueError("--outscale cannot be combined with --width / --height; pick one")
    if args.local is not None and (options.model or options.scale):
        raise ValueError("--local runs the given file; --model and --scale choose a served model")
    return options


Upscaler = Callable[[bytes, str, int, str, SizeOptions], Awaitable[tuple[bytes, str]]]


def _remote(client: AsyncUpscaleClient, deadline: float | None, tile_bar: bool) -> Upscaler:
    """Upscales through the server; with ``tile_bar`` (one file) a bar follows its tiles."""
    from server.client_progress import TileBar  # tqdm: only for the command line

    async def run(
        data: bytes, fmt: str, quality: int, name: str, options: SizeOptions
    ) -> tuple[bytes, str]:
        bar = TileBar(name) if tile_bar else None
        try:
            result = await client.upscale(
                data,
                fmt,
                quality,
                request_id=name,
                timeout=deadline,
                options=options,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        tag = f"{result.width}x{result.height}" if result.resized else f"x{result.scale}"
        return result.image, tag

    return run


def _local(model: str) -> Upscaler:
    # Imported when asked: they open an onnxruntime session.
    from server.engine import ModelLoadError
    from server.local import LocalUpscaler

    try:
        upscaler = LocalUpscaler(model)
    except (ModelLoadError, ValueError) as e:
        raise ValueError(f"--local: {e}") from e
    lock = asyncio.Lock()  # one image at a time: the session already uses every core

    async def run(
        data: bytes, fmt: str, quality: int, name: str, options: SizeOptions
    ) -> tuple[bytes, str]:
        async with lock:
            result = await asyncio.to_thread(
                upscaler.upscale_bytes,
                data,
                fmt,
                quality or DEFAULT_QUALITY,
                width=options.target_width,
                height=options.target_height,
                outscale=options.outscale,
            )
        tag = f"{result.width}x{result.height}" if result.resized else f"x{upscaler.scale}"
        return result.image, tag

    return run


async def _upscale_files(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    from tqdm import tqdm

    options = size_options(args)
    sources = expand_inputs(args.inputs, args.recursive)
    to_file = writes_single_file(args.inputs, args.output)
    fmt = resolve_format(args.output, to_file, args.format)
    for warning in option_warnings(args.output, to_file, fmt, args.quality):
        log.warning("warning: %s", warning)
    if not to_file:
        args.output.mkdir(parents=True, exist_ok=True)
    failures = 0
    limit = asyncio.Semaphore(args.concurrency)
    progress = tqdm(total=len(sources), unit="img", disable=len(sources) < 2, file=sys.stderr)

    async def one(run: Upscaler, source: Path, relative: Path) -> None:
        nonlocal failures
        async with limit:
            try:
                data = await asyncio.to_thread(source.read_bytes)
                image, tag = await run(data, fmt, args.quality, source.name, options)
                target = output_path(relative, args.output, to_file, fmt, tag)
                target.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(target.write_bytes, image)
                write(f"{source} -> {target}")
            except (UpscaleError, OSError, ValueError) as e:
                failures += 1
                log.error("%s: %s", source, e)
            finally:
                progress.update(1)

    try:
        if args.local is not None:
            run = await asyncio.to_thread(_local, args.local)
            await asyncio.gather(*(one(run, s, r) for s, r in sources))
        else:
            async with AsyncUpscaleClient(args.target, **_client_kwargs(args)) as client:
                run = _remote(client, args.deadline, tile_bar=len(sources) == 1)
                await asyncio.gather(*(one(run, s, r) for s, r in sources))
    finally:
        progress.close()
    return 1 if failures else 0


def model_line(info: upscale_pb2.ModelInfo) -> str:
    """One line of ``rdn-client models``."""
    roles = [r for r, on in (("server default", info.server_default), ("default of its scale",
             info.is_default)) if on]  # fmt: skip
    return f"{info.name}\tx{info.scale}\t{info.file}\t{', '.join(roles) or '-'}"


def main(argv: list[str] | None = None) -> int:
    """``rdn-client``: upscale files, print model info, or check health."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rdn-client: %(message)s", stream=sys.stderr)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        if args.command == "upscale":
            return asyncio.run(_upscale_files(args, write))
        with UpscaleClient(args.target, **_client_kwargs(args)) as client:
            if args.command == "models":
                for info in client.models(timeout=args.deadline):
                    write(model_line(info))
                return 0
            if args.command == "info":
                info = client.info(timeout=args.deadline, model=args.model)
                write(
                    json_format.MessageToJson(
                        info,
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    )
                )
                return 0
            status = client.health(timeout=args.deadline)
            write(status)
            return 0 if status == "SERVING" else 1
    except (UpscaleError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
