"""What ``model=auto`` costs a request: the service's time per image with ``model=auto``
against the same images naming their model, side by side in one run (target: at most 3 %
more, issue #25).

A real server in this process (tests/background.py) serves the shipped float x2 models,
``rdn_x2`` (clean) and ``rdn_x2_photo`` (fp32 both: same architecture, same compute, so the
difference is the choice itself: measuring the input's JPEG tables, noise, detail and
blocking). Each photo goes once as its LR PNG and once as a JPEG of quality 75, one client;
``auto`` and ``named`` passes alternate, so the drift of a shared machine falls on both. The
named pass names the model that auto chose for that input, so both compute the same model.

    python -m tests.bench.auto_choice_cost [--rounds N] [--quick] [--photos DIR ...]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from server.client import SizeOptions, UpscaleClient
from server.config import EngineConfig, ServerConfig
from server.models import MODELS_DIR
from tests.background import BackgroundServer
from tests.bench.common import add_common_arguments, cpu_flags, emit_checked, setup_logging
from tests.bench.service_vs_whole_image import photos
from tests.server.loopback import NO_RETRY

BENCH = "auto_choice_cost"
TARGET_OVERHEAD = 0.03
MODELS = {"default_x2.onnx": "rdn_x2", "rdn_x2_photo.onnx": "rdn_x2_photo"}
CALL_TIMEOUT_S = 600.0


def inputs(folders: list[Path] | None, limit: int) -> list[bytes]:
    """Each photo's x2 LR as PNG and as JPEG 75 (what users send)."""
    out = []
    for rgb in photos(folders)[:limit]:
        h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
        lr = Image.fromarray(rgb[:h, :w]).resize((w // 2, h // 2), Image.BICUBIC)
        for fmt, save in (("PNG", {}), ("JPEG", {"quality": 75})):
            buffer = io.BytesIO()
            lr.save(buffer, fmt, **save)
            out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None, help="passes of each kind (3)")
    parser.add_argument("--photos", type=Path, nargs="*", default=None, help="photo folders")
    parser.add_argument("--limit", type=int, default=12, help="photos used at most")
    args = parser.parse_args(argv)
    setup_logging()
    rounds = args.rounds or (1 if args.quick else 3)
    data = inputs(args.photos, 4 if args.quick else args.limit)
    with tempfile.TemporaryDirectory() as folder:
        for file in MODELS:
            shutil.copy(MODELS_DIR / file, Path(folder) / file)
        config = ServerConfig(
            model_dir=Path(folder),
            host="127.0.0.1",
            port=0,
            precision="fp32",
            engine=EngineConfig(intra_op_threads=args.threads),
        )
        with (
            BackgroundServer(config) as bg,
            UpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as client,
        ):
            chosen = [client.upscale(d, timeout=CALL_TIMEOUT_S).model for d in data]  # warm-up
            times: dict[str, list[float]] = {"auto": [], "named": []}
            for _ in range(rounds):
                for mode in ("auto", "named"):
                    for image, model in zip(data, chosen, strict=True):
                        options = SizeOptions(model=model if mode == "named" else "auto")
                        start = time.perf_counter()
                        client.upscale(image, timeout=CALL_TIMEOUT_S, options=options)
                        times[mode].append(time.perf_counter() - start)
    auto, named = float(np.sum(times["auto"])), float(np.sum(times["named"]))
    overhead = auto / named - 1
    record = {
        "bench": BENCH,
        "images": len(data),
        "rounds": rounds,
        "photo_model_chosen": sum(m == "rdn_x2_photo" for m in chosen),
        "auto_s_per_image": round(auto / len(times["auto"]), 4),
        "named_s_per_image": round(named / len(times["named"]), 4),
        "overhead": round(overhead, 4),
        "target_overhead": TARGET_OVERHEAD,
        "cpu_flags": cpu_flags(),
    }
    return emit_checked(record, overhead <= TARGET_OVERHEAD)


if __name__ == "__main__":
    sys.exit(main())
