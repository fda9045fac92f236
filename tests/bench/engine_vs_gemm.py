"""Achieved GFLOP/s of the served model in onnxruntime over a float32 GEMM's (target >= 0.8).

The work is the server's own engine call: ``max_batch`` tiles of ``tile + 2*pad`` LR pixels
square (8 x [3, 80, 80] by default) cut from a photograph. Its FLOPs are counted from the ONNX
graph (``common.conv_flops``: 2 per multiply-add by a non-zero Conv weight, at the shapes ONNX
shape inference gives for that input; nothing else is counted). The yardstick is numpy's float32
2048^3 matrix product on the same machine in the same run, best of several, measured before
and after the engine (the better of the two is used).

Every intra-op thread setting in ``--thread-options`` (0 = onnxruntime's default) gets its own
engine; timing rounds cycle through the engines so that a drift of a shared machine hits all
alike. The ratio is that of the best setting, which is reported with every setting's rate.

    python -m tests.bench.engine_vs_gemm [--quick] [--model M] [--thread-options 0,1,2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import onnx

from server.config import EngineConfig
from server.core.engine import Engine
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    conv_flops,
    emit_checked,
    gemm_gflops,
    image_tiles,
    photo,
    setup_logging,
)

BENCH = "engine_vs_gemm"
TARGET_RATIO = 0.8
GEMM_SIZE = 2048  # float32 GEMM of GEMM_SIZE^3, 2 * GEMM_SIZE^3 FLOPs
GEMM_REPEATS = 5
WARM_RUNS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per setting")
    parser.add_argument(
        "--thread-options",
        default=None,
        help="comma-separated intra-op thread counts to try (default: 0 and 1..CPU count)",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.thread_options is None:
        args.thread_options = ",".join(map(str, thread_options(os.cpu_count() or 1)))
    args.thread_counts = [int(t) for t in args.thread_options.split(",")]
    return args


def thread_options(cpus: int) -> list[int]:
    """0 (onnxruntime's default), 1, and every power of two up to ``cpus``, and ``cpus``."""
    counts = {0, 1, cpus}
    counts.update(2**k for k in range(1, int(math.log2(cpus)) + 1))
    return sorted(counts)


def tile_batch(batch: int, tile: int, pad: int) -> np.ndarray:
    """``batch`` tiles of a photograph, [batch, 3, tile + 2*pad, tile + 2*pad] float32."""
    side = tile * math.ceil(math.sqrt(batch))
    return image_tiles(photo(side), tile, pad)[:batch]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    with bench_model(args.model) as model:
        batch = tile_batch(args.max_batch, args.tile, args.pad)
        flops = conv_flops(onnx.load(str(model)), batch.shape)
        engines = {t: Engine(model, EngineConfig(intra_op_threads=t)) for t in args.thread_counts}
        gemm_before = gemm_gflops(GEMM_SIZE, GEMM_REPEATS)
        for engine in engines.values():
            for _ in range(WARM_RUNS):
                engine.run(batch)
        seconds: dict[int, list[float]] = {t: [] for t in engines}
        for _ in range(args.repeats):
            for threads, engine in engines.items():
                start = time.perf_counter()
                engine.run(batch)
                seconds[threads].append(time.perf_counter() - start)
        gemm_after = gemm_gflops(GEMM_SIZE, GEMM_REPEATS)
        provider = next(iter(engines.values())).active_provider
    rates = {t: flops / min(s) / 1e9 for t, s in seconds.items()}
    best = max(rates, key=rates.__getitem__)
    gemm = max(gemm_before, gemm_after)
    ratio = rates[best] / gemm
    return emit_checked(
        {
            "bench": BENCH,
            "ratio": round(ratio, 4),
            "engine_gflops": round(rates[best], 2),
            "gemm_gflops": round(gemm, 2),
            "flops_per_tile": flops // len(batch),
            "batch": len(batch),
            "tile": args.tile,
            "pad": args.pad,
            "tile_input": batch.shape[-1],
            "target_ratio": TARGET_RATIO,
            "threads": best,  # best intra-op setting (0 = onnxruntime's default)
            "engine_gflops_by_threads": {str(t): round(r, 2) for t, r in rates.items()},
            "engine_batch_ms_best": round(1e3 * min(seconds[best]), 2),
            "engine_batch_ms_median": round(1e3 * statistics.median(seconds[best]), 2),
            "gemm_gflops_before": round(gemm_before, 2),
            "gemm_gflops_after": round(gemm_after, 2),
            "gemm": f"numpy float32 {GEMM_SIZE}^3, best of {GEMM_REPEATS}",
            "flops_counted": "Conv only, 2 per multiply-add by a non-zero weight",
            "repeats": args.repeats,
            "provider": provider,
            "quick": args.quick,
        },
        ratio >= TARGET_RATIO,
    )


if __name__ == "__main__":
    raise SystemExit(main())
