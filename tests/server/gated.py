"""The real engine behind a gate the test opens, and a loopback server that runs it.

Imported as ``tests.server.gated`` (like tests/server/loopback.py). Tests that ask "what had
the engine done when the client gave up / the queue filled / the signal arrived" hold the
engine's single worker thread at the gate, so the answer is a fact the test controls instead
of a race against a batcher that computes a tile in about a millisecond.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, NamedTuple

import grpc
import numpy as np

from server.config import ServerConfig
from server.core.engine import Engine
from tests.background import BackgroundServer

WAIT = 30.0  # seconds: bound on every wait; a broken server fails the test instead of hanging
# Client deadlines tried in turn by ``call_held_at_the_gate``: the first that outlasts
# connecting, decoding and dispatching the first batch on this machine is the one tested.
DEADLINES = (1.0, 4.0, 16.0)  # seconds


class GatedEngine:
    """The real engine behind a gate: each call waits until the test opens it.

    Not a mock: every batch still runs through onnxruntime.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.calls: list[int] = []  # tiles per engine call, in the order they reached the gate

    def __getattr__(self, name: str) -> Any:  # scale, providers, metadata, warmup ...
        return getattr(self._engine, name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if not self.gate.wait(WAIT):
            raise TimeoutError("the test never opened the engine gate")
        return self._engine.run(batch)


def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@contextmanager
def gated_server(
    config: ServerConfig, engine: Engine
) -> Iterator[tuple[BackgroundServer, GatedEngine]]:
    """A server on ``config`` whose engine calls wait at a closed gate; opened again at exit."""
    gated = GatedEngine(engine)
    gated.gate.set()  # warm-up may run through the engine too
    server = BackgroundServer(config, gated).start()  # type: ignore[arg-type]
    gated.gate.clear()
    gated.calls.clear()
    try:
        yield server, gated
    finally:
        gated.gate.set()
        server.stop()


class Held(NamedTuple):
    """A gated server and a call on it whose first batch reached the engine in time."""

    server: BackgroundServer
    gated: GatedEngine
    call: Future[Any] | grpc.Future
    request_id: str


@contextmanager
def call_held_at_the_gate(
    config: ServerConfig,
    engine: Engine,
    start: Callable[[BackgroundServer, ExitStack, str, float], Future[Any] | grpc.Future],
    name: str,
    deadlines: Sequence[float] = DEADLINES,
) -> Iterator[Held]:
    """A fresh gated server and a call on it whose first batch is held at the gate.

    ``start(server, stack, request_id, deadline)`` starts the call (what it opens goes on
    ``stack``, closed before the server stops). A deadline that passes before the server has
    dispatched the call's first batch (a slow, loaded machine) proves nothing about giving up
    mid-compute: that server is stopped and the next, longer deadline is tried on a new one.
    """
    for deadline in deadlines:
        request_id = f"{name}-{deadline:g}s"
        with ExitStack() as stack:
            server, gated = stack.enter_context(gated_server(config, engine))
            call = start(server, stack, request_id, deadline)
            until(partial(_dispatched_or_ended, gated, call), f"{request_id}: a batch or its end")
            if gated.calls:
                yield Held(server, gated, call, request_id)
                return
    raise AssertionError(f"no deadline of {deadlines} s outlasted the dispatch of a first batch")


def _dispatched_or_ended(gated: GatedEngine, call: Future[Any] | grpc.Future) -> bool:
    return bool(gated.calls) or call.done()
