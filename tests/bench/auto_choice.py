"""model=auto against the clean and the photo model, per input kind (issue #25's table).

For each photo (a centred crop), scale and input kind, the request a user would send is made
from the HR crop as the evaluation protocol makes LR (``rdn.evaluate``: modcrop, MATLAB-style
bicubic downscale, ``rdn.degradations`` for noise, the same OpenCV JPEG encoder): a PNG of the
clean LR, a JPEG at quality Q, a PNG of the noisy LR, or a JPEG re-saved as PNG. The clean
model (``default_x<s>.onnx``) and the photo model (``rdn_x<s>_photo.onnx``, fp32) upscale the
decoded pixels; ``server.imaging.input_kind`` measures the request's bytes and pixels and
chooses one.
Y-PSNR (shave = scale) against the HR crop, mean per kind:

    {"bench": "auto_choice", "scale": 2, "kind": "jpeg:50", "clean_db": ..., "photo_db": ...,
     "auto_db": ..., "auto_chose": {"clean": n, "photo": m}, "gap_db": ..., "gain_db": ...}

``gap_db`` is auto minus the better of the two means (target: >= -0.05), ``gain_db`` auto minus
the clean model (target: >= +0.4 on jpeg:50 and noise:10). A last line has the features' cost
per megapixel and the targets' verdict. ``--per-image`` adds every image's features and scores
(what the thresholds were set from).

    python -m tests.bench.auto_choice --data ../shared/data/SunHays80 --every 16 --crop 256
    python -m tests.bench.auto_choice --data ../shared/data/BSDS200 --every 5 --start 2 \\
        --crop 160 [--scales 2 4] [--limit N] [--kinds clean jpeg:50 ...] [--per-image]

(the first: the 5 SunHays80 photos held out from training, 2.5 min on 2 shared cores; the
second: 40 BSDS200 photos, 6 min; docs/models.md, "Choosing the model per input").
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from rdn.degradations import add_gaussian_noise
from rdn.imaging import downscale, list_images, modcrop, read_rgb
from rdn.metrics import psnr_y
from server.imaging import input_kind
from tests.bench.common import REPO, emit, emit_checked, setup_logging

BENCH = "auto_choice"
DEFAULT_KINDS = (
    "clean",
    "jpeg:90",
    "jpeg:75",
    "jpeg:50",
    "jpeg:30",
    "noise:5",
    "noise:10",
    "noise:15",
    "jpeg-png:75",
)
GAP_TARGET_DB = -0.05  # auto at most 0.05 dB below the better model, every kind
GAIN_TARGET_DB = 0.4  # auto at least this much above the clean model on GAIN_KINDS
GAIN_KINDS = ("jpeg:50", "noise:10")
COST_SIDE = 1024  # pixels: the side of the 1-megapixel input whose features are timed
COST_REPEATS = 15

log = logging.getLogger("bench")


@dataclass(frozen=True)
class InputKind:
    """One kind of request: ``clean``, ``jpeg:Q``, ``noise:S`` or ``jpeg-png:Q``."""

    name: str
    family: str
    value: float

    @classmethod
    def parse(cls, text: str) -> InputKind:
        family, _, value = text.partition(":")
        if family == "clean" and not value:
            return cls(text, family, 0.0)
        if family in ("jpeg", "noise", "jpeg-png") and value:
            return cls(text, family, float(value))
        raise argparse.ArgumentTypeError(f"kind {text!r}: clean, jpeg:Q, noise:S or jpeg-png:Q")

    def request(self, lr: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        """The file a user would send for the clean LR ``lr``, and its decoded pixels."""
        if self.family == "clean":
            return _encode(lr, ".png"), lr
        if self.family == "noise":
            noisy = add_gaussian_noise(lr, self.value, rng)
            return _encode(noisy, ".png"), noisy
        data = _encode(lr, ".jpg", int(self.value))
        pixels = _decode(data)
        if self.family == "jpeg-png":
            return _encode(pixels, ".png"), pixels
        return data, pixels


def _encode(rgb: np.ndarray, ext: str, quality: int = 95) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    assert ok, f"encoding {ext} failed"
    return data.tobytes()


def _decode(data: bytes) -> np.ndarray:
    """Pixels as the server decodes them (OpenCV, RGB)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[:, :, ::-1])


class Model:
    """An fp32 ONNX model on the CPU that upscales uint8 RGB as ``rdn-eval --onnx`` does."""

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.seconds = 0.0
        self.lr_pixels = 0
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        key = hashlib.sha1(lr.tobytes() + str(lr.shape).encode()).digest()
        if key not in self._cache:  # a JPEG re-saved as PNG has the JPEG's pixels
            x = (lr.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
            start = time.perf_counter()
            (y,) = self.session.run(None, {self.input: x})
            self.seconds += time.perf_counter() - start
            self.lr_pixels += lr.shape[0] * lr.shape[1]
            sr = (np.clip(y[0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
            self._cache[key] = sr
        return self._cache[key]

    def forget(self) -> None:
        """Drop the outputs kept for the last image's kinds."""
        self._cache.clear()


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """A centred crop of at most ``side`` x ``side`` pixels."""
    h, w = image.shape[:2]
    ch, cw = min(side, h), min(side, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def photos(folders: Sequence[Path], every: int, start: int, limit: int | None) -> list[Path]:
    """Every ``every``-th image of each folder (sorted) from ``start``, at most ``limit`` each."""
    chosen = []
    for folder in folders:
        try:
            paths = list_images(folder)[start::every]
        except FileNotFoundError as e:
            raise SystemExit(
                f"{e}; the held-out photos are also --data ../shared/data/SunHays80 --every 16"
            ) from e
        chosen += paths[:limit] if limit else paths
    if not chosen:
        raise SystemExit(f"no images in {', '.join(map(str, folders))}")
    return chosen


def feature_cost_ms(image: np.ndarray) -> float:
    """Median ms of ``measure`` on a 1024x1024 input made from ``image`` (as a JPEG request)."""
    big = cv2.resize(image, (COST_SIDE, COST_SIDE), interpolation=cv2.INTER_CUBIC)
    data = _encode(big, ".jpg", 75)
    pixels = _decode(data)
    times = []
    for _ in range(COST_REPEATS):
        start = time.perf_counter()
        input_kind.measure(data, pixels)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_scale(
    scale: int, paths: list[Path], kinds: list[InputKind], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-kind records at one scale, and the models' ms per LR megapixel."""
    clean = Model(args.models / f"default_x{scale}.onnx", args.threads)
    photo = Model(args.models / f"rdn_x{scale}_photo.onnx", args.threads)
    rows: dict[str, list[dict[str, Any]]] = {kind.name: [] for kind in kinds}
    for index, path in enumerate(paths):
        clean.forget()
        photo.forget()
        hr = modcrop(centre_crop(read_rgb(path), args.crop * scale), scale)
        lr = downscale(hr, scale)
        for kind in kinds:
            data, pixels = kind.request(lr, np.random.default_rng([args.seed, index]))
            features = input_kind.measure(data, pixels)
            choice = input_kind.choose(features, scale)
            clean_db = psnr_y(clean(pixels), hr, shave=scale)
            photo_db = psnr_y(photo(pixels), hr, shave=scale)
            rows[kind.name].append(
                {
                    "image": path.name,
                    "clean_db": clean_db,
                    "photo_db": photo_db,
                    "auto": choice.kind,
                    "reason": choice.reason,
                    "jpeg_quality": features.jpeg.quality if features.jpeg else None,
                    "noise_sigma": features.noise_sigma,
                    "detail": features.detail,
                    "blockiness": features.blockiness,
                }
            )
        log.info("x%d %d/%d %s", scale, index + 1, len(paths), path.name)
    records = [summarise(scale, name, images, args.per_image) for name, images in rows.items()]
    speed = {
        f"{model.path.stem}_ms_per_lr_mp": 1000 * model.seconds / (model.lr_pixels / 1e6)
        for model in (clean, photo)
    }
    return records, speed


def summarise(
    scale: int, kind: str, images: list[dict[str, Any]], per_image: bool
) -> dict[str, Any]:
    """The table row of one scale and kind."""
    clean_db = float(np.mean([r["clean_db"] for r in images]))
    photo_db = float(np.mean([r["photo_db"] for r in images]))
    auto_db = float(np.mean([r[f"{r['auto']}_db"] for r in images]))
    record: dict[str, Any] = {
        "bench": BENCH,
        "scale": scale,
        "kind": kind,
        "images": len(images),
        "clean_db": round(clean_db, 3),
        "photo_db": round(photo_db, 3),
        "auto_db": round(auto_db, 3),
        "auto_chose": {k: sum(r["auto"] == k for r in images) for k in ("clean", "photo")},
        "gap_db": round(auto_db - max(clean_db, photo_db), 3),
        "gain_db": round(auto_db - clean_db, 3),
    }
    if per_image:
        record["per_image"] = images
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        help="folder of HR photos, repeatable (default: runs/data/val, the 5 held-out "
        "SunHays80 photos)",
    )
    parser.add_argument("--every", type=int, default=1, help="every N-th image of each folder")
    parser.add_argument("--start", type=int, default=0, help="index of the first image taken")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per folder")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4], choices=(2, 4))
    parser.add_argument("--crop", type=int, default=192, help="LR side of the centred crop")
    parser.add_argument(
        "--kinds", type=InputKind.parse, nargs="+", default=None, help="default: issue #25's nine"
    )
    parser.add_argument("--models", type=Path, default=REPO / "server" / "models")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument("--per-image", action="store_true", help="add every image's figures")
    args = parser.parse_args(argv)
    args.data = args.data or [REPO / "runs" / "data" / "val"]
    args.kinds = args.kinds or [InputKind.parse(k) for k in DEFAULT_KINDS]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    paths = photos(args.data, args.every, args.start, args.limit)
    log.info(
        "%d photos, crops of %d LR px, kinds %s",
        len(paths),
        args.crop,
        [k.name for k in args.kinds],
    )
    missed: list[str] = []
    speeds: dict[str, float] = {}
    for scale in args.scales:
        records, speed = run_scale(scale, paths, args.kinds, args)
        speeds.update(speed)
        for record in records:
            emit(record)
            where = f"x{scale} {record['kind']}"
            if record["gap_db"] < GAP_TARGET_DB:
                missed.append(f"{where}: gap {record['gap_db']:+.3f} dB")
            if record["kind"] in GAIN_KINDS and record["gain_db"] < GAIN_TARGET_DB:
                best = max(record["clean_db"], record["photo_db"]) - record["clean_db"]
                missed.append(
                    f"{where}: gain {record['gain_db']:+.3f} dB (the photo model's own {best:+.3f})"
                )
    cost_ms = feature_cost_ms(read_rgb(paths[0]))
    summary = {
        "bench": BENCH,
        "photos": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths],
        "crop_lr": args.crop,
        "seed": args.seed,
        "threads": args.threads,
        "feature_ms_per_mp": round(cost_ms / (COST_SIDE * COST_SIDE / 1e6), 2),
        **{k: round(v) for k, v in speeds.items()},
        "targets": f"gap_db >= {GAP_TARGET_DB} every kind, gain_db >= +{GAIN_TARGET_DB} on "
        + " and ".join(GAIN_KINDS),
        "targets_missed": missed,
    }
    return emit_checked(summary, not missed)


if __name__ == "__main__":
    raise SystemExit(main())
