"""Prometheus metrics of a real server, scraped over HTTP and parsed with prometheus_client.

Every check compares counters before and after a bounded number of loopback calls, so the
module-scoped server can be shared by the tests in any order.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rdn.metadata import KEY_WEIGHTS_SHA256
from server.app import ServerStartError
from server.client import AsyncUpscaleClient, UpscaleClient, UpscaleError
from server.config import MetricsConfig, ServerConfig
from server.core.chunked import IN_FLIGHT, chunk_tiles
from server.core.engine import Engine
from server.main import build_parser, config_from_args
from server.ops.metrics import batch_size_bounds, cumulative_buckets, exposure_warning
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.gated import gated_server, until
from tests.server.loopback import MAX_BATCH, NO_RETRY, loopback_config

CALL_TIMEOUT = 60.0  # seconds: a broken server fails the test instead of hanging it
SCRAPE_TIMEOUT = 10.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


server_config = partial(loopback_config, metrics=MetricsConfig(port=0, host="127.0.0.1"))


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    return server_config(tiny_onnx_x2)


def metrics_port(bg: BackgroundServer) -> int:
    assert bg.running is not None and bg.running.metrics_endpoint is not None
    return bg.running.metrics_endpoint.port


def scrape(port: int) -> Samples:
    """(sample name, sorted labels) -> value, from one GET of /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not created yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_until(port: int, done: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + CALL_TIMEOUT
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


def photo(set5_dir: Path, height: int, width: int) -> np.ndarray:
    bgr = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[:height, :width])


# ------------------------------------------------------------------------- pure helpers


def test_batch_size_buckets() -> None:
    assert batch_size_bounds(1) == (1,)
    assert batch_size_bounds(8) == (1, 2, 4, 8)
    assert batch_size_bounds(6) == (1, 2, 4, 6)
    assert cumulative_buckets({4: 3, 2: 1}, (1, 2, 4)) == [
        ("1.0", 0),
        ("2.0", 1),
        ("4.0", 4),
        ("+Inf", 4),
    ]


def test_flags_map_onto_metrics_config(
    tiny_onnx_x2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parse = build_parser().parse_args
    assert config_from_args(parse(["--model", str(tiny_onnx_x2)])).metrics == MetricsConfig()
    on = parse(["--model", str(tiny_onnx_x2), "--metrics-port", "9100"])
    assert config_from_args(on).metrics == MetricsConfig(port=9100, host="127.0.0.1")
    host = parse(["--model", str(tiny_onnx_x2), "--metrics-port", "1", "--metrics-host", "::1"])
    assert config_from_args(host).metrics == MetricsConfig(port=1, host="::1")
    with pytest.raises(SystemExit) as refused:
        parse(["--metrics-port", "70000"])
    assert refused.value.code == 2
    assert "argument --metrics-port: must be 0..65535" in capsys.readouterr().err


# ----------------------------------------------------------------------- a real server


def test_requests_latencies_tiles_and_batches_are_counted(
    server: BackgroundServer, client: UpscaleClient, engine: Engine, set5_dir: Path
) -> None:
    port = metrics_port(server)
    image = photo(set5_dir, 40, 70)  # 2 x 3 tiles of 32: 6 tiles, batches of 4 + 2
    before = scrape(port)
    for i in range(3):
        assert client.upscale(image, "raw", request_id=f"m{i}", timeout=CALL_TIMEOUT).tiles == 6
    with pytest.raises(UpscaleError):
        client.upscale(b"not an image at all", request_id="bad", timeout=CALL_TIMEOUT)
    client.info(timeout=CALL_TIMEOUT)

    after = scrape_until(
        port,
        lambda s: (
            delta(
                before, s, "rdn_requests_total", protocol="grpc", method="GetModelInfo", code="OK"
            )
            > 0
        ),
    )
    ok = {"protocol": "grpc", "method": "Upscale", "code": "OK"}
    assert delta(before, after, "rdn_requests_total", **ok) == 3
    bad = {"protocol": "grpc", "method": "Upscale", "code": "INVALID_ARGUMENT"}
    assert delta(before, after, "rdn_requests_total", **bad) == 1
    assert (
        delta(
            before, after, "rdn_requests_total", protocol="grpc", method="GetModelInfo", code="OK"
        )
        == 1
    )
    assert delta(before, after, "rdn_tiles_computed_total") == 18
    assert delta(before, after, "rdn_engine_calls_total") == 6  # 3 x ceil(6 / max batch 4)

    # Batch sizes: 6 calls carrying 18 tiles, three of them full (4) and three of 2.
    assert delta(before, after, "rdn_batch_size_count") == 6
    assert delta(before, after, "rdn_batch_size_sum") == 18
    assert delta(before, after, "rdn_batch_size_bucket", le="1.0") == 0
    assert delta(before, after, "rdn_batch_size_bucket", le="2.0") == 3
    assert delta(before, after, "rdn_batch_size_bucket", le="4.0") == 6

    # Queue and compute only for requests that reached the batcher; total for every call.
    for name in ("rdn_request_queue_seconds", "rdn_request_compute_seconds"):
        assert delta(before, after, f"{name}_count", method="Upscale") == 3
    duration = "rdn_request_duration_seconds"
    assert delta(before, after, f"{duration}_count", method="Upscale") == 4
    assert delta(before, after, f"{duration}_bucket", method="Upscale", le="+Inf") == 4
    assert delta(before, after, f"{duration}_count", method="GetModelInfo") == 1
    # Sequential calls: each request's compute is exactly the engine time of its batches.
    engine_s = delta(before, after, "rdn_engine_seconds_total")
    compute_s = delta(before, after, "rdn_request_compute_seconds_sum", method="Upscale")
    assert engine_s > 0
    assert compute_s == pytest.approx(engine_s, abs=1e-4)  # access records round to 10 us
    assert delta(before, after, f"{duration}_sum", method="Upscale") >= compute_s

    # At rest: nothing queued, pending or in flight.
    assert value(after, "rdn_queue_tiles") == 0
    assert value(after, "rdn_pending_requests") == 0
    assert value(after, "rdn_inflight_requests") == 0
    assert value(after, "rdn_queue_capacity_tiles") == 4096
    for gauge in ("rdn_queue_reserved_tiles", "rdn_request_bytes_held", "rdn_uploads_in_progress"):
        assert after[(gauge, ())] == 0
    info = {
        "model": "rdn_x2",
        "provider": "CPUExecutionProvider",
        "scale": "2",
        "precision": "float32",
        "weights_sha256": engine.metadata[KEY_WEIGHTS_SHA256],
    }
    assert len(info["weights_sha256"]) == 64
    assert value(after, "rdn_model_info", **info) == 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_inflight_request_is_visible_while_its_upload_is_open(server: BackgroundServer) -> None:
    port = metrics_port(server)
    release = threading.Event()

    def upload() -> Iterator[upscale_pb2.UpscaleChunk]:
        header = upscale_pb2.UpscaleStreamHeader(total_bytes=10, request_id="held")
        yield upscale_pb2.UpscaleChunk(header=header)
        release.wait(CALL_TIMEOUT)  # the server sits in the upload until we let go
        yield upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=0, data=b"0123456789"))

    # A raw stub: the client would send the whole upload at once.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = upscale_pb2_grpc.UpscalerStub(channel).UpscaleStream(upload(), timeout=CALL_TIMEOUT)
        try:
            during = scrape_until(port, lambda s: value(s, "rdn_inflight_requests") == 1)
            assert value(during, "rdn_inflight_requests") == 1
        finally:
            release.set()
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # ten digits are no image
    after = scrape_until(port, lambda s: value(s, "rdn_inflight_requests") == 0)
    assert value(after, "rdn_inflight_requests") == 0


def test_cancelled_request_counts_dropped_tiles(
    tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    """A stream cancelled while the engine is held on its first batch: the tiles queued behind
    it are counted as dropped, the held batch as computed."""
    image = photo(set5_dir, 400, 400)  # 13 x 13 = 169 tiles
    # The image travels in chunks of chunk_tiles() tiles, IN_FLIGHT of them queued at once; the
    # held first batch keeps the first chunk from finishing, so no later chunk is submitted.
    submitted = IN_FLIGHT * chunk_tiles(MAX_BATCH)
    with gated_server(server_config(tiny_onnx_x2), engine) as (bg, gated):
        port, batcher = metrics_port(bg), bg.running.batcher
        before = scrape(port)

        async def cancel_mid_flight() -> None:
            async with AsyncUpscaleClient(f"127.0.0.1:{bg.port}", retry=NO_RETRY) as c:
                call = c.upscale(image, "raw", timeout=CALL_TIMEOUT, stream=True)
                task = asyncio.ensure_future(call)
                while not (gated.calls and batcher.queued_tiles == submitted - MAX_BATCH):
                    await asyncio.sleep(0.002)  # bounded by bg.call's timeout
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        bg.call(cancel_mid_flight(), timeout=CALL_TIMEOUT)
        until(lambda: batcher.tiles_dropped == submitted - MAX_BATCH, "the queued tiles dropped")
        gated.gate.set()
        until(lambda: batcher.tiles_computed == MAX_BATCH, "the held batch to finish")
        cancelled = {"protocol": "grpc", "method": "UpscaleStream", "code": "CANCELLED"}
        after = scrape_until(
            port, lambda s: delta(before, s, "rdn_requests_total", **cancelled) == 1
        )
        assert gated.calls == [MAX_BATCH]
    assert delta(before, after, "rdn_requests_total", **cancelled) == 1
    assert delta(before, after, "rdn_tiles_dropped_total") == submitted - MAX_BATCH
    assert delta(before, after, "rdn_tiles_computed_total") == MAX_BATCH
    assert value(after, "rdn_tiles_dropped_total") == batcher.tiles_dropped


def test_each_server_has_its_own_registry(
    server: BackgroundServer, tiny_onnx_x2: Path, engine: Engine, set5_dir: Path
) -> None:
    first = scrape(metrics_port(server))
    with (
        BackgroundServer(server_config(tiny_onnx_x2), engine) as other,
        UpscaleClient(f"127.0.0.1:{other.port}", retry=NO_RETRY) as c,
    ):
        assert metrics_port(other) != metrics_port(server)
        c.upscale(photo(set5_dir, 20, 20), "raw", timeout=CALL_TIMEOUT)
        ok = {"protocol": "grpc", "method": "Upscale", "code": "OK"}
        mine = scrape_until(metrics_port(other), lambda s: value(s, "rdn_requests_total", **ok) > 0)
        assert value(mine, "rdn_requests_total", **ok) == 1
        assert value(mine, "rdn_tiles_computed_total") == 1
    assert delta(first, scrape(metrics_port(server)), "rdn_requests_total", **ok) == 0


def test_metrics_off_by_default_and_a_taken_port_is_a_start_error(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    with BackgroundServer(server_config(tiny_onnx_x2, metrics=MetricsConfig()), engine) as bg:
        assert bg.running is not None and bg.running.metrics_endpoint is None
        assert bg.running.metrics is None
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = MetricsConfig(port=held.getsockname()[1], host="127.0.0.1")
        unexpected = BackgroundServer(server_config(tiny_onnx_x2, metrics=taken), engine)
        try:
            with pytest.raises(ServerStartError, match=r"cannot serve metrics on 127\.0\.0\.1"):
                unexpected.start()
        finally:
            unexpected.stop()  # a server that started after all must not outlive the test


def test_only_metrics_answers_and_idle_connections_are_closed(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    """Any path answered with the metrics, and an idle connection held a thread forever."""
    quick = MetricsConfig(port=0, idle_timeout_s=0.5)
    with BackgroundServer(server_config(tiny_onnx_x2, metrics=quick), engine) as bg:
        port = metrics_port(bg)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=SCRAPE_TIMEOUT)
        assert missing.value.code == 404
        assert b"metrics are at /metrics" in missing.value.read()
        assert "rdn_engine_calls_total" in {name for name, _ in scrape(port)}
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # the server closed the silent connection
            assert time.monotonic() - started < 0.5 + 5.0


def test_metrics_stay_on_loopback_unless_told_and_exposure_is_warned() -> None:
    assert MetricsConfig().host == "127.0.0.1"
    exposed = MetricsConfig(port=9100, host="0.0.0.0")
    warning = exposure_warning(exposed, protected=True)
    assert warning is not None and "plain HTTP without auth" in warning
    assert exposure_warning(exposed, protected=False) is None
    for local in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(MetricsConfig(port=9100, host=local), protected=True) is None
    assert exposure_warning(MetricsConfig(host="0.0.0.0"), protected=True) is None  # port off


def test_held_upload_bytes_are_visible_while_an_upload_waits(
    server: BackgroundServer,
) -> None:
    release = threading.Event()

    def stalled() -> Iterator[upscale_pb2.UpscaleChunk]:
        header = upscale_pb2.UpscaleStreamHeader(total_bytes=123_456, request_id="stalled")
        yield upscale_pb2.UpscaleChunk(header=header)
        release.wait(CALL_TIMEOUT)

    port = metrics_port(server)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = upscale_pb2_grpc.UpscalerStub(channel).UpscaleStream(stalled(), timeout=60)
        try:
            held = scrape_until(port, lambda s: value(s, "rdn_uploads_in_progress") == 1)
            assert value(held, "rdn_request_bytes_held") == 123_456
        finally:
            release.set()
        with pytest.raises(grpc.RpcError):
            list(call)  # the stream ended before its data: INVALID_ARGUMENT
    rest = scrape_until(port, lambda s: value(s, "rdn_uploads_in_progress") == 0)
    assert value(rest, "rdn_request_bytes_held") == 0
