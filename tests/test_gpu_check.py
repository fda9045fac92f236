"""``make gpu-check`` where no GPU is usable: one readable line and exit 1, no CPU timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rdn.constants import CPU, CUDA
from server.config import EngineConfig
from server.core.engine import Engine
from server.models import default_model_path

REPO = Path(__file__).resolve().parents[1]


def cuda_is_usable() -> bool:
    engine = Engine(default_model_path(2), EngineConfig(providers=(CUDA, CPU), intra_op_threads=1))
    return engine.active_provider == CUDA


def test_gpu_check_without_a_gpu_says_why_in_one_line() -> None:
    if cuda_is_usable():
        pytest.skip("CUDA is usable here: run make gpu-check itself (minutes)")
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu_check", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(lines) == 1 and CUDA in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
