"""Shared exports for tests/export: each dynamo export costs seconds, so each is made once.

x2 is exported by the real ``rdn-export`` console script (with a Triton repository), x3 and
x4 by the library; a float16 x2 and an opset-17 unverified x2 are made once more each.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from export.to_onnx import ExportOptions, ExportReport, export_onnx
from rdn.checkpoint import load_checkpoint, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 300


def cli_command() -> list[str]:
    """The installed console script when present, else the module."""
    script = Path(sys.executable).with_name("rdn-export")
    return [str(script)] if script.exists() else [sys.executable, "-m", "export.cli"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run rdn-export as a real subprocess from the repository root."""
    return subprocess.run(
        [*cli_command(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=CLI_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli`` for test modules (conftest is not importable under --import-mode=importlib)."""
    return run_cli


@dataclass(frozen=True)
class CliExport:
    checkpoint: Path
    output: Path
    triton_repo: Path
    model_name: str
    max_batch: int
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def cli_x2(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> CliExport:
    """x2, float32, verified, exported by the real CLI together with a Triton repository."""
    folder = tmp_path_factory.mktemp("cli_x2")
    output, repo = folder / "out" / "x2.onnx", folder / "triton"
    result = run_cli(
        "--checkpoint", tiny_checkpoint, "--output", output,
        "--triton-repo", repo, "--model-name", "rdn_x2", "--max-batch", "4",
    )  # fmt: skip
    return CliExport(tiny_checkpoint, output, repo, "rdn_x2", 4, result)


def add_training_state(source: Path, target: Path) -> Path:
    """Copy a checkpoint, adding what rdn-train stores beside the weights."""
    data = load_checkpoint(source)
    payload = {k: v for k, v in data.items() if k not in ("format", "version")}
    payload.update(
        train_config={"preset": "tiny", "lr": 1e-4, "batch_size": 16, "patch": 48},
        best_psnr=torch.tensor(31.25),
        optimizer={"state": {0: {"exp_avg": torch.zeros(16, 3, 3, 3)}}, "param_groups": []},
        rng={"torch": torch.get_rng_state(), "python": list(range(700))},
    )
    save_checkpoint(target, payload)
    return target


@pytest.fixture(scope="session")
def library_export(
    tiny_checkpoint_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], ExportReport]:
    """scale (3 or 4) -> report of a verified float32 library export (made once per scale).

    The x3 checkpoint also carries training state, to check what reaches the metadata.
    """
    made: dict[int, ExportReport] = {}

    def get(scale: int) -> ExportReport:
        if scale not in made:
            folder = tmp_path_factory.mktemp(f"lib_x{scale}")
            checkpoint = tiny_checkpoint_factory(scale)
            if scale == 3:
                checkpoint = add_training_state(checkpoint, folder / "trained.pt")
            made[scale] = export_onnx(checkpoint, folder / f"x{scale}.onnx")
        return made[scale]

    return get


@pytest.fixture(scope="session")
def onnx_path(
    cli_x2: CliExport, library_export: Callable[[int], ExportReport]
) -> Callable[[int], Path]:
    """scale -> path of the verified float32 export at that scale."""

    def get(scale: int) -> Path:
        if scale == 2:
            assert cli_x2.result.returncode == 0, cli_x2.result.stderr
            return cli_x2.output
        return library_export(scale).output

    return get


@pytest.fixture(scope="session")
def fp16_x2(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    folder = tmp_path_factory.mktemp("fp16_x2")
    return export_onnx(tiny_checkpoint, folder / "x2_fp16.onnx", ExportOptions(fp16=True))
