"""What only a GPU can show, in one run of a few minutes: ``make gpu-check`` on a CUDA machine.

Each check prints one JSON line:

1. ``cuda_provider``: an ``Engine`` asked for CUDA runs on it (the session's first provider,
   not only the list of available ones), with IOBinding on.
2. ``io_binding``: ms per engine call with and without IOBinding, for a batch of 8 tiles of
   80x80 and one tile of 272x272 (two of the GPU buckets), median of repeated calls.
3. ``fp16``: the shipped x2 model converted to float16 (``export.to_onnx.to_float16``, as
   ``rdn-export --fp16`` does) against float32, both on CUDA, whole Set5 LR images: the largest
   difference on the 0-255 scale, the PSNR of the float16 output against the float32 one, and
   ms per image of each.
   ``int8``: the same against the shipped int8 twin (rdn_x2_int8.onnx), on CUDA as well
   (onnxruntime's CUDA provider runs its QuantizeLinear / DequantizeLinear pairs around
   float convolutions: a check of agreement and cost, not of integer speed).
4. ``batching_gain`` (tests/bench/batching_gain.py) on CUDA: max batch 8 against 1, 8 clients.
5. ``service_vs_whole_image`` with ``--provider cuda`` at x2 and x4: the service and the
   whole-image loop both on the GPU.

Without a usable CUDA provider it exits 1 with one line saying why (no GPU, or onnxruntime
cannot load CUDA/cuDNN) instead of timing the CPU.

    python -m tests.bench.gpu_check [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.to_onnx import to_float16
from rdn.constants import CPU, CUDA
from server.config import EngineConfig
from server.core.engine import Engine
from server.models import default_model_path
from tests.bench import batching_gain, service_vs_whole_image
from tests.bench.common import SET5, emit, setup_logging
from tests.bench.int8_vs_fp32 import twin_of
from tests.bench.tiling_accuracy import psnr_u8

REPEATS = 20
SHAPES = ((8, 80, 80), (1, 272, 272))  # (batch, height, width)


def cuda_engine(model: Path, io_binding: bool = True) -> Engine:
    engine = Engine(model, EngineConfig(providers=(CUDA, CPU), io_binding=io_binding))
    if engine.active_provider != CUDA:
        raise RuntimeError(f"{CUDA} is not active (session providers {engine.providers})")
    return engine


def timed_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm: cuDNN's algorithm search for this shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def check_provider(model: Path) -> dict[str, object]:
    engine = cuda_engine(model)
    return {
        "bench": "cuda_provider",
        "active": engine.active_provider,
        "session_providers": list(engine.providers),
        "io_binding": engine.uses_io_binding,
        "device": ort.get_device(),
    }


def check_io_binding(model: Path, repeats: int) -> dict[str, object]:
    bound, plain = cuda_engine(model, io_binding=True), cuda_engine(model, io_binding=False)
    rows = {}
    for n, h, w in SHAPES:
        batch = np.random.default_rng(0).random((n, 3, h, w), dtype=np.float32)
        rows[f"{n}x{h}x{w}"] = {
            "io_binding_ms": timed_ms(lambda b=batch: bound.run(b), repeats),
            "plain_ms": timed_ms(lambda b=batch: plain.run(b), repeats),
        }
    return {"bench": "io_binding", "model": model.name, "calls": rows}


def check_fp16(model: Path, repeats: int) -> dict[str, object]:
    half_bytes = to_float16(onnx.load(str(model))).SerializeToString()
    return check_against_fp32(model, half_bytes, "fp16", repeats)


def check_int8(model: Path, repeats: int) -> dict[str, object]:
    return check_against_fp32(model, twin_of(model).read_bytes(), "int8", repeats)


def check_against_fp32(
    model: Path, other_bytes: bytes, label: str, repeats: int
) -> dict[str, object]:
    """The float32 model against another precision of it, both on CUDA, whole Set5 LR images."""
    import cv2

    options = ort.SessionOptions()
    fp32 = ort.InferenceSession(str(model), options, providers=[CUDA, CPU])
    other = ort.InferenceSession(other_bytes, options, providers=[CUDA, CPU])
    if fp32.get_providers()[0] != CUDA or other.get_providers()[0] != CUDA:
        raise RuntimeError(f"a float32 or {label} session did not start on CUDA")
    name = fp32.get_inputs()[0].name
    worst, psnrs, ms32, ms16 = 0.0, [], [], []
    for path in sorted(SET5.glob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        lr = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
        x = (lr.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()
        a = np.clip(fp32.run(None, {name: x})[0], 0, 1) * 255
        b = np.clip(other.run(None, {name: x})[0], 0, 1) * 255
        worst = max(worst, float(np.abs(a - b).max()))
        psnrs.append(psnr_u8(b, a))  # capped at 100 dB: strict JSON has no inf
        ms32.append(timed_ms(lambda x=x: fp32.run(None, {name: x}), repeats))
        ms16.append(timed_ms(lambda x=x: other.run(None, {name: x}), repeats))
    return {
        "bench": label,
        "model": model.name,
        "images": len(psnrs),
        "max_abs_diff_255": round(worst, 3),
        f"min_psnr_{label}_vs_fp32_db": round(min(psnrs), 2),
        "fp32_ms_per_image": round(statistics.mean(ms32), 3),
        f"{label}_ms_per_image": round(statistics.mean(ms16), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.gpu_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
    args = parser.parse_args(argv)
    setup_logging()
    ort.set_default_logger_severity(4)  # a failed CUDA load is reported once, below
    if CUDA not in ort.get_available_providers():
        print(f"gpu-check: {CUDA} is not in this onnxruntime build ({ort.__version__})",
              file=sys.stderr)  # fmt: skip
        return 1
    model = default_model_path(2)
    try:
        emit(check_provider(model))
    except RuntimeError as e:
        print(f"gpu-check: {e}; is there a GPU with CUDA 13 and cuDNN 9?", file=sys.stderr)
        return 1
    repeats = 5 if args.quick else REPEATS
    emit(check_io_binding(model, repeats))
    emit(check_fp16(model, repeats))
    emit(check_int8(model, repeats))
    quick = ["--quick"] if args.quick else []
    code = batching_gain.main(["--max-batch", "8", *quick])
    rounds = ["--rounds", "1" if args.quick else "2"]
    code |= service_vs_whole_image.main(["--provider", "cuda", "--scales", "2", "4", *rounds])
    return code


if __name__ == "__main__":
    sys.exit(main())
