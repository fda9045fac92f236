"""A server on its own event loop in a daemon thread, for blocking code (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from server.app import RunningServer, ServerStartError, build_server
from server.config import ServerConfig
from server.core.engine import Engine

T = TypeVar("T")


class BackgroundServer:
    """A server on its own event loop in a daemon thread, for blocking code (tests, benchmarks).

    ``with BackgroundServer(config) as bg: UpscaleClient(f"127.0.0.1:{bg.port}")...``
    """

    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self._config = config
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.running: RunningServer | None = None

    @property
    def port(self) -> int:
        assert self.running is not None, "BackgroundServer not started"
        return self.running.port

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        """Start the thread; return once the server is SERVING (or raise why it is not)."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            try:
                self.running = await build_server(self._config, self._engine)
            except BaseException as e:
                failure.append(e)
            finally:
                ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.create_task(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="rdn-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ServerStartError(f"server did not start within {timeout} s")
        if failure:
            self._finish()
            raise failure[0]
        return self

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the server's loop (e.g. ``bg.running.stop(5)``)."""
        assert self._loop is not None, "BackgroundServer not started"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop and return its result."""
        return self.submit(coroutine).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        """Graceful stop (idempotent), then end the thread."""
        if self.running is not None:
            self.call(self.running.stop(grace))
        self._finish()

    def _finish(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
