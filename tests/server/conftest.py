"""Fixtures for server tests: tiny real ONNX models exported from tiny real checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from export.to_onnx import ExportOptions, export_onnx


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
