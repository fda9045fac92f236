"""How closely tiled inference matches whole-image inference, per context margin (pad).

Prints one JSON object per pad, then one with the chosen pad: the smallest pad whose tiled
output is within PSNR >= 50 dB and max abs diff <= 2/255 of whole-image inference.

    python -m tests.bench.tiling_accuracy --model server/models/default_x2.onnx

Two references, both computed on 8-bit rounded RGB:
- ``seam_*``: whole-image inference on the image reflect-padded by ``pad`` and cropped. Tiles
  see exactly that context at image borders, so this isolates the error of cutting the image
  into tiles (the criterion for choosing the pad).
- ``plain_*``: whole-image inference on the unpadded image (the model's zero padding at image
  borders). Includes the effect of reflect padding at the image borders, which is not a seam.
``seam_step_*``: jump of (tiled - whole) between neighbouring pixels on either side of a tile
border, 8-bit levels: a visible seam is such a step.
``*_vs_hr_psnr_db``: tiled and plain whole-image output against the ground truth (RGB, borders
included), to see what reflect padding at image borders costs or gains.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.core.tiling import merge_tiles, plan_tiles, split_tiles

log = logging.getLogger("tiling_accuracy")

PSNR_TARGET_DB = 50.0
MAX_DIFF_TARGET = 2  # 8-bit levels
BATCH = 8  # tiles per session call
PSNR_IDENTICAL_DB = 100.0  # reported when tiled and whole outputs are identical
DEFAULT_HR = Path(__file__).resolve().parents[1] / "data" / "Set5" / "baby.png"  # not trained on


def lr_from_hr(hr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic downscale (Pillow, the training and benchmark degradation); ``hr`` is modcropped."""
    from PIL import Image

    height, width = (side // scale for side in hr.shape[:2])
    return np.asarray(Image.fromarray(hr).resize((width, height), Image.BICUBIC))


def modcrop(hr: np.ndarray, scale: int) -> np.ndarray:
    return hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def to_u8(chw: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chw * 255.0), 0, 255).astype(np.uint8)


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images; identical ones give PSNR_IDENTICAL_DB (JSON has no inf)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL_DB if mse == 0 else min(PSNR_IDENTICAL_DB, 10 * np.log10(255.0**2 / mse))


def run_tiles(session: ort.InferenceSession, tiles: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: tiles[i : i + BATCH]})[0] for i in range(0, len(tiles), BATCH)
    ]
    return np.concatenate(parts)


def run_whole(session: ort.InferenceSession, chw: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: chw[None]})[0][0]


def seam_steps(diff: np.ndarray, period: int) -> tuple[float, float]:
    """(mean, max) abs jump of ``diff`` [C, H, W] between neighbours across tile borders."""
    across_cols = np.abs(np.diff(diff, axis=2))[:, :, period - 1 :: period]
    across_rows = np.abs(np.diff(diff, axis=1))[:, period - 1 :: period, :]
    jumps = np.concatenate([across_cols.ravel(), across_rows.ravel()])
    return (float(jumps.mean()), float(jumps.max())) if jumps.size else (0.0, 0.0)


def measure(
    session: ort.InferenceSession,
    rgb: np.ndarray,
    tile: int,
    pad: int,
    hr: np.ndarray | None = None,
) -> dict:
    """Tiled vs whole-image inference of ``rgb`` (H x W x 3 uint8) for one tile/pad; with the
    ground truth ``hr``, also each one's PSNR against it (RGB, borders included)."""
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0
    h, w = chw.shape[1:]
    plan = plan_tiles(h, w, tile, pad)
    outputs = run_tiles(session, split_tiles(chw, plan))
    scale = outputs.shape[-1] // plan.input_shape[1]
    tiled = to_u8(merge_tiles(outputs, plan, scale)).astype(np.int16)

    padded = np.pad(chw, [(0, 0), (pad, pad), (pad, pad)], mode="reflect")
    seam_ref = run_whole(session, padded)
    seam_ref = to_u8(seam_ref[:, scale * pad : scale * (pad + h), scale * pad : scale * (pad + w)])
    plain_ref = to_u8(run_whole(session, chw))
    seam_diff = tiled - seam_ref.astype(np.int16)
    step_mean, step_max = seam_steps(seam_diff.astype(np.float64), scale * tile)
    truth = {}
    if hr is not None:
        hr_chw = hr.transpose(2, 0, 1)
        truth = {
            "tiled_vs_hr_psnr_db": round(psnr_u8(tiled, hr_chw), 3),
            "plain_vs_hr_psnr_db": round(psnr_u8(plain_ref, hr_chw), 3),
        }
    return {
        "tile": tile,
        "pad": pad,
        "tiles": plan.count,
        "image": f"{h}x{w}",
        "scale": scale,
        "seam_psnr_db": round(psnr_u8(tiled, seam_ref), 2),
        "seam_max_abs_diff": int(np.abs(seam_diff).max()),
        "seam_mean_abs_diff": round(float(np.abs(seam_diff).mean()), 4),
        "seam_step_mean": round(step_mean, 4),
        "seam_step_max": round(step_max, 2),
        "plain_psnr_db": round(psnr_u8(tiled, plain_ref), 2),
        "plain_max_abs_diff": int(np.abs(tiled - plain_ref.astype(np.int16)).max()),
        **truth,
    }


def choose_pad(rows: list[dict]) -> int | None:
    """Smallest pad meeting both targets on the seam reference, or None."""
    good = [
        r["pad"]
        for r in rows
        if r["seam_psnr_db"] >= PSNR_TARGET_DB and r["seam_max_abs_diff"] <= MAX_DIFF_TARGET
    ]
    return min(good) if good else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("server/models/default_x2.onnx"))
    parser.add_argument(
        "--hr",
        type=Path,
        default=DEFAULT_HR,
        help="ground-truth image; the LR input is its bicubic downscale (default: Set5 baby, "
        "512x512, so 256x256 at x2)",
    )
    parser.add_argument("--lr", type=Path, help="LR image to use instead (no ground truth)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--pads", default="0,4,8,10,12,16", help="comma-separated pads")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.model.is_file():
        log.error("model %s: no such file (export one with rdn-export)", args.model)
        return 2
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    scale = run_whole(session, np.zeros((3, 8, 8), np.float32)).shape[-1] // 8
    if args.lr:
        rgb, hr = load_rgb(args.lr), None
    else:
        hr = modcrop(load_rgb(args.hr), scale)
        rgb = lr_from_hr(hr, scale)
    rows = []
    for pad in (int(p) for p in args.pads.split(",")):
        source = str(args.lr or args.hr)
        row = {
            "model": str(args.model),
            "source": source,
            **measure(session, rgb, args.tile, pad, hr),
        }
        rows.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    chosen = choose_pad(rows)
    summary = {
        "chosen_pad": chosen,
        "criterion": f"seam_psnr_db >= {PSNR_TARGET_DB} and seam_max_abs_diff <= {MAX_DIFF_TARGET}",
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0 if chosen is not None else 1  # no pad in the sweep meets the criterion


if __name__ == "__main__":
    raise SystemExit(main())
