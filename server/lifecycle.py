"""The process's lifetime around a running server: SIGTERM / SIGINT stop it gracefully (also
during start-up: exit 0), SIGHUP re-scans the model folder (coalesced).

SIGTERM / SIGINT: health NOT_SERVING (Watch streams end), new calls refused with UNAVAILABLE,
in-flight calls given ``--grace`` seconds, batcher drained, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from rdn.metadata import MetadataError
from rdn.onnx_session import ModelLoadError
from server.app import RunningServer, ServerStartError, build_server
from server.config import ServerConfig
from server.core.engine import Engine
from server.core.repository import RepositoryError

log = logging.getLogger("rdn.serve")


async def _start(config: ServerConfig, scale: int | None) -> RunningServer | None:
    """Load the models and start the server; None (after logging why) when it cannot start.

    The first ``--model`` is opened first and checked against ``scale`` before the others."""
    engine = None
    try:
        if config.model is not None:
            engine = await asyncio.to_thread(Engine, config.model, config.engine)
    except (ModelLoadError, RuntimeError, ValueError) as e:
        log.error("%s", e)
        return None
    if engine is not None and scale is not None and engine.scale != scale:
        log.error(
            "--scale %d does not match the model: %s upscales x%d; drop --scale or pick "
            "a x%d model",
            scale,
            config.model,
            engine.scale,
            scale,
        )
        return None
    try:
        return await build_server(config, engine)
    except (ServerStartError, RepositoryError, MetadataError, ModelLoadError) as e:
        log.error("%s", e)
        return None


class EarlySignals:
    """Records SIGTERM / SIGINT until the event loop takes them over, so a signal at any
    moment of start-up stops the server cleanly (exit 0) instead of killing it (exit 143)."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a re-scan before start-up ends: ignored

    def _record(self, signum: int, frame: object) -> None:
        self.received = True


class Rescans:
    """SIGHUP: re-scan the model folder and swap what changed.

    Coalesced: one re-scan runs at a time and at most one waits behind it, so all the signals
    that arrive during a re-scan cost one more re-scan, not one each; that one starts after
    them and sees everything that changed before them. Signals that arrive before the server
    is up wait for it (one re-scan then covers them all)."""

    def __init__(self) -> None:
        self._running: RunningServer | None = None
        self._pending = False  # a signal came while the server started, or during a re-scan
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        if self._running is None:
            log.info("SIGHUP during start-up: the model repository is re-scanned once it is up")
            self._pending = True
            return
        if self._task is not None and not self._task.done():
            if not self._pending:
                log.info("SIGHUP during a re-scan: one more re-scan follows it")
            self._pending = True  # later ones join it
            return
        log.info("SIGHUP: re-scanning the model repository")
        self._task = asyncio.ensure_future(self._rescan(self._running))

    async def _rescan(self, running: RunningServer) -> None:
        while True:
            self._pending = False
            try:
                await running.repository.rescan()
            except Exception:  # the next SIGHUP must still work
                log.exception("model repository re-scan failed")
            if not self._pending:
                return
            log.info("re-scanning the model repository for the SIGHUPs received meanwhile")

    def attach(self, running: RunningServer) -> None:
        self._running = running
        if self._pending:
            self._pending = False
            self.request()


async def serve(
    config: ServerConfig, scale: int | None = None, early: EarlySignals | None = None
) -> int:
    """Run until SIGTERM / SIGINT, then shut down gracefully; the process exit code.

    A signal during start-up (model load, warm-up), or one ``early`` saw before, stops it
    there and exits 0 too.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early is not None and early.received:
        stop.set()
    # SIGHUP from here on is never lost: one that arrives while the server starts (after its
    # start-up scan may have read the folder, or just after "listening on" was logged) re-scans
    # as soon as the server is up.
    rescans = Rescans()
    loop.add_signal_handler(signal.SIGHUP, rescans.request)
    stopped = asyncio.ensure_future(stop.wait())
    starting = asyncio.ensure_future(_start(config, scale))
    await asyncio.wait([starting, stopped], return_when="FIRST_COMPLETED")
    if not starting.done():
        log.info("stop requested during start-up; exiting")
        starting.cancel()
        await asyncio.wait([starting])
        return 0
    running = starting.result()
    if running is None:
        stopped.cancel()
        return 1
    rescans.attach(running)
    terminated = asyncio.ensure_future(running.wait_for_termination())
    await asyncio.wait([terminated, stopped], return_when="FIRST_COMPLETED")
    log.info("shutting down: new calls refused, in-flight calls get up to %.1f s", config.grace_s)
    await running.stop(config.grace_s)
    terminated.cancel()
    stopped.cancel()
    log.info("stopped")
    return 0
