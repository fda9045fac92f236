"""The served model in onnxruntime against the same network in torch eager (target >= 1.1).

The torch network is rebuilt from the model file alone: ``rdn.config`` from its metadata gives
the architecture (with ``norm="none"``: export folds every BatchNorm into the Conv before it,
and runs the RGB conv before the last pixel shuffle, ``rdn.subpixel``), and the Conv
weights and biases of the graph, in graph order, are copied into the network's Conv2d modules
in module order (every shape is checked). Before anything is timed, torch must reproduce
onnxruntime's output within 1e-4 on the benchmark's own tiles; otherwise the benchmark prints
an error line and exits 1 instead of a ratio.

Both run the tiles a 256x256 photograph is cut into, in the server's engine calls (max_batch
tiles each), on the CPU with the same number of threads (``--threads``, else torch's default),
torch under ``inference_mode``; passes alternate between the two.
ratio = torch median / onnxruntime median.

    python -m tests.bench.onnxruntime_vs_torch [--quick] [--model M] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from rdn.metadata import read_model_metadata
from rdn.model import RDN, RDNConfig
from rdn.subpixel import fold_rgb_before_shuffle
from server.config import EngineConfig
from server.core.engine import Engine
from tests.bench.common import (
    add_common_arguments,
    batches,
    bench_model,
    emit,
    emit_checked,
    engine_seconds,
    image_tiles,
    photo,
    setup_logging,
)

BENCH = "onnxruntime_vs_torch"
TARGET_RATIO = 1.1
TOLERANCE = 1e-4  # max |torch - onnxruntime| on outputs in [0, 1]
IMAGE_SIZE = 256  # LR pixels per side


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed passes of each")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    return args


def conv_parameters(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(node name, weight, bias or None) of every Conv of ``model``, in graph order.

    Raises ValueError when a weight or bias is not a graph initializer (computed at run time,
    e.g. by a Cast of float16 weights), since it then cannot be copied into torch.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        name = node.name or node.output[0]
        weight, bias = node.input[1], node.input[2] if len(node.input) > 2 else ""
        for tensor in (weight, bias):
            if tensor and tensor not in initializers:
                raise ValueError(
                    f"Conv {name}: input {tensor!r} is computed, not stored (a float16 model?); "
                    "benchmark a float32 export"
                )
        found.append(
            (
                name,
                numpy_helper.to_array(initializers[weight]).copy(),  # writable, for torch
                numpy_helper.to_array(initializers[bias]).copy() if bias else None,
            )
        )
    return found


def torch_from_onnx(path: Path) -> RDN:
    """The RDN of ``path``'s metadata with the graph's Conv parameters loaded, in eval mode."""
    config = {**read_model_metadata(path).config, "norm": "none"}
    model = RDN(RDNConfig(**config)).eval()
    params = conv_parameters(onnx.load(str(path)))
    if params and params[-1][1].shape[0] != 3:  # rdn-export runs the RGB conv before the shuffle
        model = fold_rgb_before_shuffle(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(params):
        raise ValueError(
            f"model file {path}: {len(params)} Conv nodes, but RDN({config}) has {len(convs)} "
            "Conv2d modules"
        )
    with torch.no_grad():
        for module, (name, weight, bias) in zip(convs, params, strict=True):
            if tuple(weight.shape) != tuple(module.weight.shape) or (bias is None) != (
                module.bias is None
            ):
                raise ValueError(
                    f"Conv {name}: weight {list(weight.shape)} does not fit {module} "
                    f"(weight {list(module.weight.shape)}); graph and module orders differ"
                )
            module.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                module.bias.copy_(torch.from_numpy(bias))
    return model


def torch_seconds(model: RDN, calls: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in calls:
            model(batch)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with bench_model(args.model) as model_path:
        engine = Engine(
            model_path, EngineConfig(providers=("CPUExecutionProvider",), intra_op_threads=threads)
        )
        try:
            model = torch_from_onnx(model_path)
        except (ValueError, KeyError) as e:
            emit({"bench": BENCH, "error": f"cannot rebuild the model in torch: {e}"})
            return 1
        calls = batches(image_tiles(photo(IMAGE_SIZE), args.tile, args.pad), args.max_batch)
        torch_calls = [torch.from_numpy(batch) for batch in calls]
        with torch.inference_mode():
            diff = max(
                float(np.abs(model(t).numpy() - engine.run(b)).max())
                for t, b in zip(torch_calls, calls, strict=True)
            )
        if not diff <= TOLERANCE:
            emit(
                {
                    "bench": BENCH,
                    "error": f"torch and onnxruntime outputs differ by {diff:.3g} > {TOLERANCE}; "
                    "the weights were not mapped onto the right modules",
                    "max_abs_diff": diff,
                }
            )
            return 1
        ort_times: list[float] = []
        torch_times: list[float] = []
        for i in range(args.repeats):
            if i % 2:
                torch_times.append(torch_seconds(model, torch_calls))
            ort_times.append(engine_seconds(engine, calls))
            if not i % 2:
                torch_times.append(torch_seconds(model, torch_calls))
    ort_median, torch_median = statistics.median(ort_times), statistics.median(torch_times)
    ratio = torch_median / ort_median
    return emit_checked(
        {
            "bench": BENCH,
            "ratio": round(ratio, 4),
            "ratio_best": round(min(torch_times) / min(ort_times), 4),
            "onnxruntime_ms": round(1e3 * ort_median, 1),
            "torch_ms": round(1e3 * torch_median, 1),
            "onnxruntime_ms_best": round(1e3 * min(ort_times), 1),
            "torch_ms_best": round(1e3 * min(torch_times), 1),
            "target_ratio": TARGET_RATIO,
            "max_abs_diff": diff,
            "image": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
            "tiles": sum(len(c) for c in calls),
            "batch_sizes": [len(c) for c in calls],
            "threads": threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "quick": args.quick,
        },
        ratio >= TARGET_RATIO,
    )


if __name__ == "__main__":
    raise SystemExit(main())
