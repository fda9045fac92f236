"""Service throughput over the raw engine's on the same tiles (target ratio >= 0.85 at 8 clients).

A real gRPC server runs in this process (``server.main.build_server`` on 127.0.0.1:0); C
concurrent asyncio clients send the same 256x256 PNG for a fixed number of requests. The
baseline is the server's own engine running that image's tiles back to back in batches of
``max_batch`` (what a perfect server with free decode, encode and transport would reach), timed
just before and just after the service run so slow drifts of a shared machine cancel out.

    python -m tests.bench.service_vs_engine [--quick] [--model M] [--concurrency 1,8,32]

One JSON line per concurrency: {"bench": "service_vs_engine", "concurrency": 8, "ratio": ...,
"service_mpix_s": ..., "engine_mpix_s": ...} in output megapixels per second.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc

from server.main import RunningServer, build_server
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.bench.common import (
    add_common_arguments,
    batches,
    bench_model,
    emit,
    encode_png,
    engine_seconds,
    image_tiles,
    median,
    mpix,
    photo,
    server_config,
    setup_logging,
)

BENCH = "service_vs_engine"
IMAGE_SIZE = 256  # LR pixels per side
TARGET_RATIO = 0.85  # at 8 clients
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20)]
RPC_TIMEOUT_S = 600.0


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


async def drive(
    port: int, png: bytes, requests: int, concurrency: int
) -> tuple[float, list[float]]:
    """``requests`` Upscale calls from ``concurrency`` clients: (wall seconds, latencies)."""
    latencies: list[float] = []
    remaining = iter(range(requests))
    request = upscale_pb2.UpscaleRequest(encoded=png, output_format=upscale_pb2.OUTPUT_FORMAT_PNG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = upscale_pb2_grpc.UpscalerStub(channel)

        async def client() -> None:
            for _ in remaining:
                start = time.perf_counter()
                response = await stub.Upscale(request, timeout=RPC_TIMEOUT_S)
                latencies.append(time.perf_counter() - start)
                if not response.image:
                    raise RuntimeError("server answered without an image")

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


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
    latencies.sort()
    return {
        "bench": BENCH,
        "concurrency": concurrency,
        "ratio": round(service / engine_rate, 4),
        "service_mpix_s": service,
        "engine_mpix_s": engine_rate,
        "target_ratio": TARGET_RATIO if concurrency == 8 else None,
        "requests": requests,
        "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "tiles_per_image": sum(len(c) for c in calls),
        "mean_batch": round(tiles / engine_calls, 2) if engine_calls else None,
        "engine_busy": round(busy / elapsed, 4),
        "latency_p50_ms": round(1e3 * median(latencies), 1),
        "latency_p95_ms": round(1e3 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "engine_image_ms_before": round(1e3 * engine_before / engine_images, 1),
        "engine_image_ms_after": round(1e3 * engine_after / engine_images, 1),
        "provider": engine.active_provider,
        "max_batch": args.max_batch,
        "quick": args.quick,
    }


async def run(args: argparse.Namespace) -> None:
    with bench_model(args.model) as model:
        running = await build_server(server_config(model, args))
        try:
            for concurrency in args.levels:
                emit(await measure(running, args, concurrency))
        finally:
            await running.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
