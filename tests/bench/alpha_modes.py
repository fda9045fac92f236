"""Alpha upscaled by the model vs by bicubic, on soft alpha edges: PSNR of the upscaled alpha
against the high-resolution alpha it was downscaled from (INTER_AREA). Prints JSON.

    .venv/bin/python -m tests.bench.alpha_modes [--model rdn_x2]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np

from server.imaging.alpha import alpha_planes, fold_alpha
from server.local import LocalUpscaler

SET5 = Path(__file__).resolve().parents[2] / "tests" / "data" / "Set5"
log = logging.getLogger(__name__)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def soft_masks(side: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """High-resolution alphas with soft edges: anti-aliased shapes and feathered masks."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    masks = {}
    disc = np.hypot(x - side / 2, y - side / 2)
    masks["feathered disc"] = np.clip((side * 0.35 - disc) / (side * 0.05), 0, 1)
    big = np.zeros((side * 8, side * 8), np.uint8)  # drawn 8x larger, area-downscaled: AA
    for _ in range(6):
        centre = tuple(int(v) for v in rng.integers(0, side * 8, 2))
        axes = tuple(int(v) for v in rng.integers(side, side * 3, 2))
        cv2.ellipse(big, centre, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
    masks["anti-aliased ellipses"] = (
        cv2.resize(big, (side, side), interpolation=cv2.INTER_AREA) / 255
    )
    text = np.zeros((side * 8, side * 8), np.uint8)
    cv2.putText(
        text, "RDN", (side // 2, side * 5), cv2.FONT_HERSHEY_SIMPLEX, side / 24, 255, side // 6
    )
    masks["anti-aliased text"] = cv2.resize(text, (side, side), interpolation=cv2.INTER_AREA) / 255
    masks["blurred noise"] = cv2.GaussianBlur(
        (rng.random((side, side)) > 0.5).astype(np.float32), (0, 0), 3
    )
    return {k: (v * 255 + 0.5).astype(np.uint8) for k, v in masks.items()}


def set5_alphas(side: int) -> dict[str, np.ndarray]:
    """Set5 crops' luminance, thresholded and feathered: natural soft-edged mattes."""
    out = {}
    for path in sorted(SET5.glob("*.png")):
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)[:side, :side].astype(np.float32)
        matte = np.clip((grey - grey.mean()) / 40 + 0.5, 0, 1)
        out[f"Set5 {path.stem} matte"] = (cv2.GaussianBlur(matte, (0, 0), 1.5) * 255 + 0.5).astype(
            np.uint8
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="rdn_x2")
    parser.add_argument("--side", type=int, default=192, help="high-resolution side (pixels)")
    args = parser.parse_args(argv)
    upscaler = LocalUpscaler(args.model)
    scale = upscaler.scale
    side = args.side // scale * scale
    rows = []
    hrs = {**soft_masks(side, np.random.default_rng(0)), **set5_alphas(side)}
    for name, hr in hrs.items():
        lr = cv2.resize(hr, (side // scale, side // scale), interpolation=cv2.INTER_AREA)
        bicubic = cv2.resize(lr, (side, side), interpolation=cv2.INTER_CUBIC)
        started = time.perf_counter()
        model = fold_alpha(
            upscaler.upscale(np.ascontiguousarray(alpha_planes(lr).transpose(1, 2, 0)))
        )
        rows.append(
            {
                "image": name,
                "psnr_bicubic": round(psnr(bicubic, hr), 2),
                "psnr_model": round(psnr(model, hr), 2),
                "model_s": round(time.perf_counter() - started, 3),
            }
        )
    mean = {
        k: round(float(np.mean([r[k] for r in rows])), 2) for k in ("psnr_bicubic", "psnr_model")
    }
    print(json.dumps({"model": args.model, "side": side, "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
