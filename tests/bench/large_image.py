"""One 4096x4096 image through UpscaleStream of a real ``rdn-serve`` process: time and memory.

The server runs as a subprocess with the benchmark's tiling and batching, so its resident
memory is its own: VmRSS from /proc/PID/status once it is serving (model loaded, warmed up),
VmHWM (the peak resident set since it started) after the image is done. Target: peak under
1.5 GiB. The input is a random but smooth RGB PNG (noise of two octaves upscaled bicubically)
made by the benchmark; it goes up and the x2 PNG comes back through ``UpscaleClient`` with
``stream=True``. ``--quick`` uses 1024x1024.

The second target is against the FLOP limit: before sending, the benchmark times engine calls
on one tile of the server's plan (the same engine and provider, in this process, best of
ETA_RUNS) and counts the model's conv FLOPs (``common.conv_flops``); the image's FLOPs over that
rate is the time the engine alone would need for the image's own pixels, with no tiling,
decoding, encoding or transport. Target: wall time <= 1.3x that limit.

    python -m tests.bench.large_image [--quick] [--model M] [--size 4096]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np
import onnx

from server.client import RetryPolicy, UpscaleClient
from server.config import BatcherConfig, EngineConfig, LimitsConfig, TilingConfig
from server.core.engine import Engine
from server.core.planner import make_planner
from server.core.tiling import TilePlan
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    conv_flops,
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
TARGET_FLOP_LIMIT_RATIO = 1.3  # wall time over (image FLOPs / measured engine FLOP rate)
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


@dataclass(frozen=True)
class EngineRate:
    """The engine's measured rate on one tile of the plan, and what it implies for the image."""

    provider: str
    tile_shape: tuple[int, int]
    tile_seconds: float  # best of ETA_RUNS engine calls on one tile
    gflop_s: float  # conv FLOPs of one tile / tile_seconds
    image_gflop: float  # conv FLOPs of the whole image at its own size (no tiles)

    @property
    def limit_seconds(self) -> float:
        """The FLOP limit: the image's FLOPs at the measured rate."""
        return self.image_gflop / self.gflop_s


def engine_rate(engine: Engine, plan: TilePlan) -> EngineRate:
    """Time ``engine`` (set up as the server's) on one tile of ``plan``, count FLOPs."""
    h, w = plan.input_shape
    tile = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    engine.run(tile)  # warm
    best = math.inf
    for _ in range(ETA_RUNS):
        start = time.perf_counter()
        engine.run(tile)
        best = min(best, time.perf_counter() - start)
    proto = onnx.load(str(engine.model_path))
    tile_flops = conv_flops(proto, [1, 3, h, w])
    image_flops = tile_flops / (h * w) * plan.height * plan.width  # convs are per pixel
    return EngineRate(
        engine.active_provider, (h, w), best, tile_flops / best / 1e9, image_flops / 1e9
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    rgb = smooth_image(args.size)
    png = encode_png(rgb)
    with bench_model(args.model) as model:
        engine = Engine(model, EngineConfig(intra_op_threads=args.threads))
        planner = make_planner(TilingConfig(tile=args.tile, pad=args.pad), engine.active_provider)
        plan = planner.plan(args.size, args.size)
        rate = engine_rate(engine, plan)
        del engine  # the server is its own process; this session's memory is not measured
        extra = [
            "--max-queue-tiles", str(max(BatcherConfig.max_queue_tiles, planner.units(plan))),
            "--max-request-bytes", str(max(LimitsConfig.max_request_bytes, len(png))),
            "--max-pixels", str(max(LimitsConfig.max_pixels, args.size**2)),
        ]  # fmt: skip
        eta = rate.tile_seconds * plan.count
        log.info(
            "%s: %dx%d LR (%.1f Mpix, %d tiles of %s, %.1f MB PNG); engine %.1f GFLOP/s, "
            "FLOP limit %.0f s, ETA ~%.0f s",
            BENCH, args.size, args.size, args.size**2 / 1e6, plan.count, plan.input_shape,
            len(png) / 1e6, rate.gflop_s, rate.limit_seconds, eta,
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
            "provider": rate.provider,
            "tile_shape": list(rate.tile_shape),
            "plan_tiles": plan.count,
            "plan_waste": round(plan.waste, 3),
            "engine_gflop_s": round(rate.gflop_s, 1),
            "image_gflop": round(rate.image_gflop, 1),
            "flop_limit_s": round(rate.limit_seconds, 2),
            "flop_limit_ratio": round(seconds / rate.limit_seconds, 3),
            "target_flop_limit_ratio": TARGET_FLOP_LIMIT_RATIO,
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
        peak <= TARGET_PEAK_MIB and seconds <= TARGET_FLOP_LIMIT_RATIO * rate.limit_seconds,
    )
    return status if exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
