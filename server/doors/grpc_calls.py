"""The gRPC call wrappers both gRPC doors use: errors to statuses, one access log line per call.

``grpc_status`` maps a failure's kind (``server.core.failures.classify``) to its status code with
one table, GRPC_CODES; ``unary`` / ``streaming`` wrap a handler so that its errors become those
statuses and every call writes one access record (and feeds an ``AccessObserver``: metrics).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.core.access import AccessRecord
from server.core.errors import StreamEnded
from server.core.failures import classify
from server.wire import RETRY_AFTER_KEY

log = logging.getLogger(__name__)

GRPC_CODES: dict[str, grpc.StatusCode] = {  # failure kind -> gRPC status (one table)
    code.name: code
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INTERNAL,
    )
}


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, client-facing message and trailing metadata for a handler error."""
    failure = classify(error)
    trailers: tuple[tuple[str, str], ...] = ()
    if failure.retry_after_ms is not None:
        trailers = ((RETRY_AFTER_KEY, str(failure.retry_after_ms)),)
    return GRPC_CODES[failure.kind], failure.message, trailers


# The server's deadline clock starts when it reads the request, after the client's: a client
# whose deadline expired cancels the call while the server still sees a little time left.
DEADLINE_SLACK_S = 0.1
# How long a request stream that ended early waits for the client's cancel (see _abort).
CANCEL_GRACE_S = 0.25


def ended_status(context: grpc.aio.ServicerContext) -> str:
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
        record.set(status=ended_status(context))
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


def unary(method: _UnaryHandler) -> Callable[..., Awaitable[Any]]:
    """Map a unary handler's errors to statuses and log one access line per call."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        record = AccessRecord(method.__name__, getattr(self, "access_observer", None))
        try:
            return await method(self, request, context, record)
        except asyncio.CancelledError:
            record.set(status=ended_status(context))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, record)
        finally:
            record.log()

    return handler


def streaming(method: _StreamHandler) -> Callable[..., AsyncIterator[Any]]:
    """``unary`` for a handler that is an async generator of answer messages."""

    @functools.wraps(method)
    async def handler(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        record = AccessRecord(method.__name__, getattr(self, "access_observer", None))
        try:
            async for message in method(self, requests, context, record):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            record.set(status=ended_status(context))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, record)
        finally:
            record.log()

    return handler
