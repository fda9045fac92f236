"""What one call did, whatever door it came through: the access record, logged once per call,
and the checks every door applies to a request's identity before any work.

``AccessObserver`` (server/ops/metrics.py) sees each record as the call starts and once it
is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from server.core.errors import RequestError

access_log = logging.getLogger("rdn.access")

MAX_REQUEST_ID_CHARS = 128  # the protos' limit


def check_request_id(request_id: str) -> str:
    """``request_id`` if it fits the protos' limit, else ``RequestError`` saying the limit."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} allowed"
        )
    return request_id


class AccessObserver(Protocol):
    """Sees every call's access record as it starts and once it is logged (metrics)."""

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
