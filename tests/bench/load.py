"""Load and soak of a real ``rdn-serve`` process: errors, latency, and its resident memory.

The server runs as a subprocess (so RSS is the server's alone, read from /proc/PID/status); a
grpc.aio client keeps ``--concurrency`` calls in flight with a mix of valid requests (PNG, JPEG,
WebP, raw RGB, RGBA, grey, one streamed). Every answer is checked for its size; every error is
unexpected. Prints one JSON line at the end (``"bench": "load"``); with ``--soak SECONDS`` it
runs for that long instead of ``--requests`` and prints an RSS sample line every
``--sample-every`` seconds, then the summary with the RSS trend (least-squares MiB/minute).

    python -m tests.bench.load [--model M] [--requests 5000] [--concurrency 32]
    python -m tests.bench.load --soak 600          # 10 minutes; RSS should stay flat
    python -m tests.bench.load --random-sizes --requests 1000 --concurrency 1
        # raw images of random sizes (16..200 px a side): each is its own fitted tile shape,
        # so onnxruntime's memory arena meets a new input shape almost every call

Exit status 1 if any call failed or the server did not exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np

from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    emit,
    percentile_ms,
    photo,
    proc_status_mib,
    serve_process,
    setup_logging,
    stop_server,
)

BENCH = "load"
CALL_TIMEOUT_S = 120.0
GRACE_S = 30.0  # rdn-serve --grace: SIGTERM drains in-flight calls for up to this long
WARMUP_REQUESTS = 64  # before the "before" RSS reading: sessions, arenas, caches settle
MESSAGE_BYTES = 16 * 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--requests", type=int, default=None, help="calls (default 5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--size", type=int, default=48, help="side of the test images, LR px")
    parser.add_argument("--soak", type=float, default=0.0, help="run this many seconds instead")
    parser.add_argument("--sample-every", type=float, default=10.0, help="soak RSS sampling, s")
    parser.add_argument("--max-queue-tiles", type=int, default=4096)
    parser.add_argument(
        "--random-sizes", action="store_true", help="raw images of random sizes instead of the mix"
    )
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 500 if args.quick else 5000
    return args


# ----------------------------------------------------------------------------- the server


def rss_mib(pid: int) -> float:
    return proc_status_mib(pid, "VmRSS")


def server_flags(args: argparse.Namespace) -> list[str]:
    """rdn-serve flags beyond the common ones."""
    return [
        "--max-queue-tiles", str(args.max_queue_tiles),
        "--max-message-bytes", str(MESSAGE_BYTES), "--grace", str(GRACE_S),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Job:
    request: upscale_pb2.UpscaleRequest
    streamed: bool
    answer: tuple[int, int, int]  # width, height, channels at x2


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {ext}")
    return buffer.tobytes()


def job_mix(size: int) -> list[Job]:
    rgb = photo(size)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    rgba = np.dstack([bgr, np.full(bgr.shape[:2], 200, np.uint8)])
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    raw = upscale_pb2.RawImage(
        shape=upscale_pb2.ImageShape(height=size, width=size, channels=3), data=rgb.tobytes()
    )
    big, png = (2 * size, 2 * size, 3), upscale_pb2.UpscaleRequest
    return [
        Job(png(encoded=_encode(bgr, ".png")), False, big),
        Job(png(encoded=_encode(bgr, ".jpg"), output_format=2, quality=90), False, big),
        Job(png(encoded=_encode(bgr, ".webp"), output_format=3), False, big),
        Job(png(raw=raw, output_format=4), False, big),
        Job(png(encoded=_encode(rgba, ".png")), False, (2 * size, 2 * size, 4)),
        Job(png(encoded=_encode(grey, ".png")), False, (2 * size, 2 * size, 1)),
        Job(png(encoded=_encode(bgr, ".png")), True, big),
    ]


def random_size_mix(count: int, seed: int = 0) -> list[Job]:
    """Raw RGB images of random sizes, 16..200 LR pixels a side."""
    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(16, 201, 2))
        data = rng.integers(0, 256, (height, width, 3), np.uint8).tobytes()
        shape = upscale_pb2.ImageShape(height=height, width=width, channels=3)
        request = upscale_pb2.UpscaleRequest(
            raw=upscale_pb2.RawImage(shape=shape, data=data), output_format=4
        )
        jobs.append(Job(request, False, (2 * width, 2 * height, 3)))
    return jobs


def stream_of(request: upscale_pb2.UpscaleRequest) -> Iterator[upscale_pb2.UpscaleChunk]:
    data, piece = request.encoded, 64 * 2**10
    header = upscale_pb2.UpscaleStreamHeader(
        total_bytes=len(data), output_format=request.output_format, quality=request.quality
    )
    yield upscale_pb2.UpscaleChunk(header=header)
    for offset in range(0, len(data), piece):
        chunk = upscale_pb2.DataChunk(offset=offset, data=data[offset : offset + piece])
        yield upscale_pb2.UpscaleChunk(data=chunk)


async def one_call(stub: upscale_pb2_grpc.UpscalerStub, job: Job) -> tuple[str, float]:
    """The status name ("OK", or "WRONG_ANSWER" for a bad size) and the latency in seconds."""
    start = time.perf_counter()
    try:
        if job.streamed:
            call = stub.UpscaleStream(stream_of(job.request), timeout=CALL_TIMEOUT_S)
            answers = [message async for message in call]
            response = answers[0].result
        else:
            response = await stub.Upscale(job.request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code().name, time.perf_counter() - start
    ok = (response.width, response.height, response.channels) == job.answer
    return ("OK" if ok else "WRONG_ANSWER"), time.perf_counter() - start


@dataclass
class Tally:
    codes: Counter[str]
    latencies: list[float]
    started: int = 0


async def drive(
    stub: upscale_pb2_grpc.UpscalerStub,
    jobs: list[Job],
    concurrency: int,
    tally: Tally,
    requests: int | None,
    until: float | None,
) -> None:
    """Keep ``concurrency`` calls in flight until ``requests`` calls or the ``until`` time."""

    async def worker() -> None:
        while (requests is None or tally.started < requests) and (
            until is None or time.monotonic() < until
        ):
            job = jobs[tally.started % len(jobs)]
            tally.started += 1
            code, seconds = await one_call(stub, job)
            tally.codes[code] += 1
            tally.latencies.append(seconds)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample_rss(
    pid: int, every: float, tally: Tally, start: float, out: list[tuple[float, float]]
) -> None:
    while True:
        await asyncio.sleep(every)
        elapsed, rss = time.monotonic() - start, rss_mib(pid)
        out.append((elapsed, rss))
        emit(
            {
                "bench": BENCH,
                "sample": True,
                "seconds": round(elapsed, 1),
                "requests": sum(tally.codes.values()),
                "rss_mib": round(rss, 1),
            }
        )


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    if len(samples) < 3:
        return None
    t, rss = np.array(samples).T
    return round(float(np.polyfit(t / 60, rss, 1)[0]), 3)


async def run(
    args: argparse.Namespace, process: subprocess.Popen[bytes], port: int, model: Path
) -> dict[str, object]:
    jobs = random_size_mix(args.requests) if args.random_sizes else job_mix(args.size)
    options = [("grpc.max_receive_message_length", MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        warm = Tally(Counter(), [])
        await drive(stub, jobs, args.concurrency, warm, WARMUP_REQUESTS, None)
        before = rss_mib(process.pid)
        tally, samples = Tally(Counter(), []), [(0.0, before)]
        start = time.monotonic()
        sampler = None
        if args.soak:
            sampler = asyncio.ensure_future(
                sample_rss(process.pid, args.sample_every, tally, start, samples)
            )
        until = start + args.soak if args.soak else None
        await drive(
            stub, jobs, args.concurrency, tally, None if args.soak else args.requests, until
        )
        seconds = time.monotonic() - start
        if sampler is not None:
            sampler.cancel()
        after = rss_mib(process.pid)
    samples.append((seconds, after))
    done = sum(tally.codes.values())
    return {
        "bench": BENCH,
        "mode": "soak" if args.soak else "requests",
        "model": str(model),
        "requests": done,
        "concurrency": args.concurrency,
        "image": "random 16..200 px a side" if args.random_sizes else f"{args.size}x{args.size}",
        "ok": tally.codes["OK"],
        "errors": {code: n for code, n in tally.codes.items() if code != "OK"},
        "unexpected_errors": done - tally.codes["OK"] + warm.started - warm.codes["OK"],
        "seconds": round(seconds, 2),
        "requests_per_s": round(done / seconds, 1),
        "latency_ms": {
            "p50": percentile_ms(tally.latencies, 50),
            "p99": percentile_ms(tally.latencies, 99),
            "max": percentile_ms(tally.latencies, 100),
        },
        "rss_mib": {
            "before": round(before, 1),
            "after": round(after, 1),
            "peak_sampled": round(max(r for _, r in samples), 1),
            "growth": round(after - before, 1),
        },
        "rss_slope_mib_per_min": slope_mib_per_min(samples),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    with (
        bench_model(args.model) as model,
        serve_process(model, args, server_flags(args)) as (process, port),
    ):
        summary = asyncio.run(run(args, process, port, model))
        stopping = time.monotonic()
        exit_code = stop_server(process)
        exit_seconds = time.monotonic() - stopping
    summary["sigterm_exit_code"] = exit_code
    summary["sigterm_exit_seconds"] = round(exit_seconds, 2)
    emit(summary)
    return 0 if summary["unexpected_errors"] == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
