"""Fixtures shared by every test package: real images and small real checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rdn.checkpoint import make_payload, save_checkpoint
from rdn.model import RDN, RDNConfig, freeze_batchnorm

TESTS = Path(__file__).resolve().parent
SET5 = TESTS / "data" / "Set5"


@pytest.fixture(scope="session")
def set5_dir() -> Path:
    """Set5 (5 PNGs, copied from ../shared/data so tests run on a fresh clone)."""
    return SET5


def make_tiny_checkpoint(path: Path, scale: int = 2, seed: int = 0, norm: str = "batch") -> Path:
    """A tiny RDN whose BatchNorms hold non-trivial statistics, frozen, saved as a checkpoint.

    The statistics come from a few train-mode passes over random data, so folding BN into
    the convolutions is exercised with means and variances far from (0, 1).
    """
    torch.manual_seed(seed)
    model = RDN(RDNConfig.from_preset("tiny", scale=scale, norm=norm))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 24, 24) * 0.8 + 0.1)
    freeze_batchnorm(model)
    save_checkpoint(path, make_payload(model, step=3))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """scale -> path of a tiny frozen-BN checkpoint at that scale (made once per session)."""
    made: dict[int, Path] = {}

    def get(scale: int = 2) -> Path:
        if scale not in made:
            folder = tmp_path_factory.mktemp(f"tiny_x{scale}")
            made[scale] = make_tiny_checkpoint(folder / "tiny.pt", scale=scale)
        return made[scale]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory: Callable[[int], Path]) -> Path:
    return tiny_checkpoint_factory(2)
