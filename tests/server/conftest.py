"""Fixtures for server tests: tiny real ONNX models exported from tiny real checkpoints, and
a real server on loopback serving one of them (configured by tests/server/loopback.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from export.to_onnx import ExportOptions, export_onnx
from server.client import UpscaleClient
from server.config import ServerConfig
from server.core.engine import Engine
from tests.background import BackgroundServer
from tests.server.loopback import CPU, NO_RETRY, loopback_config


@pytest.fixture(scope="session")
def tiny_onnx_factory(
    tiny_checkpoint_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Path]:
    """scale -> the tiny checkpoint at that scale exported by rdn-export's library function.

    Dynamic batch, height and width, ``rdn.*`` metadata; no parity check (export tests do
    that). Made once per session.
    """
    made: dict[int, Path] = {}

    def get(scale: int = 2) -> Path:
        if scale not in made:
            output = tmp_path_factory.mktemp(f"tiny_onnx_x{scale}") / f"tiny_x{scale}.onnx"
            export_onnx(tiny_checkpoint_factory(scale), output, ExportOptions(verify=False))
            made[scale] = output
        return made[scale]

    return get


@pytest.fixture(scope="session")
def tiny_onnx_x2(tiny_onnx_factory: Callable[[int], Path]) -> Path:
    return tiny_onnx_factory(2)


@pytest.fixture(scope="module")
def engine(tiny_onnx_x2: Path) -> Engine:
    """The tiny x2 model on CPU, one session per test module."""
    return Engine(tiny_onnx_x2, CPU)


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    """The config of ``server``; a test module overrides this fixture to serve its own."""
    return loopback_config(tiny_onnx_x2)


@pytest.fixture(scope="module")
def server(shared_server_config: ServerConfig, engine: Engine) -> Iterator[BackgroundServer]:
    """A real server on loopback shared by one module's tests."""
    with BackgroundServer(shared_server_config, engine) as bg:
        yield bg


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[UpscaleClient]:
    """A client of ``server`` that does not retry."""
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c:
        yield c
