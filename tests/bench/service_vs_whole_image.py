"""The service against what a user would write instead: the whole-image onnxruntime loop.

The loop is the ten lines anyone would write: one onnxruntime session (default options, CPU),
and for each photo: OpenCV decode of the PNG, the whole LR image at batch 1, rounding, OpenCV
PNG encode. The service is a real ``rdn-serve`` process with its defaults (fitted tiles and max
batch by provider), called by ``AsyncUpscaleClient`` with the same PNG bytes at 1 and at 8
clients. Throughput is LR megapixels per second over the same photos; loop passes alternate
with service passes (loop, 1 client, loop, 8 clients, ..., loop) and the loop's mean is the
baseline, so the drift of a shared machine falls on both alike. Targets: ratio >= 0.9 at 1
and at 8 clients, and the client's p50 latency at 1 client <= 1.15x the loop's median time per
photo.

Photos: the five of Set5 (tests/data) and six photographs scikit-image ships (astronaut,
chelsea, coffee, rocket, both stereo motorcycle views), each downscaled by the scale
(Pillow bicubic, the benchmark protocol) so that the answer has the photo's own size; or, with
``--photos DIR ...``, every image of those folders (Set14 and the SunHays80 validation photos
are the issue's set; they are not shipped).

With ``--service-precision int8`` the service runs the model's int8 twin (rdn_x2_int8.onnx
beside default_x2.onnx) while the loop keeps the float model: what the int8 service gains over
a user's float loop. Its target is a ratio >= 1.8 at 1 and at 8 clients (latency as above).

    python -m tests.bench.service_vs_whole_image [--scales 2 4] [--rounds N] [--quick]
        [--photos data/Set14 runs/data/val] [--provider cuda] [--serve-args '...']
        [--service-precision int8]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from rdn.imaging import list_images, read_rgb
from server.client import AsyncUpscaleClient, RetryPolicy
from server.models import default_model_path
from tests.bench.common import (
    SET5,
    add_common_arguments,
    cpu_flags,
    emit_checked,
    encode_png,
    percentile_ms,
    proc_status_mib,
    serve_process,
    setup_logging,
    stop_server,
)
from tests.bench.int8_vs_fp32 import twin_of
from tests.server.reference import from_planar, to_planar

BENCH = "service_vs_whole_image"
TARGET_RATIO = 0.9
TARGET_RATIO_INT8 = 1.8  # the int8 service against the float loop
TARGET_LATENCY_RATIO = 1.15
CLIENTS = (1, 8)
MESSAGE_BYTES = 64 * 2**20
CALL_TIMEOUT_S = 600.0
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
PROVIDERS = {"cpu": (CPU,), "cuda": (CUDA, CPU)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="shipped models")
    parser.add_argument(
        "--rounds", type=int, default=None, help="service passes per client count (6)"
    )
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="cpu",
        help="where both sides run: the loop's session and rdn-serve --providers (default cpu)",
    )
    parser.add_argument(
        "--photos",
        type=Path,
        nargs="+",
        help="folders of HR photos to use instead of the shipped set (e.g. data/Set14 and the "
        "SunHays80 validation split)",
    )
    parser.add_argument(
        "--serve-args",
        default="",
        help="extra rdn-serve flags, e.g. '--ort-spinning off' (to measure a choice)",
    )
    parser.add_argument(
        "--service-precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: the service runs the model's int8 twin, the loop the float model",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 6
    args.max_batch = 0  # the service's own default: by provider
    return args


def photos(folders: list[Path] | None = None) -> list[np.ndarray]:
    """The photos as RGB uint8 (HR): every image file of ``folders``, or the shipped set."""
    if folders:
        paths = [p for folder in folders for p in list_images(folder)]
        if not paths:
            raise ValueError(f"no image files in {[str(f) for f in folders]}")
        return [read_rgb(p) for p in paths]
    from skimage import data

    found = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(SET5.glob("*"))]
    found += [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    found += list(data.stereo_motorcycle()[:2])
    return [np.ascontiguousarray(p[:, :, :3]) for p in found]


def lr_pngs(scale: int, folders: list[Path] | None = None) -> list[bytes]:
    """Each photo modcropped and bicubic-downscaled by ``scale``, as PNG bytes."""
    out = []
    for rgb in photos(folders):
        h, w = (rgb.shape[0] // scale) * scale, (rgb.shape[1] // scale) * scale
        lr = Image.fromarray(rgb[:h, :w]).resize((w // scale, h // scale), Image.BICUBIC)
        out.append(encode_png(np.asarray(lr)))
    return out


def lr_pixels(pngs: list[bytes]) -> int:
    return sum(int(np.prod(cv2.imdecode(np.frombuffer(p, np.uint8), 1).shape[:2])) for p in pngs)


def whole_image_loop(
    model: Path, threads: int, providers: tuple[str, ...] = (CPU,)
) -> Callable[[bytes], bytes]:
    """What a user writes instead of the service: decode, whole image, encode."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=list(providers))
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(
            f"the loop's session runs on {session.get_providers()[0]}, not {providers[0]}"
        )
    name = session.get_inputs()[0].name

    def upscale(png: bytes) -> bytes:
        bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        planar = to_planar(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        sr = from_planar(session.run(None, {name: planar[None]})[0][0])
        return cv2.imencode(".png", cv2.cvtColor(sr, cv2.COLOR_RGB2BGR))[1].tobytes()

    return upscale


def run_loop(upscale: Callable[[bytes], bytes], pngs: list[bytes], rounds: int) -> list[float]:
    """Seconds per photo, every photo ``rounds`` times."""
    times = []
    for _ in range(rounds):
        for png in pngs:
            start = time.perf_counter()
            upscale(png)
            times.append(time.perf_counter() - start)
    return times


async def run_service(
    port: int, pngs: list[bytes], rounds: int, clients: int
) -> tuple[float, list[float]]:
    """Seconds and client latencies of ``clients`` calls in flight until every photo ran
    ``rounds`` times (after a connecting call that is not timed)."""
    jobs = [png for _ in range(rounds) for png in pngs]
    latencies: list[float] = []
    async with AsyncUpscaleClient(
        f"127.0.0.1:{port}", max_message_bytes=MESSAGE_BYTES, retry=RetryPolicy(max_attempts=1)
    ) as client:

        async def worker() -> None:
            while jobs:
                png = jobs.pop()
                start = time.perf_counter()
                await client.upscale(png, "png", timeout=CALL_TIMEOUT_S)
                latencies.append(time.perf_counter() - start)

        await client.upscale(pngs[0], "png", timeout=CALL_TIMEOUT_S)  # connect, warm
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return seconds, latencies


def measure(args: argparse.Namespace, scale: int) -> list[dict[str, object]]:
    model = args.model if args.model is not None and len(args.scales) == 1 else None
    model = model or default_model_path(scale)
    pngs = lr_pngs(scale, args.photos)
    pixels = lr_pixels(pngs)
    providers = PROVIDERS[args.provider]
    loop = whole_image_loop(model, args.threads, providers)
    run_loop(loop, pngs[:1], 1)  # warm
    loop_passes: list[list[float]] = []  # seconds per photo, one list per pass
    service_passes: dict[int, list[tuple[float, list[float]]]] = {c: [] for c in CLIENTS}
    flags = ["--max-message-bytes", str(MESSAGE_BYTES), "--providers", ",".join(providers)]
    flags += ["--require-gpu"] if args.provider == "cuda" else []
    flags += shlex.split(args.serve_args)
    try:
        served = twin_of(model) if args.service_precision == "int8" else model
    except FileNotFoundError as e:
        return [{"bench": BENCH, "scale": scale, "error": str(e), "met": False}]
    target = TARGET_RATIO_INT8 if args.service_precision == "int8" else TARGET_RATIO
    with serve_process(served, args, flags) as (process, port):
        # Passes alternate (loop, service at 1 client, loop, service at 8 clients, ...), so a
        # slow spell of a shared machine falls on both sides alike.
        for _ in range(args.rounds):
            for clients in CLIENTS:
                loop_passes.append(run_loop(loop, pngs, 1))
                service_passes[clients].append(asyncio.run(run_service(port, pngs, 1, clients)))
        loop_passes.append(run_loop(loop, pngs, 1))
        peak_rss_mib = proc_status_mib(process.pid, "VmHWM")
        exit_code = stop_server(process)
    loop_seconds = [sum(times) for times in loop_passes]
    loop_rate = pixels / float(np.mean(loop_seconds)) / 1e6
    loop_p50 = float(np.median([t for times in loop_passes for t in times]))
    records = []
    for clients, passes in service_passes.items():
        rate = pixels / float(np.mean([seconds for seconds, _ in passes])) / 1e6
        latencies = [t for _, times in passes for t in times]
        ratio = rate / loop_rate
        record: dict[str, object] = {
            "bench": BENCH,
            "scale": scale,
            "clients": clients,
            "photos": len(pngs),
            "photo_folders": [str(f) for f in args.photos] if args.photos else "shipped",
            "passes": len(passes),
            "lr_mpix_per_pass": round(pixels / 1e6, 3),
            "service_mpix_s": round(rate, 4),
            "loop_mpix_s": round(loop_rate, 4),
            "loop_mpix_s_per_pass": [round(pixels / s / 1e6, 4) for s in loop_seconds],
            "ratio": round(ratio, 3),
            "target_ratio": target,
            "service_model": served.name,
            "loop_model": model.name,
            "cpu_flags": cpu_flags(),
            "p50_ms": percentile_ms(latencies, 50),
            "loop_p50_ms": round(1e3 * loop_p50, 1),
            "server_peak_rss_mib": round(peak_rss_mib, 1),
            "sigterm_exit_code": exit_code,
            "provider": providers[0],
            "serve_args": args.serve_args,
        }
        met = ratio >= target and exit_code == 0
        if clients == 1:
            latency_ratio = float(np.median(latencies)) / loop_p50
            record["latency_ratio"] = round(latency_ratio, 3)
            record["target_latency_ratio"] = TARGET_LATENCY_RATIO
            met = met and latency_ratio <= TARGET_LATENCY_RATIO
        record["met"] = met
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    code = 0
    for scale in args.scales:
        for record in measure(args, scale):
            met = bool(record.pop("met"))
            code |= emit_checked(record, met)
    return code


if __name__ == "__main__":
    sys.exit(main())
