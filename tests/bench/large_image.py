"""One 4096x4096 image through UpscaleStream of a real ``rdn-serve`` process: time and memory.

The server runs as a subprocess with the benchmark's tiling and batching, so its resident
memory is its own: VmRSS from /proc/PID/status once it is serving (model loaded, warmed up),
VmHWM (the peak resident set since it started) after the image is done. Target: peak under
1.5 GiB. The input is a random but smooth RGB PNG (noise of two octaves upscaled bicubically)
made by the benchmark; it goes up and the x2 PNG comes back through ``UpscaleClient`` with
``stream=True``. ``--quick`` uses 1024x1024.

Before sending, the benchmark times one engine call of the server's tile shape in this process
and logs an ETA: a 4096x4096 image is 4096 tiles, minutes on a 2-core CPU.

    python -m tests.bench.large_image [--quick] [--model M] [--size 4096]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import cv2
import numpy as np

from server.client import RetryPolicy, UpscaleClient
from server.config import BatcherConfig, EngineConfig, LimitsConfig
from server.engine import Engine
from server.tiling import plan_tiles
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    emit_checked,
    encode_png,
    log,
    proc_status_mib,
    serve_process,
    setup_logging,
    stop_server,
)

BENCH = "large_image"
TARGET_PEAK_MIB = 1536  # 1.5 GiB
OCTAVES = (256, 32)  # noise grid spacing in pixels: large blobs, then finer texture
ETA_RUNS = 2  # engine calls timed for the ETA (best of)
MIN_TIMEOUT_S = 600.0
TIMEOUT_PER_ETA = 10.0  # the call may take this many times the ETA before it is abandoned


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=None, help="LR side (default 4096; quick 1024)")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 1024 if args.quick else 4096
    return args


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A size x size x 3 uint8 image of smooth random colour: bicubically upscaled noise."""
    rng = np.random.default_rng(seed)
    total = np.zeros((size, size, 3), np.float32)
    for spacing, weight in zip(OCTAVES, (0.75, 0.25), strict=True):
        cells = max(2, size // spacing)
        noise = rng.random((cells, cells, 3), dtype=np.float32)
        total += weight * cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.rint(255 * total), 0, 255).astype(np.uint8)


def eta_seconds(model: Path, args: argparse.Namespace, tiles: int) -> float:
    """Seconds the server's engine should need for ``tiles`` tiles, from calls timed here."""
    engine = Engine(model, EngineConfig(intra_op_threads=args.threads))
    side = args.tile + 2 * args.pad
    batch = np.random.default_rng(0).random((args.max_batch, 3, side, side), dtype=np.float32)
    engine.run(batch)  # warm
    best = math.inf
    for _ in range(ETA_RUNS):
        start = time.perf_counter()
        engine.run(batch)
        best = min(best, time.perf_counter() - start)
    return best * tiles / args.max_batch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    rgb = smooth_image(args.size)
    png = encode_png(rgb)
    tiles = plan_tiles(args.size, args.size, args.tile, args.pad).count
    extra = [
        "--max-queue-tiles", str(max(BatcherConfig.max_queue_tiles, tiles)),
        "--max-request-bytes", str(max(LimitsConfig.max_request_bytes, len(png))),
        "--max-pixels", str(max(LimitsConfig.max_pixels, args.size**2)),
    ]  # fmt: skip
    with bench_model(args.model) as model:
        eta = eta_seconds(model, args, tiles)
        log.info(
            "%s: %dx%d LR (%.1f Mpix, %d tiles, %.1f MB PNG); engine ETA ~%.0f s on this machine",
            BENCH, args.size, args.size, args.size**2 / 1e6, tiles, len(png) / 1e6, eta,
        )  # fmt: skip
        with serve_process(model, args, extra) as (process, port):
            rss_before = proc_status_mib(process.pid, "VmRSS")
            client = UpscaleClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1))
            with client:
                start = time.perf_counter()
                result = client.upscale(
                    png, "png", timeout=max(MIN_TIMEOUT_S, TIMEOUT_PER_ETA * eta), stream=True
                )
                seconds = time.perf_counter() - start
            rss_after = proc_status_mib(process.pid, "VmRSS")
            peak = proc_status_mib(process.pid, "VmHWM")
            exit_code = stop_server(process)
    expected = (result.scale * args.size,) * 2
    if (result.width, result.height) != expected:
        raise RuntimeError(f"server answered {result.width}x{result.height}, expected {expected}")
    status = emit_checked(
        {
            "bench": BENCH,
            "image": f"{args.size}x{args.size}",
            "scale": result.scale,
            "seconds": round(seconds, 2),
            "server_peak_rss_mib": round(peak, 1),
            "target_peak_mib": TARGET_PEAK_MIB,
            "server_rss_before_mib": round(rss_before, 1),
            "server_rss_after_mib": round(rss_after, 1),
            "eta_s": round(eta, 1),
            "server_queue_s": round(result.queue_seconds, 2),
            "server_compute_s": round(result.compute_seconds, 2),
            "server_total_s": round(result.total_seconds, 2),
            "tiles": result.tiles,
            "input_bytes": len(png),
            "output_bytes": len(result.image),
            "streamed": result.streamed,
            "sigterm_exit_code": exit_code,
            "quick": args.quick,
        },
        peak <= TARGET_PEAK_MIB,
    )
    return status if exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
