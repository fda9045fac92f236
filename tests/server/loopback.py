"""The in-process server the server tests start: 127.0.0.1, a free port, CPU onnxruntime.

Imported as ``tests.server.loopback`` (like tests/tritonclient_env.py). The fixtures built on
it, ``engine``, ``server`` and ``client``, are in conftest.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from server.client import RetryPolicy
from server.config import BatcherConfig, EngineConfig, ServerConfig, TilingConfig

CPU = EngineConfig(providers=("CPUExecutionProvider",))
TILE, PAD = 32, 4  # LR tile core and context margin: small, so a test image spans several tiles
MAX_BATCH = 4  # tiles per engine call
NO_RETRY = RetryPolicy(max_attempts=1)  # a failed call fails the test instead of being retried


def loopback_config(model: Path | None, **changes: Any) -> ServerConfig:
    """A server on 127.0.0.1:0 (any free port) with the CPU engine; ``changes`` replace fields."""
    base = ServerConfig(
        model=model,
        host="127.0.0.1",
        port=0,
        grace_s=2.0,
        engine=CPU,
        tiling=TilingConfig(mode="grid", tile=TILE, pad=PAD),
        batcher=BatcherConfig(max_batch=MAX_BATCH, max_delay_ms=2.0, max_queue_tiles=4096),
    )
    return replace(base, **changes)
