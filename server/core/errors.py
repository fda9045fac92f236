"""The request errors every servicer raises; ``server.core.failures`` classifies each for the doors.

They live apart from the servicers so that every module that raises or maps them (service,
kserve, uploads, parse_guard) imports this small module rather than a servicer.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request is malformed (INVALID_ARGUMENT); the message says what is allowed."""


class StreamEnded(RequestError):
    """A request stream ended early (INVALID_ARGUMENT), unless a client's cancel follows it."""


class RequestTooLarge(RequestError):
    """A request or its answer exceeds a size limit (RESOURCE_EXHAUSTED)."""


class NotFound(LookupError):
    """A request names a model or version this server does not serve (NOT_FOUND)."""


class NotServing(RuntimeError):
    """The server is not SERVING (warming up, or draining) and takes no new work (UNAVAILABLE)."""


class UploadTimeout(RuntimeError):
    """An upload paused too long or took too long as a whole (DEADLINE_EXCEEDED)."""


class Busy(RuntimeError):
    """Transient: the server holds as much as it may right now (RESOURCE_EXHAUSTED with a
    retry-after hint, like a full tile queue)."""


MAX_NAME_BYTES = 256  # names, versions and ids a client sends: longer ones are never echoed


def check_name(value: str, field: str) -> str:
    """``value`` if it is at most MAX_NAME_BYTES of UTF-8, else ``RequestError`` that does not
    repeat it (a name of megabytes would flood the log and the error's metadata)."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise RequestError(f"{field} is {size} bytes long; at most {MAX_NAME_BYTES} are accepted")
    return value
