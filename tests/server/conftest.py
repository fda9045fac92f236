"""Fixtures for server tests: tiny real ONNX models exported from tiny real checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def _export(checkpoint: Path, output: Path) -> Path:
    """Export ``checkpoint`` to ``output`` (dynamic batch, height and width; no parity check)."""
    try:
        from export.to_onnx import ExportOptions, export_onnx
    except ImportError:  # the exporter is being written in parallel; same graph either way
        import torch

        from rdn.checkpoint import load_model

        model, _ = load_model(checkpoint)
        dynamic = {0: "batch", 2: "height", 3: "width"}
        torch.onnx.export(
            model.eval(),
            torch.rand(1, 3, 32, 32),
            str(output),
            dynamo=False,
            input_names=["lr"],
            output_names=["sr"],
            dynamic_axes={"lr": dynamic, "sr": dynamic},
        )
        return output
    export_onnx(checkpoint, output, ExportOptions(verify=False))
    return output


@pytest.fixture(scope="session")
def tiny_onnx_factory(
    tiny_checkpoint_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Path]:
    """scale -> path of the tiny checkpoint at that scale exported to ONNX (once per session)."""
    made: dict[int, Path] = {}

    def get(scale: int = 2) -> Path:
        if scale not in made:
            folder = tmp_path_factory.mktemp(f"tiny_onnx_x{scale}")
            made[scale] = _export(tiny_checkpoint_factory(scale), folder / f"tiny_x{scale}.onnx")
        return made[scale]

    return get


@pytest.fixture(scope="session")
def tiny_onnx_x2(tiny_onnx_factory: Callable[[int], Path]) -> Path:
    return tiny_onnx_factory(2)
