"""rdn-train killed with SIGKILL twice, at random moments, resumes without loss.

test_train.py kills a run once, right after a checkpoint appears. Here each kill lands at a
random delay after a random step was reached, so it can hit the middle of a step or of a
checkpoint write; after every kill ``last.pt`` must load, and the final weights must equal an
uninterrupted run's. Same tiny settings and flags as test_train.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rdn.checkpoint import load_checkpoint

BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--batch-size", "2", "--patch-size", "16", "--log-every", "1000"]
STEPS = 40  # the kills come by step 16 + 50 ms; the rest is margin for a slow poller
ARGS = [*TINY, "--steps", str(STEPS), "--save-every", "2", "--seed", "5", "--bn-freeze-after", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT = 180.0  # seconds for one rdn-train process


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "rdn-train"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def kill_after_step(process: subprocess.Popen[bytes], last: Path, step: int, delay: float) -> None:
    """SIGKILL ``delay`` seconds after ``last`` first holds a step >= ``step``."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        if last.exists() and load_checkpoint(last)["step"] >= step:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(RUN_TIMEOUT)


@pytest.mark.slow
def test_two_kills_at_random_moments_then_resume_equals_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    rng = random.Random()
    first = rng.randint(2, 8)
    plan = [(first, rng.uniform(0, 0.05)), (rng.randint(first + 4, 16), rng.uniform(0, 0.05))]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(
        [str(BIN / "rdn-train"), *ARGS, "--out", str(full)],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    last = killed / "last.pt"
    process = start(*ARGS, "--out", str(killed))
    at_kill = []
    for step, delay in plan:
        kill_after_step(process, last, step, delay)
        assert process.returncode == -signal.SIGKILL, f"plan {plan}: the run ended by itself"
        at_kill.append(load_checkpoint(last)["step"])  # loadable after every kill
        assert step <= at_kill[-1] < STEPS, f"plan {plan}, at kill {at_kill}"
        process = start("--resume", "--out", str(killed))
    _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, stderr.decode()[-2000:]

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(last)
    assert a["step"] == b["step"] == STEPS
    assert max_abs_diff(a["model"], b["model"]) <= 1e-6, f"plan {plan}, at kill {at_kill}"
    assert sorted(p.name for p in killed.glob(".*.tmp")) == []  # stale temp files cleaned
