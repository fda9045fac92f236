"""rdn-eval scores the exported model as it scores the checkpoint (Set5, x2, real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PSNR_AGREEMENT_DB = 0.01


def rdn_eval(*args: str | Path) -> dict:
    script = Path(sys.executable).with_name("rdn-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rdn.eval_cli"]
    result = subprocess.run(
        [*command, *map(str, args), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_onnx_and_checkpoint_psnr_agree(cli_x2, set5_dir: Path) -> None:
    assert cli_x2.result.returncode == 0, cli_x2.result.stderr
    common = ("--data", set5_dir, "--scale", "2")
    torch_run = rdn_eval("--checkpoint", cli_x2.checkpoint, "--device", "cpu", *common)
    onnx_run = rdn_eval("--onnx", cli_x2.output, "--providers", "cpu", *common)
    assert len(torch_run["per_image"]) == len(onnx_run["per_image"]) == 5
    assert onnx_run["scale"] == torch_run["scale"] == 2
    assert abs(onnx_run["model_psnr_y"] - torch_run["model_psnr_y"]) <= PSNR_AGREEMENT_DB
    assert onnx_run["bicubic_psnr_y"] == torch_run["bicubic_psnr_y"]  # same protocol, same data
