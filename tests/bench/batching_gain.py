"""Throughput with cross-request tile batching over without it, under concurrency.

Two real gRPC servers run in this process (``server.app.build_server`` on 127.0.0.1:0), the
same model and settings except ``max_batch``: the benchmark's (8 by default) and 1. 8 asyncio
clients send the same 256x256 PNG to one server at a time; rounds alternate which server goes
first so that a drift of a shared machine hits both alike. The servers hold separate sessions
and only one is ever loaded. ratio = batched output Mpix/s over unbatched output Mpix/s.

    python -m tests.bench.batching_gain [--quick] [--model M] [--concurrency 8] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from server.app import RunningServer, build_server
from server.config import ServerConfig
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    drive,
    emit,
    encode_png,
    mpix,
    percentile_ms,
    photo,
    server_config,
    setup_logging,
)

BENCH = "batching_gain"
IMAGE_SIZE = 256  # LR pixels per side
UNBATCHED = 1


@dataclasses.dataclass
class Tally:
    """What one server did over all timed rounds."""

    seconds: float = 0.0
    requests: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    engine_calls: int = 0
    tiles: int = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight")
    parser.add_argument("--requests", type=int, default=None, help="requests per server per round")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (alternating)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = max(8 if args.quick else 32, args.concurrency)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 4
    if args.max_batch == UNBATCHED:
        parser.error(f"--max-batch must be more than {UNBATCHED} to compare batching with none")
    return args


def with_max_batch(config: ServerConfig, max_batch: int) -> ServerConfig:
    return dataclasses.replace(
        config, batcher=dataclasses.replace(config.batcher, max_batch=max_batch)
    )


async def timed_round(
    running: RunningServer, png: bytes, args: argparse.Namespace, tally: Tally
) -> None:
    calls, tiles = running.batcher.engine_calls, running.batcher.tiles_computed
    seconds, latencies = await drive(running.port, png, args.requests, args.concurrency)
    tally.seconds += seconds
    tally.requests += args.requests
    tally.latencies += latencies
    tally.engine_calls += running.batcher.engine_calls - calls
    tally.tiles += running.batcher.tiles_computed - tiles


def summary(tally: Tally, out_pixels: int) -> dict[str, Any]:
    return {
        "mpix_s": mpix(tally.requests * out_pixels, tally.seconds),
        "mean_batch": round(tally.tiles / tally.engine_calls, 2) if tally.engine_calls else None,
        "latency_p50_ms": percentile_ms(tally.latencies, 50),
        "latency_p99_ms": percentile_ms(tally.latencies, 99),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with bench_model(args.model) as model:
        config = server_config(model, args)
        sizes = (args.max_batch, UNBATCHED)
        servers = {size: await build_server(with_max_batch(config, size)) for size in sizes}
        try:
            png = encode_png(photo(IMAGE_SIZE))
            for running in servers.values():  # every client once: warm
                await drive(running.port, png, args.concurrency, args.concurrency)
            tallies = {size: Tally() for size in sizes}
            for r in range(args.rounds):
                for size in sizes if r % 2 == 0 else sizes[::-1]:
                    await timed_round(servers[size], png, args, tallies[size])
            scale = servers[UNBATCHED].engine.scale
            provider = servers[UNBATCHED].engine.active_provider
        finally:
            for running in servers.values():
                await running.stop(1.0)
    out_pixels = (scale * IMAGE_SIZE) ** 2
    batched = summary(tallies[args.max_batch], out_pixels)
    unbatched = summary(tallies[UNBATCHED], out_pixels)
    return {
        "bench": BENCH,
        "ratio": round(batched["mpix_s"] / unbatched["mpix_s"], 4),
        "max_batch": args.max_batch,
        "batched": batched,
        "unbatched": unbatched,
        "concurrency": args.concurrency,
        "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "requests_per_server": args.rounds * args.requests,
        "rounds": args.rounds,
        "provider": provider,
        "quick": args.quick,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    emit(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
