"""The clients' retry policy: which failures are retried, how long to wait, and the deadline.

UNAVAILABLE is retried, and RESOURCE_EXHAUSTED when the server marks it transient (a full tile
queue, with its retry hint in the trailing metadata), with capped exponential backoff and full
jitter, never waiting less than the server's hint and never past the call's overall deadline.
Both clients (``server.client``) run their attempts through ``Attempts``, so the blocking and
the asyncio client decide alike; they differ only in how they wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from server.client.messages import AnswerError
from server.wire import RETRY_AFTER_KEY

log = logging.getLogger("rdn.client")


class UpscaleError(Exception):
    """A call failed: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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


DEFAULT_RETRY = RetryPolicy()  # four attempts, 0.1 s doubling up to 2 s


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


def error_from(error: grpc.RpcError) -> tuple[UpscaleError, Any]:
    """A failed call as ``UpscaleError`` and the trailing metadata that may mark it transient."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
    return UpscaleError(code or grpc.StatusCode.UNKNOWN, details or ""), trailers


def answer_failure(error: AnswerError) -> UpscaleError:
    """A broken answer as the clients report it: DATA_LOSS, never retried."""
    return UpscaleError(grpc.StatusCode.DATA_LOSS, f"broken answer from the server: {error}")


class Attempts:
    """The attempts of one call inside its overall deadline (``timeout`` seconds from now).

    Iterating gives each attempt's timeout, what is left of the deadline (None without one);
    after a failure, ``delay_after`` says how long to wait before the next attempt, or raises the
    failure as ``UpscaleError`` when it is not to be retried.
    """

    def __init__(self, policy: RetryPolicy, timeout: float | None, rng: random.Random) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._rng = rng
        self._attempt = 0
        self._error: UpscaleError | None = None

    def __iter__(self) -> Iterator[float | None]:
        for attempt in range(self._policy.max_attempts):
            self._attempt = attempt
            yield self._remaining()

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._error or UpscaleError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            )
        return remaining

    def delay_after(self, failure: grpc.RpcError) -> float:
        """Seconds to wait before retrying ``failure``, or raise it when retrying is not
        allowed (last attempt, a status that retrying cannot help, or past the deadline)."""
        error, trailers = error_from(failure)
        self._error = error
        attempt = self._attempt
        if attempt + 1 >= self._policy.max_attempts or not is_retryable(error.code, trailers):
            raise error
        delay = backoff_s(self._policy, attempt, self._rng, retry_after_s(trailers))
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise error
        log.debug("retrying after %s (attempt %d, waiting %.3f s)", error.code.name, attempt, delay)
        return delay


@contextmanager
def as_upscale_error() -> Iterator[None]:
    """Re-raise a failed one-shot call (no retries: model info, health) as ``UpscaleError``."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from(e)[0] from None
