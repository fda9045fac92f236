"""rdn-export killed with SIGKILL at random moments leaves no partial file at --output.

The exporter writes the model once, at the end, through an atomic rename. Each kill here lands
at a random delay after a random stage of the export (start, checkpoint loaded, BN folded, ONNX
exported, verification): the output must then be absent, or complete if the kill came after
the rename. The only thing a kill may leave is a hidden ``.NAME.*.tmp`` from inside the final
write; one is planted to stand for it, and the next export must remove it.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from rdn.metadata import read_model_metadata

EXPORT = Path(sys.executable).with_name("rdn-export")
STAGES = ("", "loaded ", "fold: ", "exported with ", "verify: ")  # stderr line prefixes
TIMEOUT = 300.0
HIDDEN_TEMP = re.compile(r"\.model\.onnx\..+\.tmp")


def command(*args: str) -> list[str]:
    base = [str(EXPORT)] if EXPORT.exists() else [sys.executable, "-m", "export.cli"]
    return [*base, *args]


def kill_at(stage: str, delay: float, args: list[str]) -> int:
    """Run the export, SIGKILL it ``delay`` s after a stderr line starting with ``stage``."""
    process = subprocess.Popen(command(*args), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        while stage:
            line = process.stderr.readline()
            if not line or line.startswith(stage):
                break
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    return process.returncode


@pytest.mark.slow
def test_export_killed_at_random_moments_leaves_no_partial_output(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    rng = random.Random()
    plan = [(rng.choice(STAGES), rng.uniform(0.0, 0.3)) for _ in range(3)]
    folder = tmp_path / "models"
    folder.mkdir()
    output = folder / "model.onnx"
    (folder / ".model.onnx.k1ll3d.tmp").write_bytes(b"half a model")  # as a kill mid-write
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(output), "--no-verify"]
    for stage, delay in plan:
        code = kill_at(stage, delay, args)
        assert code in (0, -signal.SIGKILL), (plan, code)
        if output.exists():  # the kill came after the rename (or the export won): a whole file
            onnx.checker.check_model(onnx.load(str(output)), full_check=True)
            assert read_model_metadata(output).scale == 2
            output.unlink()
        others = [p.name for p in folder.iterdir() if p != output]
        assert all(HIDDEN_TEMP.fullmatch(name) for name in others), (plan, others)

    done = subprocess.run(command(*args), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]  # the stale temp is gone
    assert read_model_metadata(output).scale == 2
