"""A mixed soak of a real ``rdn-serve`` process: valid clients beside attackers.

Valid requests (the load benchmark's mix: PNG, JPEG, WebP, raw, RGBA, grey, streamed) go
through ``AsyncUpscaleClient`` at ``--concurrency`` calls in flight and must all be answered
with the right size; transient refusals (RESOURCE_EXHAUSTED with the retry hint) are retried
by the client, as rdn-client does, and counted. Beside them, for the whole run:

- slow uploads: stream headers announcing 4 MiB that send one chunk and then stall, until
  the server's upload idle timeout ends them;
- TIFF bombs (a 16x16 image in one 16384x16368 Deflate tile) and JPEG bombs (4096x4096
  declared, the scan cut after a few bytes), which must be refused;
- name floods: KServe ModelInfer calls with a 1 MiB model name;
- cancels: valid 256x256 requests cancelled after a random 0-300 ms.

The server's RSS is sampled every ``--sample-every`` seconds; the run fails (exit 1) if any
valid request was not answered correctly, an attack got an unexpected answer, the RSS went
over ``--rss-limit-mib`` in any sample, or SIGTERM did not exit 0.

    python -m tests.bench.hostile_soak --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np

from server.client import FORMAT_NAMES, AsyncUpscaleClient, RetryPolicy, UpscaleError
from server.pb.inference import grpc_service_pb2 as kserve_pb
from server.pb.inference import grpc_service_pb2_grpc as kserve_grpc
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.bench.common import (
    add_common_arguments,
    bench_model,
    emit,
    emit_checked,
    encode_png,
    percentile_ms,
    photo,
    serve_process,
    setup_logging,
    stop_server,
)
from tests.bench.load import CALL_TIMEOUT_S, MESSAGE_BYTES, job_mix, rss_mib
from tests.server.test_hostile import tiff_tile_bomb

BENCH = "hostile_soak"
UPLOAD_IDLE_S = 5.0  # rdn-serve --upload-idle-timeout for this run
SLOW_UPLOAD_BYTES = 4 * 2**20
MAX_ATTEMPTS = 50  # per valid request: transient refusals are retried, as rdn-client does


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--seconds", type=float, default=None, help="run time (600; quick 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="valid calls in flight")
    parser.add_argument("--slow-uploads", type=int, default=8, help="stalled uploads at a time")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling, s")
    parser.add_argument("--rss-limit-mib", type=float, default=1536.0, help="target bound")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 60.0 if args.quick else 600.0
    return args


def jpeg_bomb() -> bytes:
    """A 4096x4096 baseline JPEG whose scan is cut after 64 bytes, end-of-image appended."""
    data = cv2.imencode(".jpg", np.full((4096, 4096, 3), 128, np.uint8))[1].tobytes()
    scan = data.index(b"\xff\xda")
    return data[: scan + 64] + b"\xff\xd9"


@dataclass(frozen=True)
class Valid:
    """A valid request as rdn-client sends it, and the size of its right answer."""

    image: bytes | np.ndarray
    fmt: str
    quality: int
    stream: bool
    answer: tuple[int, int, int]  # width, height, channels


def valid_mix() -> list[Valid]:
    """The load benchmark's mix, as AsyncUpscaleClient calls."""
    mix = []
    for job in job_mix(48):
        request = job.request
        if request.HasField("raw"):
            shape = request.raw.shape
            image: bytes | np.ndarray = np.frombuffer(request.raw.data, np.uint8).reshape(
                shape.height, shape.width, shape.channels
            )
        else:
            image = request.encoded
        fmt = FORMAT_NAMES[request.output_format]
        mix.append(Valid(image, fmt, request.quality, job.streamed, job.answer))
    return mix


class RetryCounter(logging.Handler):
    """Counts the client's "retrying after ..." debug lines (transient refusals retried)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying after"):
            self.count += 1


async def valid_call(client: AsyncUpscaleClient, job: Valid, tally: Counter[str]) -> float:
    """One valid request, retried by the client on transient refusals; its latency in s."""
    start = time.perf_counter()
    try:
        result = await client.upscale(
            job.image, job.fmt, job.quality, timeout=CALL_TIMEOUT_S, stream=job.stream
        )
    except UpscaleError as e:
        tally[f"valid {e.code.name}"] += 1
        return time.perf_counter() - start
    right = (result.width, result.height, result.channels) == job.answer
    tally["valid OK" if right else "valid WRONG_ANSWER"] += 1
    return time.perf_counter() - start


async def stalled_upload() -> AsyncIterator[upscale_pb2.UpscaleChunk]:
    header = upscale_pb2.UpscaleStreamHeader(total_bytes=SLOW_UPLOAD_BYTES)
    yield upscale_pb2.UpscaleChunk(header=header)
    piece = upscale_pb2.DataChunk(offset=0, data=bytes(64 * 2**10))
    yield upscale_pb2.UpscaleChunk(data=piece)
    await asyncio.sleep(10 * UPLOAD_IDLE_S)  # the server's idle timeout ends the call first


async def expect(
    tally: Counter[str], what: str, code: grpc.StatusCode, call: Awaitable[object]
) -> None:
    """Await an attack call; count its status, and count it as unexpected unless ``code``."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        tally[f"{what} {e.code().name}"] += 1
        if e.code() != code:
            tally["unexpected attack answers"] += 1
        return
    tally[f"{what} OK"] += 1
    tally["unexpected attack answers"] += 1


async def run(
    args: argparse.Namespace, process: subprocess.Popen[bytes], port: int
) -> dict[str, object]:
    jobs = valid_mix()
    retries = RetryCounter()
    client_log = logging.getLogger("rdn.client")
    client_log.addHandler(retries)
    client_log.setLevel(logging.DEBUG)
    client_log.propagate = False  # counted, not printed
    tiff, jpeg = tiff_tile_bomb(), jpeg_bomb()
    cancel_me = upscale_pb2.UpscaleRequest(encoded=encode_png(photo(256)))
    huge_name = kserve_pb.ModelInferRequest(model_name="m" * 2**20)
    tally: Counter[str] = Counter()
    latencies: list[float] = []
    samples: list[tuple[float, float]] = []
    rng = random.Random(0)
    options = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
        ("grpc.max_send_message_length", 4 * MESSAGE_BYTES),
    ]
    target = f"127.0.0.1:{port}"
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS)
    async with (
        grpc.aio.insecure_channel(target, options=options) as channel,
        AsyncUpscaleClient(target, max_message_bytes=MESSAGE_BYTES, retry=policy) as client,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        start = time.monotonic()
        end = start + args.seconds

        async def loop(body: Callable[[int], Awaitable[None]]) -> None:
            k = 0
            while time.monotonic() < end:
                await body(k)
                k += 1

        async def valid(k: int) -> None:
            latencies.append(await valid_call(client, jobs[k % len(jobs)], tally))

        async def slow(k: int) -> None:
            call = stub.UpscaleStream(stalled_upload(), timeout=CALL_TIMEOUT_S)
            await expect(tally, "slow upload", grpc.StatusCode.DEADLINE_EXCEEDED, call.read())
            call.cancel()

        async def bombs(k: int) -> None:
            request = upscale_pb2.UpscaleRequest(encoded=tiff if k % 2 else jpeg)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if k % 2 else grpc.StatusCode.INVALID_ARGUMENT
            await expect(tally, "bomb", code, stub.Upscale(request, timeout=CALL_TIMEOUT_S))
            await asyncio.sleep(0.05)

        async def names(k: int) -> None:
            call = kserve.ModelInfer(huge_name, timeout=CALL_TIMEOUT_S)
            await expect(tally, "name flood", grpc.StatusCode.INVALID_ARGUMENT, call)
            await asyncio.sleep(0.05)

        async def cancels(k: int) -> None:
            call = stub.Upscale(cancel_me, timeout=CALL_TIMEOUT_S)
            await asyncio.sleep(rng.uniform(0, 0.3))
            call.cancel()
            try:
                await call
                tally["cancel finished first"] += 1
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                tally["cancelled"] += 1

        async def sample() -> None:
            while time.monotonic() < end:
                samples.append((time.monotonic() - start, rss_mib(process.pid)))
                emit_sample(samples[-1], tally)
                await asyncio.sleep(args.sample_every)

        await asyncio.gather(
            *(loop(valid) for _ in range(args.concurrency)),
            *(loop(slow) for _ in range(args.slow_uploads)),
            loop(bombs),
            loop(names),
            loop(cancels),
            sample(),
        )
        seconds = time.monotonic() - start
    samples.append((seconds, rss_mib(process.pid)))
    valid_total = sum(n for key, n in tally.items() if key.startswith("valid "))
    return {
        "bench": BENCH,
        "seconds": round(seconds, 1),
        "valid_requests": valid_total,
        "valid_ok": tally["valid OK"],
        "valid_retried": retries.count,
        "valid_answers": {k: n for k, n in sorted(tally.items()) if k.startswith("valid ")},
        "valid_latency_ms": {
            "p50": percentile_ms(latencies, 50),
            "p99": percentile_ms(latencies, 99),
        },
        "attacks": {key: n for key, n in sorted(tally.items()) if not key.startswith("valid")},
        "rss_mib": {
            "first": round(samples[0][1], 1),
            "peak": round(max(r for _, r in samples), 1),
            "last": round(samples[-1][1], 1),
            "limit": args.rss_limit_mib,
        },
    }


def emit_sample(sample: tuple[float, float], tally: Counter[str]) -> None:
    emit(
        {
            "bench": BENCH,
            "sample": True,
            "seconds": round(sample[0], 1),
            "rss_mib": round(sample[1], 1),
            "valid_ok": tally["valid OK"],
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    flags = [
        "--upload-idle-timeout", str(UPLOAD_IDLE_S), "--max-message-bytes", str(MESSAGE_BYTES),
    ]  # fmt: skip
    with bench_model(args.model) as model, serve_process(model, args, flags) as (process, port):
        summary = asyncio.run(run(args, process, port))
        summary["model"] = str(Path(model).name)
        summary["sigterm_exit_code"] = stop_server(process)
    met = (
        summary["valid_ok"] == summary["valid_requests"] > 0
        and summary["attacks"].get("unexpected attack answers", 0) == 0
        and summary["rss_mib"]["peak"] <= args.rss_limit_mib
        and summary["sigterm_exit_code"] == 0
    )
    summary["target_ratio"] = args.rss_limit_mib
    return emit_checked(summary, met)


if __name__ == "__main__":
    sys.exit(main())
