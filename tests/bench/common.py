"""Shared pieces of the benchmarks: arguments, the model to run, test images, timing, output.

Every benchmark is a module with ``main(argv) -> int`` that prints one JSON object per line,
each with a ``"bench"`` key, and accepts the arguments of ``add_common_arguments``.
Figures from a shared machine are noisy: run benchmarks on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import onnx
from onnx import numpy_helper

from server.config import (
    BatcherConfig,
    EngineConfig,
    LimitsConfig,
    ServerConfig,
    TilingConfig,
)
from server.core.engine import Engine
from server.core.tiling import plan_tiles, split_tiles
from server.models import default_model_path
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.server.reference import to_planar

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
    parser.add_argument("--max-batch", type=int, default=8, help="tiles per engine call")
    parser.add_argument("--max-delay-ms", type=float, default=BatcherConfig.max_delay_ms)
    return parser


def common_argv(args: argparse.Namespace, model: Path) -> list[str]:
    """The command line that gives another benchmark the same common arguments."""
    argv = ["--model", str(model), "--threads", str(args.threads), "--tile", str(args.tile)]
    argv += ["--pad", str(args.pad), "--max-batch", str(args.max_batch)]
    argv += ["--max-delay-ms", str(args.max_delay_ms)]
    return [*argv, "--quick"] if args.quick else argv


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what int8 runs on


def cpu_flags() -> list[str]:
    """The CPU's flags that decide int8 and float32 speed (from /proc/cpuinfo; [] elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    present = set(re.findall(r"^flags\s*:(.*)$", text, re.MULTILINE)[0].split()) if text else set()
    return [flag for flag in INT8_FLAGS if flag in present]


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


def emit_checked(record: dict[str, Any], target_met: bool) -> int:
    """Emit ``record`` with ``target_met``; the exit status: 0 when the target is met, else 1."""
    emit({**record, "target_met": target_met})
    return 0 if target_met else 1


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
        tiling=TilingConfig(tile=args.tile, pad=args.pad, mode="grid"),
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


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation) of ``seconds``, in milliseconds."""
    return round(1e3 * float(np.percentile(seconds, q)), 1)


# ----------------------------------------------------------------------------- clients

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20)]
RPC_TIMEOUT_S = 600.0


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


# ----------------------------------------------------------------------------- compute rates


def conv_flops(model: onnx.ModelProto, input_shape: Sequence[int]) -> int:
    """FLOPs of every Conv of ``model`` on one input of ``input_shape`` ([N, C, H, W]).

    Per Conv: 2 * (non-zero weights) * N * Hout * Wout, i.e. 2 FLOPs per multiply-add by a
    non-zero weight, with the weights from the graph's initializers and the output shape from
    ONNX shape inference on the fixed input shape. A trained conv has no zero weights, so this
    is 2 * (Cin/group * kH * kW) * Cout per output pixel; the exported RGB conv that runs before
    the last pixel shuffle (export/subpixel.py) is mostly structural zeros and counts as the
    high-resolution conv it replaces. Nothing else is counted: bias adds, ReLU, residual Add,
    Concat and DepthToSpace are memory traffic, not arithmetic, so a rate computed from this
    count slightly understates the work.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    inputs = {i.name for i in fixed.graph.initializer}
    graph_inputs = [i for i in fixed.graph.input if i.name not in inputs]
    if len(graph_inputs) != 1:
        raise ValueError(f"model has {len(graph_inputs)} graph inputs; expected one image input")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"model input has rank {len(dims)}; got shape {list(input_shape)}")
    for dim, size in zip(dims, input_shape, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True)
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shape = value.type.tensor_type.shape
        shapes.setdefault(
            value.name, [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]
        )
    nonzero = {
        t.name: int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.graph.initializer
    }
    total = 0
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        weight, output = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not weight or not output or min(weight) < 1 or min(output) < 1 or len(output) != 4:
            raise ValueError(
                f"Conv {node.name or node.output[0]}: shape inference left weight {weight} / "
                f"output {output} unknown; cannot count its FLOPs"
            )
        n, _, h_out, w_out = output
        # weight = [Cout, Cin/group, kH, kW]: multiply-adds per output pixel, less the zeros
        multiply_adds = nonzero.get(node.input[1], math.prod(weight))
        total += 2 * multiply_adds * n * h_out * w_out
    return total


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of a float32 ``size``^3 matrix product in numpy (BLAS), GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    np.matmul(a, b, out=out)  # warm: BLAS threads, pages of `out`
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------- rdn-serve process

SERVE_START_TIMEOUT_S = 120.0


def proc_status_mib(pid: int, key: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM ...) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


@contextlib.contextmanager
def serve_process(
    model: Path, args: argparse.Namespace, extra: Sequence[str] = (), log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``rdn-serve`` with the common arguments on a free loopback port: (process, port).

    Its log goes to ``log``, else to a temporary file (read for the bound port and quoted if
    it dies); ``extra`` flags are appended. Killed on exit if still running: stop it first to
    see its exit code.
    """
    script = Path(sys.executable).with_name("rdn-serve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "server.main"]
    command += [
        "--model", str(model), "--host", "127.0.0.1", "--port", "0",
        "--tile", str(args.tile), "--tile-pad", str(args.pad), "--threads", str(args.threads),
        "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
        *extra,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rdn-bench-serve-") as folder:
        log_path = log if log is not None else Path(folder) / "serve.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            yield process, _wait_for_port(process, log_path)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_for_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if process.poll() is not None:
            raise RuntimeError(f"rdn-serve exited with {process.returncode}: {text[-2000:]}")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"rdn-serve did not start within {SERVE_START_TIMEOUT_S} s")


def stop_server(process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, then the exit code (rdn-serve drains and exits 0)."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)
