"""What a failed call means, whatever door it came through: each domain error
(``server.core.errors``, ``codec.ImageError``, ``batcher.QueueFull`` ...) classified once into a
protocol-neutral kind.

The kinds are the gRPC status names, which the access log and metrics use for every door; each
door maps a kind to its own status with one table (``grpc_calls.GRPC_CODES``,
``doors.http.HTTP_STATUS``). Unexpected errors become INTERNAL with a generic message: their text
may hold internals, and the door logs the traceback instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.core.batch_types import BatcherStopped, QueueFull
from server.core.errors import (
    Busy,
    NotFound,
    NotServing,
    RequestError,
    RequestTooLarge,
    UploadTimeout,
)
from server.imaging.codec import ImageError
from server.imaging.headers import ImageTooLarge

QUEUE_FULL_RETRY_AFTER_MS = 100  # a few batches' time on the tiny and small presets
INTERNAL_MESSAGE = "internal error; the server logged the details"


@dataclass(frozen=True)
class Failure:
    """A failed call as the client is told: its kind, message and retry hint."""

    kind: str  # a gRPC status name: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
    message: str
    retry_after_ms: int | None = None  # transient refusals only: try again after this long


def classify(error: BaseException) -> Failure:
    """The one place that says what kind of failure an error is."""
    if isinstance(error, ImageTooLarge | RequestTooLarge):
        return Failure("RESOURCE_EXHAUSTED", str(error))
    if isinstance(error, QueueFull | Busy):
        return Failure("RESOURCE_EXHAUSTED", str(error), QUEUE_FULL_RETRY_AFTER_MS)
    if isinstance(error, UploadTimeout):
        return Failure("DEADLINE_EXCEEDED", str(error))
    if isinstance(error, NotServing):
        return Failure("UNAVAILABLE", str(error))
    if isinstance(error, ImageError | RequestError):
        return Failure("INVALID_ARGUMENT", str(error))
    if isinstance(error, NotFound):
        return Failure("NOT_FOUND", str(error))
    if isinstance(error, BatcherStopped):
        return Failure("UNAVAILABLE", "server is shutting down; retry the call")
    return Failure("INTERNAL", INTERNAL_MESSAGE)
