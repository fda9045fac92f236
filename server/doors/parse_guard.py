"""Malformed request messages answer INVALID_ARGUMENT, not UNKNOWN with a Python exception text.

grpc.aio parses a request before any servicer code runs; bytes that are not a valid message
(corrupt wire format, a string field holding bad UTF-8) make its parser raise ``DecodeError``,
which grpc.aio answers with status UNKNOWN and ``"Unexpected <class ...DecodeError'>: ..."``.
``ParseGuard`` takes the parsing over: a unary request (any service) that cannot be parsed is
answered INVALID_ARGUMENT and access-logged; a stream message of rdn.v1.Upscaler that cannot be
parsed raises ``RequestError`` inside the servicer, whose one error map answers it.

Streams of other services are left alone: a servicer reading with ``context.read()`` would get
bytes once the parsing is taken over; the Upscaler reads through its request iterator.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.core.access import AccessObserver, AccessRecord
from server.core.errors import RequestError
from server.wire import SERVICE_NAME

STREAMS_GUARDED = f"/{SERVICE_NAME}/"  # services whose request streams are parsed here
Parser = Callable[[bytes], Any]


def parse_error(method: str, error: DecodeError) -> str:
    """The client-facing text for a request of ``method`` that cannot be parsed."""
    cause = str(error).rsplit(": ", 1)[-1] or type(error).__name__
    return (
        f"request message of {method} cannot be parsed ({cause}); send a serialized "
        "protobuf message of the method's request type (string fields must be UTF-8)"
    )


def parse(parser: Parser, raw: bytes, method: str) -> Any:
    """``parser(raw)``, or ``RequestError`` saying why the bytes are not a message."""
    try:
        return parser(raw)
    except DecodeError as e:
        raise RequestError(parse_error(method, e)) from e


def _unary_request(
    behavior: Callable[..., Any], parser: Parser, method: str, observer: AccessObserver | None
) -> Callable[..., Any]:
    name = method.rsplit("/", 1)[-1]

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        """The request, or an access-logged INVALID_ARGUMENT (``abort`` raises)."""
        try:
            return parse(parser, raw, method)
        except RequestError as e:
            record = AccessRecord(name, observer)
            record.set(status=grpc.StatusCode.INVALID_ARGUMENT.name, bytes_in=len(raw))
            record.log()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    if inspect.isasyncgenfunction(behavior):

        async def streaming(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for message in behavior(await parsed(raw, context), context):
                yield message

        return streaming

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await parsed(raw, context), context)

    return unary


def _stream_request(
    behavior: Callable[..., Any], parser: Parser, method: str
) -> Callable[..., Any]:
    async def messages(raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_messages:
            yield parse(parser, raw, method)

    if inspect.isasyncgenfunction(behavior):

        async def streaming(
            raw_messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for message in behavior(messages(raw_messages), context):
                yield message

        return streaming

    async def unary(raw_messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(messages(raw_messages), context)

    return unary


class ParseGuard(grpc.aio.ServerInterceptor):
    """Parses requests itself so that malformed ones get INVALID_ARGUMENT (see the module doc).

    Put it last among the server's interceptors: the ones before it (authentication) then
    decide before any request byte is parsed. ``observer`` sees the access records of refused
    unary calls, as it sees every other call's.
    """

    def __init__(self, observer: AccessObserver | None = None) -> None:
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parser = handler_call_details.method, handler.request_deserializer
        streaming = handler.request_streaming
        kind = ("stream_" if streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        behavior = getattr(handler, kind)
        is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        if not is_async or (streaming and not method.startswith(STREAMS_GUARDED)):
            return handler  # sync handlers run in a thread pool: left to grpc
        if streaming:
            wrapped = _stream_request(behavior, parser, method)
        else:
            wrapped = _unary_request(behavior, parser, method, self._observer)
        return handler._replace(request_deserializer=None, **{kind: wrapped})
