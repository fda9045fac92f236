"""Connection limits of the HTTP door: a cap on open connections that leaves file descriptors
for gRPC, the listening site that applies it, and one log line per malformed request head.

Every open HTTP connection costs a file descriptor, and so does every gRPC connection, model
file and log: without a cap, a flood of unfinished heads exhausts the process's descriptors
and takes the gRPC side down with it. At start ``raise_open_file_limit`` lifts the soft limit
to the hard one where allowed; ``connection_cap`` then keeps FD_RESERVE descriptors (or half
the limit, whichever is more) out of the HTTP door's reach, and connections beyond the cap are
answered 503 and closed at once. Slow heads and idle keep-alive connections are closed by
aiohttp's keep-alive timer (``--http-idle-timeout``), which runs from a connection's opening
or its previous answer until a complete head has arrived.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.doors.http_body import one_line

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept from the HTTP door: gRPC connections, models, logs, pipes
UNLIMITED_OPEN_FILES = 2**20  # the soft limit asked for when the hard one is unlimited
OVERFLOW_BODY = b'{"error": "too many open connections; retry shortly"}'
OVERFLOW_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(OVERFLOW_BODY)).encode()
    + b"\r\n\r\n"
    + OVERFLOW_BODY
)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit where allowed; the soft
    limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return open_file_limit()


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE (UNLIMITED_OPEN_FILES when unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_OPEN_FILES if soft == resource.RLIM_INFINITY else soft


def connection_cap(requested: int, open_files: int) -> int:
    """Open HTTP connections allowed: ``requested``, lowered to leave FD_RESERVE descriptors
    (or half of ``open_files``, whichever is more) to the rest of the process."""
    spare = max(open_files - FD_RESERVE, open_files // 2)
    return max(1, min(requested, spare))


class ConnectionGate:
    """Counts open HTTP connections; a connection over the cap is answered 503 and closed.

    A connection counts from ``connection_made`` (after the TLS handshake, which the site
    bounds by the idle timeout) to ``connection_lost``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0

    def protocol_factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        return lambda: _Gated(self, make)


class _Gated(asyncio.Protocol):
    """aiohttp's protocol for a connection under the cap; nothing for one over it."""

    def __init__(self, gate: ConnectionGate, make: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._make = make
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open >= gate.cap:
            gate.refused += 1
            if gate.refused == 1 or gate.refused % 1000 == 0:
                log.warning(
                    "HTTP connection refused: %d open, the cap (--http-max-connections); "
                    "%d refused so far",
                    gate.open,
                    gate.refused,
                )
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(OVERFLOW_ANSWER)
            transport.close()
            return
        gate.open += 1
        self._inner = self._make()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.open -= 1
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GatedSite(web.BaseSite):
    """A TCP site whose connections pass through a ``ConnectionGate``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        gate: ConnectionGate,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout_s: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._requested_port = port
        self._gate = gate
        self._handshake_timeout_s = handshake_timeout_s
        self.port = port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        tls = self._ssl_context is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate.protocol_factory(server),
            self._host,
            self._requested_port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout_s if tls else None,
            backlog=self._backlog,
        )
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._requested_port


class HeadErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, with a malformed request head logged as one warning line
    instead of an error with a traceback (a client's mistake, not the server's)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        info = kwargs.get("exc_info")
        error = info if isinstance(info, BaseException) else sys.exc_info()[1] if info else None
        if isinstance(error, HttpProcessingError):
            text = msg % args if isinstance(msg, str) and args else str(msg)
            level = min(level, logging.WARNING)  # aiohttp logs non-HTTP traffic at DEBUG
            self.logger.log(level, "%s: %s", one_line(text, 80), one_line(f"{error}"))
            return
        super().log(level, msg, *args, **kwargs)
