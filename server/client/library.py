"""The client library for rdn.v1.Upscaler: ``UpscaleClient`` (blocking) and
``AsyncUpscaleClient`` (asyncio).

Both send an image in one ``Upscale`` call when it fits well inside the message limit and
through ``UpscaleStream`` otherwise, and both retry what the server marks transient inside one
overall deadline. The pieces they share live beside this module, and their public names are
exported by the package (``server/client/__init__.py``), so ``from server.client import ...``
finds all of the client's API:
- ``server.client.messages``: requests, stream messages and checked answers (pure functions);
- ``server.client.retry``: ``UpscaleError``, ``RetryPolicy`` and the attempts of one call;
- ``server.client.cli``: the ``rdn-client`` command line (``python -m server.client``).

The two classes are deliberate twins: the same steps, one blocking and one awaiting.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client.messages import (
    MAX_SCALE,
    AnswerError,
    Payload,
    ProgressCallback,
    StreamAssembler,
    UpscaleResult,
    checked_unary,
    estimated_response_bytes,
    make_payload,
    max_answer_bytes,
    stream_messages,
    unary_request,
)
from server.client.retry import (
    DEFAULT_RETRY,
    Attempts,
    RetryPolicy,
    answer_failure,
    as_upscale_error,
)
from server.core.sizing import SizeOptions
from server.imaging.options import ImageOptions
from server.ops.security import PLAINTEXT, ClientSecurity
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import HTTP2_MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, UPLOAD_ACCEPTED_KEY

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES  # the server's --max-message-bytes default
MAX_CHUNK_BYTES = 1 * 2**20  # data per stream message: far below any sane message limit
LB_POLICIES = ("pick_first", "round_robin")
ACK_WAIT_S = 10.0  # longest wait for UPLOAD_ACCEPTED_KEY before uploading anyway
STATUS_WAIT_S = 0.5  # metadata without the key: how long a refusal's status may take to land


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


class _ClientBase:
    """What both clients share: the channel's stubs and settings, when to stream, the
    attempts of a call, and the default model's scale learnt from answers. A subclass opens
    its kind of channel (``_open``) and makes the calls, blocking or awaiting."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        lb: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        stream_threshold_bytes: int | None = None,
        chunk_bytes: int | None = None,
        security: ClientSecurity = PLAINTEXT,
    ) -> None:
        self._channel = self._open(security, target, channel_options(max_message_bytes, lb))
        self._metadata = security.metadata()
        self._stub = upscale_pb2_grpc.UpscalerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._retry = retry
        # Half the limit leaves room for the response estimate's slack and message framing.
        self._stream_threshold_bytes = stream_threshold_bytes or max_message_bytes // 2
        self._chunk_bytes = chunk_bytes or min(MAX_CHUNK_BYTES, max_message_bytes // 4)
        self._scale = MAX_SCALE  # refined from the first response
        self._rng = random.Random()

    @staticmethod
    def _open(security: ClientSecurity, target: str, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def _use_stream(
        self, payload: Payload, stream: bool | None, options: SizeOptions | None = None
    ) -> bool:
        """Whether the image or its answer is too large for one message (``stream`` decides
        when given)."""
        if stream is not None:
            return stream
        scale = self._scale
        if options is not None and (options.model or options.sized):
            scale = MAX_SCALE  # another model or size than the last answer's
        elif options is not None and options.scale:
            scale = options.scale
        response_bytes = estimated_response_bytes(payload, scale)
        return max(len(payload.data), response_bytes) > self._stream_threshold_bytes

    def _attempts(self, timeout: float | None) -> Attempts:
        """The attempts of one upscale, all inside ``timeout`` seconds from now."""
        return Attempts(self._retry, timeout, self._rng)

    def _learn(self, result: UpscaleResult, options: SizeOptions | None) -> UpscaleResult:
        """Remember the default model's scale from an answer, for the next stream decision."""
        if result.scale and (options is None or options == SizeOptions()):
            self._scale = result.scale  # what a request without options gets
        return result


def _status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class UpscaleClient(_ClientBase):
    """Blocking client; thread-safe (one channel, any number of threads)."""

    _channel: grpc.Channel

    @staticmethod
    def _open(security: ClientSecurity, target: str, options: list[tuple[str, Any]]) -> Any:
        return security.channel(target, options)

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
        image: ImageOptions | None = None,
    ) -> UpscaleResult:
        """Upscale file bytes or a uint8 array; ``timeout`` bounds all attempts together;
        ``options`` names a model or scale and the output size (the server's default model
        and factor when None); ``image`` asks for sRGB, stripped metadata or an alpha mode
        (the server's defaults when None: profile and metadata kept)."""
        payload = make_payload(data)
        use_stream = self._use_stream(payload, stream, options)
        attempts = self._attempts(timeout)
        for remaining in attempts:
            try:
                if use_stream:
                    result = self._stream(
                        payload, output_format, quality, request_id, remaining, options, image
                    )
                else:
                    request = unary_request(
                        payload, output_format, quality, request_id, options, image
                    )
                    response = self._stub.Upscale(
                        request, timeout=remaining, metadata=self._metadata
                    )
                    result = checked_unary(response, payload)
                return self._learn(result, options)
            except AnswerError as e:
                raise answer_failure(e) from None
            except grpc.RpcError as e:
                time.sleep(attempts.delay_after(e))
        raise AssertionError("unreachable: the last attempt raises")

    def _stream(
        self,
        payload: Payload,
        fmt: str,
        quality: int,
        request_id: str,
        timeout: float | None,
        options: SizeOptions | None,
        image: ImageOptions | None = None,
    ) -> UpscaleResult:
        messages = stream_messages(
            payload, fmt, quality, request_id, self._chunk_bytes, options, image=image
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
        request = upscale_pb2.GetModelInfoRequest(model=model)
        with as_upscale_error():
            return self._stub.GetModelInfo(request, timeout=timeout, metadata=self._metadata)

    def models(self, timeout: float | None = None) -> list[upscale_pb2.ModelInfo]:
        """Every model the server serves, its default first (ListModels)."""
        request = upscale_pb2.ListModelsRequest()
        with as_upscale_error():
            reply = self._stub.ListModels(request, timeout=timeout, metadata=self._metadata)
        return list(reply.models)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name of ``service`` ("" = the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        with as_upscale_error():
            reply = self._health.Check(request, timeout=timeout, metadata=self._metadata)
        return _status_name(reply)


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


class AsyncUpscaleClient(_ClientBase):
    """asyncio client (grpc.aio); create and use it inside one running event loop."""

    _channel: grpc.aio.Channel

    @staticmethod
    def _open(security: ClientSecurity, target: str, options: list[tuple[str, Any]]) -> Any:
        return security.aio_channel(target, options)

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
        image: ImageOptions | None = None,
    ) -> UpscaleResult:
        """Upscale file bytes or a uint8 array; ``timeout`` bounds all attempts together;
        ``options`` names a model or scale and the output size (the server's default model
        and factor when None); ``image`` asks for sRGB, stripped metadata or an alpha mode;
        ``progress(done, total)`` follows the image's tiles (the call
        then goes through UpscaleStream whatever the image's size)."""
        payload = make_payload(data)
        use_stream = progress is not None or self._use_stream(payload, stream, options)
        attempts = self._attempts(timeout)
        for remaining in attempts:
            try:
                if use_stream:
                    result = await self._stream(
                        payload,
                        output_format,
                        quality,
                        request_id,
                        remaining,
                        options,
                        progress,
                        image,
                    )
                else:
                    request = unary_request(
                        payload, output_format, quality, request_id, options, image
                    )
                    response = await self._stub.Upscale(
                        request, timeout=remaining, metadata=self._metadata
                    )
                    result = checked_unary(response, payload)
                return self._learn(result, options)
            except AnswerError as e:
                raise answer_failure(e) from None
            except grpc.RpcError as e:
                await asyncio.sleep(attempts.delay_after(e))
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
        image: ImageOptions | None = None,
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
            self._chunk_bytes,
            options,
            progress is not None,
            image,
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
        request = upscale_pb2.GetModelInfoRequest(model=model)
        with as_upscale_error():
            return await self._stub.GetModelInfo(request, timeout=timeout, metadata=self._metadata)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name of ``service`` ("" = the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        with as_upscale_error():
            reply = await self._health.Check(request, timeout=timeout, metadata=self._metadata)
        return _status_name(reply)
