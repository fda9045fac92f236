"""The int8 twin against its float model in onnxruntime, on the same input (target >= 2.0).

Both engines are opened as the server opens them (``server.core.engine.Engine``, CPU, the same
threads) and run the same inputs, passes alternating: a whole 256x256 photograph (what the
CPU plan runs for a photo that fits one tile) and a batch of 8 tiles of 80x80 (the fixed
grid). ratio = float median / int8 median, per input; the target holds for each. The CPU's
int8-relevant flags are printed beside the figures: integer convolutions run on VNNI
(AVX-512 or AVX) or AMX where the CPU has them, on plain AVX2 multiply-adds elsewhere.

    python -m tests.bench.int8_vs_fp32 [--quick] [--model FLOAT.onnx] [--int8-model INT8.onnx]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from server.core.engine import Engine
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    cpu_flags,
    emit_checked,
    load_engine,
    photo,
    setup_logging,
)

BENCH = "int8_vs_fp32"
TARGET_RATIO = 2.0
IMAGE_SIZE = 256  # LR pixels per side of the whole-image input
GRID_TILE, GRID_BATCH = 80, 8  # the fixed grid's tile (64 + 2 x 8 context) and batch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--int8-model", type=Path, help="default: the --model file's _int8 twin")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes of each")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    return args


def twin_of(model: Path) -> Path:
    """The int8 twin shipped beside a float model: default_x2.onnx -> rdn_x2_int8.onnx."""
    scale = model.stem.rsplit("_x", 1)[-1]
    for name in (f"{model.stem}_int8.onnx", f"rdn_x{scale}_int8.onnx"):
        if (model.parent / name).is_file():
            return model.parent / name
    raise FileNotFoundError(f"no int8 twin of {model} beside it; pass --int8-model")


def inputs() -> dict[str, np.ndarray]:
    image = photo(IMAGE_SIZE).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    tops = rng.integers(0, IMAGE_SIZE - GRID_TILE, size=(GRID_BATCH, 2))
    grid = np.stack([image[0, :, y : y + GRID_TILE, x : x + GRID_TILE] for y, x in tops])
    return {f"1x{IMAGE_SIZE}x{IMAGE_SIZE}": image, f"{GRID_BATCH}x{GRID_TILE}x{GRID_TILE}": grid}


def timed(engine: Engine, batch: np.ndarray) -> float:
    start = time.perf_counter()
    engine.run(batch)
    return time.perf_counter() - start


def run(args: argparse.Namespace, model: Path) -> int:
    try:
        int8_path = args.int8_model or twin_of(model)
    except FileNotFoundError as e:
        return emit_checked({"bench": BENCH, "float32_model": str(model), "error": str(e)}, False)
    engines = {"float32": load_engine(model, args), "int8": load_engine(int8_path, args)}
    failed = 0
    for label, batch in inputs().items():
        outputs = {name: engine.run(batch) for name, engine in engines.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                times[name].append(timed(engine, batch))
        fp32_ms, int8_ms = (1e3 * statistics.median(times[n]) for n in ("float32", "int8"))
        diff = np.abs(outputs["float32"] - outputs["int8"])
        ratio = fp32_ms / int8_ms
        failed |= emit_checked(
            {
                "bench": BENCH,
                "input": label,
                "float32_model": str(model),
                "int8_model": str(int8_path),
                "float32_ms": round(fp32_ms, 2),
                "int8_ms": round(int8_ms, 2),
                "ratio": round(ratio, 3),
                "target_ratio": TARGET_RATIO,
                "mean_abs_diff_levels": round(float(diff.mean()) * 255, 3),
                "cpu_flags": cpu_flags(),
                "threads": args.threads or "onnxruntime default",
            },
            ratio >= TARGET_RATIO,
        )
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    with bench_model(args.model) as model:
        return run(args, model)


if __name__ == "__main__":
    raise SystemExit(main())
