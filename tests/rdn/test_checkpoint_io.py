"""atomic_write: the file appears whole or not at all, with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rdn.checkpoint import atomic_write


def test_written_file_gets_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    atomic_write(target, lambda f: f.write(b"data"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert target.read_bytes() == b"data"


def test_failed_write_leaves_old_file_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")

    def explode(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
