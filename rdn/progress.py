"""Training progress: ``metrics.jsonl`` rows, and a tqdm bar on a terminal or log lines.

A row is written, and the bar or log updated, after each of the first steps (``EARLY_STEPS``,
so a new run shows its speed and loss within seconds), then every ``log_every`` steps and at
the last step. Losses are the mean over the interval and over all ranks; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from rdn.distributed import Dist

log = logging.getLogger("rdn.train")

EARLY_STEPS = frozenset({1, 2, 5, 10, 20, 50})  # logged whatever log_every is


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step``: a resumed run rewrites the rest."""
    kept: list[str] = []
    if step > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    path.write_text("".join(line + "\n" for line in kept))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One JSON object per line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def is_logged(done: int, log_every: int, total: int) -> bool:
    """Whether step ``done`` (1-based) writes a row: pure, so every rank agrees."""
    return done in EARLY_STEPS or done % log_every == 0 or done == total


class Progress:
    """Loss, learning rate, speed and ETA of a run that goes from ``start_step`` to ``total``."""

    def __init__(
        self,
        metrics: Path | None,
        start_step: int,
        total: int,
        log_every: int,
        ctx: Dist,
        device: torch.device,
    ) -> None:
        self.metrics, self.total, self.log_every, self.ctx = metrics, total, log_every, ctx
        if metrics is not None:
            truncate_metrics(metrics, start_step)
        self.bar = None
        if metrics is not None and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
        self.loss_sum = torch.zeros((), device=device)
        self.start, self.steps = time.perf_counter(), 0

    def logging_context(self) -> contextlib.AbstractContextManager[Any]:
        """Route log lines through tqdm while the bar is shown, so they do not break it."""
        return logging_redirect_tqdm() if self.bar is not None else contextlib.nullcontext()

    def step_done(self, done: int, loss: torch.Tensor, lr: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not is_logged(done, self.log_every, self.total):
            return
        if self.ctx.enabled:  # every rank reaches this step, so the collective is safe
            dist.all_reduce(self.loss_sum)
        mean_loss = self.loss_sum.item() / (self.steps * self.ctx.world_size)
        elapsed = time.perf_counter() - self.start
        speed = self.steps / elapsed if elapsed > 0 else math.nan
        self.loss_sum.zero_()
        self.start, self.steps = time.perf_counter(), 0
        if self.metrics is None:
            return
        append_metrics(
            self.metrics, {"step": done, "loss": mean_loss, "lr": lr, "steps_per_s": speed}
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            return
        eta = (self.total - done) / speed if speed > 0 else math.inf
        log.info(
            "step %d/%d loss %.4f lr %.2e %.2f steps/s (%.3f s/step) eta %s",
            done,
            self.total,
            mean_loss,
            lr,
            speed,
            1 / speed if speed > 0 else math.nan,
            format_eta(eta),
        )

    def write(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            append_metrics(self.metrics, row)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
