"""A lone request's latency over the raw engine time of its tiles (target ratio <= 1.15).

A real gRPC server runs in this process; one client sends one 128x128 PNG at a time (the
server is otherwise idle). The baseline is the server's engine running that image's tiles in
the batches the batcher makes for a lone request (max_batch at a time). Request and engine
measurements alternate so that drifts of a shared machine hit both alike; medians of N.

    python -m tests.bench.idle_latency [--quick] [--model M] [--size 128] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc

from server.app import build_server
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.bench.common import (
    add_common_arguments,
    batches,
    bench_model,
    emit_checked,
    encode_png,
    engine_seconds,
    image_tiles,
    median,
    photo,
    server_config,
    setup_logging,
)

BENCH = "idle_latency"
TARGET_RATIO = 1.15
WARM_ROUNDS = 3
RPC_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=128, help="LR image side, pixels")
    parser.add_argument("--repeats", type=int, default=None, help="measured requests")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 30
    return args


async def run(args: argparse.Namespace) -> int:
    with bench_model(args.model) as model:
        running = await build_server(server_config(model, args))
        try:
            engine = running.engine
            rgb = photo(args.size)
            calls = batches(image_tiles(rgb, args.tile, args.pad), args.max_batch)
            request = upscale_pb2.UpscaleRequest(
                encoded=encode_png(rgb), output_format=upscale_pb2.OUTPUT_FORMAT_PNG
            )
            latency: list[float] = []
            engine_time: list[float] = []
            server_queue: list[float] = []
            server_compute: list[float] = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = upscale_pb2_grpc.UpscalerStub(channel)
                for i in range(WARM_ROUNDS + args.repeats):
                    measured = i >= WARM_ROUNDS
                    if i % 2:  # alternate which goes first
                        engine_s = engine_seconds(engine, calls)
                    start = time.perf_counter()
                    response = await stub.Upscale(request, timeout=RPC_TIMEOUT_S)
                    request_s = time.perf_counter() - start
                    if not i % 2:
                        engine_s = engine_seconds(engine, calls)
                    if measured:
                        latency.append(request_s)
                        engine_time.append(engine_s)
                        server_queue.append(response.timings.queue_seconds)
                        server_compute.append(response.timings.compute_seconds)
        finally:
            await running.stop(1.0)
    ratio = median(latency) / median(engine_time)
    return emit_checked(
        {
            "bench": BENCH,
            "ratio": round(ratio, 4),
            "latency_ms": round(1e3 * median(latency), 2),
            "engine_ms": round(1e3 * median(engine_time), 2),
            "target_ratio": TARGET_RATIO,
            "image": f"{args.size}x{args.size}",
            "tiles": sum(len(c) for c in calls),
            "batch_sizes": [len(c) for c in calls],
            "server_queue_ms": round(1e3 * median(server_queue), 3),
            "server_compute_ms": round(1e3 * median(server_compute), 2),
            "repeats": args.repeats,
            "provider": engine.active_provider,
            "quick": args.quick,
        },
        ratio <= TARGET_RATIO,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
