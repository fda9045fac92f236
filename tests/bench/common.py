"""Shared pieces of the benchmarks: arguments, the model to run, test images, timing, output.

Every benchmark is a module with ``main(argv) -> int`` that prints one JSON object per line,
each with a ``"bench"`` key, and accepts the arguments of ``add_common_arguments``.
Figures from a shared machine are noisy: run benchmarks on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from server.codec import to_planar
from server.config import (
    BatcherConfig,
    EngineConfig,
    LimitsConfig,
    ServerConfig,
    TilingConfig,
)
from server.engine import Engine
from server.models import default_model_path
from server.tiling import plan_tiles, split_tiles

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
SET5 = REPO / "tests" / "data" / "Set5"
FALLBACK_PRESET = "small"  # random weights: same cost as the trained default model


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    default = default_model_path(2)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"ONNX model (default: {default.relative_to(REPO)} if present, else a random "
        f"{FALLBACK_PRESET}-preset model exported to a temporary directory)",
    )
    parser.add_argument("--quick", action="store_true", help="short run, noisier figures")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument("--tile", type=int, default=TilingConfig.tile, help="LR tile core size")
    parser.add_argument("--pad", type=int, default=TilingConfig.pad, help="LR tile context margin")
    parser.add_argument("--max-batch", type=int, default=BatcherConfig.max_batch)
    parser.add_argument("--max-delay-ms", type=float, default=BatcherConfig.max_delay_ms)
    return parser


def common_argv(args: argparse.Namespace, model: Path) -> list[str]:
    """The command line that gives another benchmark the same common arguments."""
    argv = ["--model", str(model), "--threads", str(args.threads), "--tile", str(args.tile)]
    argv += ["--pad", str(args.pad), "--max-batch", str(args.max_batch)]
    argv += ["--max-delay-ms", str(args.max_delay_ms)]
    return [*argv, "--quick"] if args.quick else argv


def setup_logging() -> None:
    """Benchmarks log to stderr so stdout carries only JSON lines."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    log.setLevel(logging.INFO)


def emit(record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    assert "bench" in record, "every benchmark record names its benchmark"
    sys.stdout.write(json.dumps(record, sort_keys=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def bench_model(model: Path | None) -> Iterator[Path]:
    """The model to benchmark: ``model``, else the default x2 model, else a random export."""
    if model is not None:
        yield model
        return
    default = default_model_path(2)
    if default.is_file():
        yield default
        return
    with tempfile.TemporaryDirectory(prefix="rdn-bench-") as folder:
        path = export_random_model(Path(folder), FALLBACK_PRESET)
        log.info("no %s: benchmarking a random %s-preset model", default, FALLBACK_PRESET)
        yield path


def export_random_model(folder: Path, preset: str, scale: int = 2) -> Path:
    """A randomly initialised RDN of ``preset`` exported to ``folder`` (needs torch: dev only)."""
    import torch

    from export.to_onnx import ExportOptions, export_onnx
    from rdn.checkpoint import make_payload, save_checkpoint
    from rdn.model import RDN, RDNConfig, freeze_batchnorm

    torch.manual_seed(0)
    model = RDN(RDNConfig.from_preset(preset, scale=scale))
    freeze_batchnorm(model)
    checkpoint = folder / f"random_{preset}_x{scale}.pt"
    save_checkpoint(checkpoint, make_payload(model))
    output = folder / f"random_{preset}_x{scale}.onnx"
    export_onnx(checkpoint, output, ExportOptions(verify=False))
    return output


def server_config(model: Path, args: argparse.Namespace) -> ServerConfig:
    """A loopback server on a free port with the benchmark's engine, tiling and batching."""
    return ServerConfig(
        model=model,
        host="127.0.0.1",
        port=0,
        grace_s=1.0,
        engine=EngineConfig(intra_op_threads=args.threads),
        tiling=TilingConfig(tile=args.tile, pad=args.pad),
        batcher=BatcherConfig(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms),
        limits=LimitsConfig(),
    )


def load_engine(model: Path, args: argparse.Namespace) -> Engine:
    return Engine(model, EngineConfig(intra_op_threads=args.threads))


def photo(size: int) -> np.ndarray:
    """A size x size x 3 uint8 photograph (Set5 baby, centre crop; tiled if size > 512)."""
    baby = cv2.cvtColor(cv2.imread(str(SET5 / "baby.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    reps = -(-size // min(baby.shape[:2]))
    big = np.tile(baby, (reps, reps, 1))
    top, left = (big.shape[0] - size) // 2, (big.shape[1] - size) // 2
    return np.ascontiguousarray(big[top : top + size, left : left + size])


def encode_png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, "OpenCV could not encode a PNG"
    return data.tobytes()


def image_tiles(rgb: np.ndarray, tile: int, pad: int) -> np.ndarray:
    """The tiles the server cuts ``rgb`` into: [n, 3, tile + 2*pad, tile + 2*pad] float32."""
    planar = to_planar(rgb)
    return split_tiles(planar, plan_tiles(planar.shape[1], planar.shape[2], tile, pad))


def batches(tiles: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """``tiles`` cut into the engine calls a lone request makes: max_batch at a time, in order."""
    return [tiles[i : i + max_batch] for i in range(0, len(tiles), max_batch)]


def engine_seconds(engine: Engine, calls: list[np.ndarray]) -> float:
    """Wall time of ``calls`` run back to back on ``engine``."""
    start = time.perf_counter()
    for batch in calls:
        engine.run(batch)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def mpix(pixels: float, elapsed: float) -> float:
    return round(pixels / elapsed / 1e6, 4)
