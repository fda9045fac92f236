"""The gRPC call wrappers both servicers use: errors to statuses, one access log line per call.

``grpc_status`` is the one place that maps the domain errors (``server.errors``,
``codec.ImageError``, ``batcher.QueueFull`` ...) to status codes; ``unary`` / ``streaming``
wrap a handler so that its errors become those statuses and every call writes one access
record (and feeds an ``AccessObserver``: metrics). Auth, parse_guard, metrics and both
servicers import this module, not a servicer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

import grpc

from server.batcher import BatcherStopped, QueueFull
from server.codec import ImageError, ImageTooLarge
from server.errors import (
    Busy,
    NotFound,
    NotServing,
    RequestError,
    RequestTooLarge,
    StreamEnded,
    UploadTimeout,
)
from server.wire import RETRY_AFTER_KEY

T = TypeVar("T")
log = logging.getLogger(__name__)
access_log = logging.getLogger("rdn.access")

MAX_REQUEST_ID_CHARS = 128  # the protos' limit
QUEUE_FULL_RETRY_AFTER_MS = 100  # a few batches' time on the tiny and small presets


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed"
        )
    return request_id


def check_serving(serving: Callable[[], bool]) -> None:
    """Raise ``NotServing`` (UNAVAILABLE, 503) unless ``serving()``: warm-up over, not draining."""
    if not serving():
        raise NotServing("the server is warming up or shutting down; retry shortly")


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


async def in_pool(pool: Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``pool`` (the servicers' bounded codec pool), awaited."""
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
