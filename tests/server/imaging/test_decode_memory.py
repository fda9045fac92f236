"""The per-request decode memory bound docs/serving.md states (``codec.DECODE_BYTES_PER_PIXEL``),
measured on the formats that need the most: 16-bit and alpha PNG and TIFF, progressive JPEG,
lossless WebP. Each file is decoded in a fresh process so the high-water mark is decoding's."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from server.imaging.headers import DECODE_BYTES_PER_PIXEL

SIDE = 2048  # 4 Mpix: large enough that the decoder's buffers dominate the interpreter's noise
SCRIPT = Path(__file__).parents[1] / "decode_memory_script.py"


def gradient(channels: int, top: int = 255) -> np.ndarray:
    """A smooth image (small files, full-size decode buffers)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    planes = [(x * (k + 1) + y) % (top + 1) for k in range(channels)]
    return np.stack(planes, -1).astype(np.uint16 if top > 255 else np.uint8)


def pillow(image: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **options)
    return out.getvalue()


FILES: dict[str, Callable[[], bytes]] = {
    "PNG 16-bit RGBA": lambda: cv2.imencode(".png", gradient(4, 65535))[1].tobytes(),
    "TIFF 16-bit RGB": lambda: cv2.imencode(".tiff", gradient(3, 65535))[1].tobytes(),
    "TIFF RGBA Deflate (Pillow)": lambda: pillow(
        gradient(4), "TIFF", compression="tiff_adobe_deflate"
    ),
    "TIFF RGB Deflate (checked twice)": lambda: pillow(
        gradient(3), "TIFF", compression="tiff_adobe_deflate"
    ),
    "JPEG progressive 4:4:4": lambda: pillow(
        gradient(3), "JPEG", progressive=True, subsampling=0, quality=95
    ),
    "WebP lossless RGBA": lambda: cv2.imencode(
        ".webp", gradient(4), [cv2.IMWRITE_WEBP_QUALITY, 101]
    )[1].tobytes(),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_decoding_needs_at_most_the_stated_bytes_per_pixel(name: str, tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(FILES[name]())
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    per_pixel = float(done.stdout)
    assert 1.0 < per_pixel <= DECODE_BYTES_PER_PIXEL, f"{name}: {per_pixel:.1f} bytes per pixel"
