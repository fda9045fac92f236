"""A mixed soak of a real ``rdn-serve`` process, gRPC and HTTP: valid clients beside attackers.

Valid gRPC requests (the load benchmark's mix: PNG, JPEG, WebP, raw, RGBA, grey, streamed) go
through ``AsyncUpscaleClient`` at ``--concurrency`` calls in flight; valid HTTP requests
(``POST /v1/upscale`` with PNG and JPEG, KServe v2 REST infer with JSON and binary tensors,
tests/bench/soak_http.py) at ``--http-concurrency``. Every answer must have the right size and
be identical to the one the idle server gave the same request before the soak began.
Transient refusals (RESOURCE_EXHAUSTED with the retry hint; HTTP 429 / 503 with Retry-After)
are retried, as rdn-client does, and counted. Beside them, for the whole run, on gRPC:

- slow uploads: stream headers announcing 4 MiB that send one chunk and then stall, until
  the server's upload idle timeout ends them;
- TIFF bombs (a 16x16 image in one 16384x16368 Deflate tile) and JPEG bombs (4096x4096
  declared, the scan cut after a few bytes), which must be refused;
- name floods: KServe ModelInfer calls with a 1 MiB model name;
- cancels: valid 256x256 requests cancelled after a random 0-300 ms;

and on HTTP: abandoned uploads, gzip bodies, oversized and deeply nested JSON, ``--slow-heads``
unfinished request heads at a time, cross-site POSTs and malformed query options, each of
which has one right answer (tests/bench/soak_http.py).

The server's RSS is sampled every ``--sample-every`` seconds (a progress line every 5 s). The
run fails (exit 1) if any valid request was not answered correctly, an attack got any other
answer than its own, the RSS went over ``--rss-limit-mib`` in any sample, its trend rose faster
than ``--rss-trend-limit``, the server's log holds a traceback, or SIGTERM did not exit 0.

The trend is the least-squares slope of the RSS over the second half of the run, so that the
first minutes' growth (onnxruntime's arena, the allocator's pools) is not counted. Its bound,
5 MiB/min by default, is what a leak of 1 KiB per request would exceed: this soak sends ~120
requests/s on two busy cores (7 MiB/min at 1 KiB each). The RSS swings by +-40 MiB from one
second to the next as requests come and go, which gives the slope a standard error (reported)
of about 1 MiB/min over a 10-minute run's second half but about 10 MiB/min over a 2-minute
run's (a 2-minute run fitted 21 +- 20 MiB/min on flat samples). So the run fails when the slope
is over the bound by more than two standard errors: an upward trend that the samples establish,
not the swing of a few samples; in a 10-minute run, a slope over about 7 MiB/min.

    python -m tests.bench.hostile_soak --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
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
from tests.bench.soak_http import HttpAttacks, HttpDoor, http_answer, http_valid_mix
from tests.server.doors.test_hostile import tiff_tile_bomb

BENCH = "hostile_soak"
UPLOAD_IDLE_S = 5.0  # rdn-serve --upload-idle-timeout for this run
HTTP_IDLE_S = 5.0  # rdn-serve --http-idle-timeout for this run: slow heads end after it
SLOW_UPLOAD_BYTES = 4 * 2**20
MAX_ATTEMPTS = 50  # per valid request: transient refusals are retried, as rdn-client does
RSS_TREND_LIMIT = 5.0  # MiB/minute over the second half of the run (see the docstring)
TREND_ERRORS = 2.0  # a trend fails the run when over its limit by this many standard errors
PROGRESS_EVERY_S = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m tests.bench.{BENCH}", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--seconds", type=float, default=None, help="run time (600; quick 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="valid gRPC calls in flight")
    parser.add_argument(
        "--http-concurrency", type=int, default=4, help="valid HTTP calls in flight"
    )
    parser.add_argument("--slow-uploads", type=int, default=8, help="stalled uploads at a time")
    parser.add_argument("--slow-heads", type=int, default=4, help="unfinished HTTP heads at a time")
    parser.add_argument("--sample-every", type=float, default=1.0, help="RSS sampling, s")
    parser.add_argument("--rss-limit-mib", type=float, default=1536.0, help="target bound")
    parser.add_argument(
        "--rss-trend-limit",
        type=float,
        default=RSS_TREND_LIMIT,
        help="target bound of the RSS trend over the second half of the run, MiB/minute "
        f"(missed when the trend is over it by more than {TREND_ERRORS:g} standard errors)",
    )
    parser.add_argument(
        "--log", type=Path, default=None, help="keep the server's log here (default: temporary)"
    )
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


async def grpc_answer(client: AsyncUpscaleClient, job: Valid) -> bytes | str:
    """One valid request, retried by the client on transient refusals: the answer's image,
    or what went wrong (a status code's name, ``WRONG_SIZE``)."""
    try:
        result = await client.upscale(
            job.image, job.fmt, job.quality, timeout=CALL_TIMEOUT_S, stream=job.stream
        )
    except UpscaleError as e:
        return e.code.name
    right = (result.width, result.height, result.channels) == job.answer
    return result.image if right else "WRONG_SIZE"


def judge(tally: Counter[str], door: str, answer: bytes | str, reference: bytes | str) -> None:
    """Count a valid answer: OK when it is the idle server's answer, else what it was."""
    if isinstance(answer, str):
        tally[f"valid {door} {answer}"] += 1
    elif answer != reference:
        tally[f"valid {door} DIFFERS_FROM_IDLE_ANSWER"] += 1
    else:
        tally[f"valid {door} OK"] += 1


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


def rss_trend(samples: list[tuple[float, float]]) -> tuple[float, float | None]:
    """The least-squares slope of the samples (seconds, MiB) of the run's second half and its
    standard error, MiB/minute (0 and None: fewer than three samples, no trend to fit)."""
    half = samples[-1][0] / 2
    second = np.array([(t / 60, rss) for t, rss in samples if t >= half])
    if len(second) < 3:
        return 0.0, None
    minutes, rss = second[:, 0] - second[:, 0].mean(), second[:, 1]
    spread = float(np.sum(minutes**2))
    slope = float(np.sum(minutes * (rss - rss.mean())) / spread)
    residuals = rss - rss.mean() - slope * minutes
    return slope, math.sqrt(float(np.sum(residuals**2)) / (len(second) - 2) / spread)


async def run(
    args: argparse.Namespace, process: subprocess.Popen[bytes], port: int, http_port: int
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
    http_retried: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {"grpc": [], "http": []}
    samples: list[tuple[float, float]] = []
    rng = random.Random(0)
    options = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
        ("grpc.max_send_message_length", 4 * MESSAGE_BYTES),
    ]
    target = f"127.0.0.1:{port}"
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS)
    connector = aiohttp.TCPConnector(limit=0)  # the loops bound the connections
    async with (
        grpc.aio.insecure_channel(target, options=options) as channel,
        AsyncUpscaleClient(target, max_message_bytes=MESSAGE_BYTES, retry=policy) as client,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        door = await http_door(session, http_port)
        http_jobs = http_valid_mix(door.model, scale=2)
        # The idle server's answers, which every answer of the soak must equal.
        grpc_refs = [await grpc_answer(client, job) for job in jobs]
        http_refs = [await http_answer(door, job, http_retried) for job in http_jobs]
        failed = [
            name
            for name, ref in [
                *((f"grpc {j.fmt}", r) for j, r in zip(jobs, grpc_refs, strict=True)),
                *((j.name, r) for j, r in zip(http_jobs, http_refs, strict=True)),
            ]
            if isinstance(ref, str)
        ]
        if failed:
            raise RuntimeError(f"the idle server did not answer {failed} correctly")
        attacks = HttpAttacks(door, tally, HTTP_IDLE_S, UPLOAD_IDLE_S)
        start = time.monotonic()
        end = start + args.seconds

        async def loop(body: Callable[[int], Awaitable[None]]) -> None:
            k = 0
            while time.monotonic() < end:
                await body(k)
                k += 1

        async def valid(k: int) -> None:
            i = k % len(jobs)
            began = time.perf_counter()
            judge(tally, "grpc", await grpc_answer(client, jobs[i]), grpc_refs[i])
            latencies["grpc"].append(time.perf_counter() - began)

        async def valid_http(k: int) -> None:
            i = k % len(http_jobs)
            began = time.perf_counter()
            answer = await http_answer(door, http_jobs[i], http_retried)
            judge(tally, "http", answer, http_refs[i])
            latencies["http"].append(time.perf_counter() - began)

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
                await asyncio.sleep(args.sample_every)

        async def progress() -> None:
            while time.monotonic() < end:
                if samples:
                    emit_sample(samples[-1], tally)
                await asyncio.sleep(PROGRESS_EVERY_S)

        await asyncio.gather(
            *(loop(valid) for _ in range(args.concurrency)),
            *(loop(valid_http) for _ in range(args.http_concurrency)),
            *(loop(slow) for _ in range(args.slow_uploads)),
            loop(bombs),
            loop(names),
            loop(cancels),
            *(loop(attacks.slow_head) for _ in range(args.slow_heads)),
            loop(attacks.abandoned_upload),
            loop(attacks.gzip_body),
            loop(attacks.bad_json),
            loop(attacks.cross_site),
            loop(attacks.malformed_query),
            sample(),
            progress(),
        )
        seconds = time.monotonic() - start
    samples.append((seconds, rss_mib(process.pid)))
    trend, trend_error = rss_trend(samples)
    valid = {
        k.removeprefix("valid "): n for k, n in sorted(tally.items()) if k.startswith("valid ")
    }
    return {
        "bench": BENCH,
        "seconds": round(seconds, 1),
        "valid_requests": sum(valid.values()),
        "valid_ok": sum(n for k, n in valid.items() if k.endswith(" OK")),
        "valid_retried": {"grpc": retries.count, "http": http_retried["http"]},
        "valid_answers": valid,
        "valid_latency_ms": {
            door: {"p50": percentile_ms(values, 50), "p99": percentile_ms(values, 99)}
            for door, values in latencies.items()
            if values
        },
        "attacks": {key: n for key, n in sorted(tally.items()) if not key.startswith("valid")},
        "rss_mib": {
            "start": round(samples[0][1], 1),
            "peak": round(max(r for _, r in samples), 1),
            "end": round(samples[-1][1], 1),
            "limit": args.rss_limit_mib,
            "trend_mib_per_min": round(trend, 2),
            "trend_standard_error": None if trend_error is None else round(trend_error, 2),
            "trend_limit": args.rss_trend_limit,
            "samples": len(samples),
        },
    }


async def http_door(session: aiohttp.ClientSession, port: int) -> HttpDoor:
    """The HTTP door on ``port`` and the server's default model (``GET /v1/models``)."""
    async with session.get(f"http://127.0.0.1:{port}/v1/models") as answer:
        models = (await answer.json())["models"]
    (model,) = [m["name"] for m in models if m["server_default"]]
    return HttpDoor(session, "127.0.0.1", port, model)


def emit_sample(sample: tuple[float, float], tally: Counter[str]) -> None:
    emit(
        {
            "bench": BENCH,
            "sample": True,
            "seconds": round(sample[0], 1),
            "rss_mib": round(sample[1], 1),
            "valid_ok": tally["valid grpc OK"] + tally["valid http OK"],
        }
    )


def free_port() -> int:
    """A loopback port free now (``--http-port 0`` turns the HTTP door off)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tracebacks(log: Path) -> tuple[int, str]:
    """The number of "Traceback" lines in the server's log, and the first one's text."""
    text = log.read_text(errors="replace")
    count = sum("Traceback" in line for line in text.splitlines())
    first = text.find("Traceback")
    return count, "" if first < 0 else text[max(0, first - 300) : first + 3000]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    http_port = free_port()
    flags = [
        "--upload-idle-timeout", str(UPLOAD_IDLE_S), "--max-message-bytes", str(MESSAGE_BYTES),
        "--http-port", str(http_port), "--http-host", "127.0.0.1",
        "--http-idle-timeout", str(HTTP_IDLE_S),
    ]  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="rdn-soak-") as folder,
        bench_model(args.model) as model,
    ):
        log = args.log if args.log is not None else Path(folder) / "serve.log"
        with serve_process(model, args, flags, log) as (process, port):
            bound = re.search(r"HTTP on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if bound is None or int(bound.group(1)) != http_port:
                raise RuntimeError(f"rdn-serve did not report HTTP on 127.0.0.1:{http_port}")
            summary = asyncio.run(run(args, process, port, http_port))
            summary["model"] = str(Path(model).name)
            summary["sigterm_exit_code"] = stop_server(process)
        summary["log_tracebacks"], first = tracebacks(log)
        summary["log_lines"] = len(log.read_text(errors="replace").splitlines())
    if first:
        logging.getLogger("bench").error("the first traceback of the server's log:\n%s", first)
    rss = summary["rss_mib"]
    met = (
        summary["valid_ok"] == summary["valid_requests"] > 0
        and summary["attacks"].get("unexpected attack answers", 0) == 0
        and rss["peak"] <= args.rss_limit_mib
        and rss["trend_mib_per_min"] - TREND_ERRORS * (rss["trend_standard_error"] or 0.0)
        <= args.rss_trend_limit
        and summary["log_tracebacks"] == 0
        and summary["sigterm_exit_code"] == 0
    )
    return emit_checked(summary, met)


if __name__ == "__main__":
    sys.exit(main())
