"""Comparison pictures of an evaluation: bicubic | model | ground truth of one crop per image,
the crop chosen where the image has the most detail (rdn-eval --save-comparison)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from rdn.evaluate import ImageSample
from rdn.metrics import rgb_to_y

COMPARISON_CROP = 128  # HR pixels: side of the region shown in a comparison picture
COMPARISON_PANEL = 256  # pixels: smaller crops are enlarged (nearest neighbour) to at least this
COMPARISON_GAP = 4  # pixels of white between the panels
COMPARISON_STRIDE = 8  # HR pixels: grid on which the highest-variance crop is searched


def comparison_box(hr: np.ndarray, size: int = COMPARISON_CROP) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the ``size``-pixel square with the largest Y variance.

    Searched on a ``COMPARISON_STRIDE`` grid; ties go to the first (top-left) position, so the
    choice is deterministic. Images smaller than ``size`` are shown whole along that side.
    """
    y = rgb_to_y(hr)
    h, w = y.shape
    ch, cw = min(size, h), min(size, w)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = y.cumsum(0).cumsum(1)
    integral_sq = np.zeros((h + 1, w + 1))
    integral_sq[1:, 1:] = (y * y).cumsum(0).cumsum(1)
    tops = np.arange(0, h - ch + 1, COMPARISON_STRIDE)[:, None]
    lefts = np.arange(0, w - cw + 1, COMPARISON_STRIDE)[None, :]

    def window_sum(table: np.ndarray) -> np.ndarray:
        return (
            table[tops + ch, lefts + cw]
            - table[tops, lefts + cw]
            - table[tops + ch, lefts]
            + table[tops, lefts]
        )

    n = ch * cw
    variance = window_sum(integral_sq) / n - (window_sum(integral) / n) ** 2
    i, j = np.unravel_index(int(np.argmax(variance)), variance.shape)
    return int(tops[i, 0]), int(lefts[0, j]), ch, cw


def comparison_image(
    hr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, size: int = COMPARISON_CROP
) -> np.ndarray:
    """bicubic | model | ground truth of one crop, side by side with white gaps, uint8 RGB."""
    top, left, ch, cw = comparison_box(hr, size)
    zoom = max(1, math.ceil(COMPARISON_PANEL / max(ch, cw)))
    panels = [
        np.repeat(np.repeat(image[top : top + ch, left : left + cw], zoom, 0), zoom, 1)
        for image in (bicubic, sr, hr)
    ]
    ph, pw = ch * zoom, cw * zoom
    canvas = np.full((ph, 3 * pw + 2 * COMPARISON_GAP, 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        x = k * (pw + COMPARISON_GAP)
        canvas[:, x : x + pw] = panel
    return canvas


def save_comparison(sample: ImageSample, folder: Path, scale: int) -> Path:
    """Write ``<folder>/<image>_x<scale>.png`` (bicubic | model | ground truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sample.path.stem}_x{scale}.png"
    Image.fromarray(comparison_image(sample.hr, sample.bicubic, sample.sr)).save(
        path, optimize=True
    )
    return path
