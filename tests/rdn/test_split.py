"""rdn-split: the held-out images are every N-th by name, and the CLI writes working links."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rdn.split import split_names


def test_every_nth_sorted_name_is_held_out() -> None:
    names = [f"{c}.png" for c in "fedcba"]
    train, val = split_names(names, 3)
    assert val == ["a.png", "d.png"]
    assert train == ["b.png", "c.png", "e.png", "f.png"]


def test_every_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="every must be >= 2"):
        split_names(["a.png"], 1)


def test_cli_links_train_and_val(set5_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "rdn.split", str(set5_dir), str(out), "--every", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    val = sorted(p.name for p in (out / "val").iterdir())
    train = sorted(p.name for p in (out / "train").iterdir())
    assert val == ["baby.png", "butterfly.png", "woman.png"]
    assert train == ["bird.png", "head.png"]
    link = out / "val" / "baby.png"
    assert link.is_symlink() and link.read_bytes() == (set5_dir / "baby.png").read_bytes()


def test_cli_missing_folder_is_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rdn.split", str(tmp_path / "nope"), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"rdn-split: error: {tmp_path / 'nope'} is not a folder"
    ]
