"""``rdn-client upscale --local`` as a user runs it: a shipped model by the name the server uses,
and one error line (no traceback) for each thing a user gets wrong."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from rdn.metadata import KEY_NAME, read_metadata
from server.local import resolve_model
from server.models import MODELS_DIR
from tests.server.cli import run_cli

SHIPPED = sorted(read_metadata(p)[KEY_NAME] for p in MODELS_DIR.glob("*.onnx"))


@pytest.fixture
def small_png(set5_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    image = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:18, :22]
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return path


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_shipped_model_by_its_served_name(small_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = run_cli("upscale", str(small_png), "-o", str(out), "--local", "rdn_x4")
    assert done.returncode == 0, done.stderr
    image = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert image.shape == (72, 88, 3) and image.dtype == np.uint8
    assert resolve_model("rdn_x4_photo") == MODELS_DIR / "rdn_x4_photo.onnx"  # name, not stem


def test_an_unknown_name_is_one_line_listing_the_shipped_names(
    small_png: Path, tmp_path: Path
) -> None:
    done = run_cli("upscale", str(small_png), "-o", str(tmp_path / "o.png"), "--local", "rdn_x5")
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert "'rdn_x5'" in line and "no shipped model of that name" in line
    assert ", ".join(SHIPPED) in line
    assert not (tmp_path / "o.png").exists()


def test_a_missing_file_is_one_line(small_png: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    done = run_cli(
        "upscale", str(small_png), "-o", str(tmp_path / "o.png"), "--local", str(missing)
    )
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert str(missing) in line and "no such file" in line


def test_a_file_that_is_not_onnx_is_one_line(small_png: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x07 this is not an ONNX model" * 20)
    done = run_cli("upscale", str(small_png), "-o", str(tmp_path / "o.png"), "--local", str(fake))
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert str(fake) in line and "not an ONNX model" in line
