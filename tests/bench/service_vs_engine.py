"""Service throughput over the raw engine's on the same tiles (target ratio >= 0.85 at 8 clients).

A real gRPC server runs in this process (``server.app.build_server`` on 127.0.0.1:0); C
concurrent asyncio clients send the same 256x256 PNG for a fixed number of requests. The
baseline is the server's own engine running that image's tiles back to back in batches of
``max_batch`` (what a perfect server with free decode, encode and transport would reach), timed
just before and just after the service run so slow drifts of a shared machine cancel out.

    python -m tests.bench.service_vs_engine [--quick] [--model M] [--concurrency 1,8,32]

One JSON line per concurrency: {"bench": "service_vs_engine", "concurrency": 8, "ratio": ...,
"service_mpix_s": ..., "engine_mpix_s": ...} in output megapixels per second, with the
client-observed latency under that load ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms").
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from server.app import RunningServer, build_server
from tests.bench.common import (
    add_common_arguments,
    batches,
    bench_model,
    drive,
    emit,
    emit_checked,
    encode_png,
    engine_seconds,
    image_tiles,
    mpix,
    percentile_ms,
    photo,
    server_config,
    setup_logging,
)

BENCH = "service_vs_engine"
IMAGE_SIZE = 256  # LR pixels per side
TARGET_RATIO = 0.85  # at TARGET_CONCURRENCY clients
TARGET_CONCURRENCY = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--concurrency", default=None, help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per level")
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = "8" if args.quick else "1,8,32"
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


async def measure(
    running: RunningServer, args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    engine, batcher = running.engine, running.batcher
    rgb = photo(IMAGE_SIZE)
    png = encode_png(rgb)
    calls = batches(image_tiles(rgb, args.tile, args.pad), args.max_batch)
    out_pixels = (engine.scale * IMAGE_SIZE) ** 2
    engine_images = 4 if args.quick else 8
    requests = args.requests or max(16 if args.quick else 64, 2 * concurrency)

    def engine_run() -> float:
        return sum(engine_seconds(engine, calls) for _ in range(engine_images))

    engine_before = await asyncio.to_thread(engine_run)
    await drive(running.port, png, concurrency, concurrency)  # every client once: warm
    calls_before, tiles_before = batcher.engine_calls, batcher.tiles_computed
    busy_before = batcher.engine_seconds
    elapsed, latencies = await drive(running.port, png, requests, concurrency)
    engine_calls = batcher.engine_calls - calls_before
    tiles = batcher.tiles_computed - tiles_before
    busy = batcher.engine_seconds - busy_before
    engine_after = await asyncio.to_thread(engine_run)

    service = mpix(requests * out_pixels, elapsed)
    engine_rate = mpix(2 * engine_images * out_pixels, engine_before + engine_after)
    return {
        "bench": BENCH,
        "concurrency": concurrency,
        "ratio": round(service / engine_rate, 4),
        "service_mpix_s": service,
        "engine_mpix_s": engine_rate,
        "target_ratio": TARGET_RATIO if concurrency == TARGET_CONCURRENCY else None,
        "requests": requests,
        "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "tiles_per_image": sum(len(c) for c in calls),
        "mean_batch": round(tiles / engine_calls, 2) if engine_calls else None,
        "engine_busy": round(busy / elapsed, 4),
        "latency_p50_ms": percentile_ms(latencies, 50),  # client-observed, under this load
        "latency_p95_ms": percentile_ms(latencies, 95),
        "latency_p99_ms": percentile_ms(latencies, 99),  # near the max below ~100 requests
        "engine_image_ms_before": round(1e3 * engine_before / engine_images, 1),
        "engine_image_ms_after": round(1e3 * engine_after / engine_images, 1),
        "provider": engine.active_provider,
        "max_batch": args.max_batch,
        "quick": args.quick,
    }


async def run(args: argparse.Namespace) -> int:
    """Every level in turn; the exit status is that of the target level (8 clients)."""
    status = 0
    with bench_model(args.model) as model:
        running = await build_server(server_config(model, args))
        try:
            for concurrency in args.levels:
                record = await measure(running, args, concurrency)
                if concurrency == TARGET_CONCURRENCY:
                    status = emit_checked(record, record["ratio"] >= TARGET_RATIO)
                else:
                    emit(record)
        finally:
            await running.stop(1.0)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
