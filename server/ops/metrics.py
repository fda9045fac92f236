"""Prometheus metrics for ``rdn-serve``: one registry per server, scraped over HTTP.

Request counts and latencies come from the service's access records (``ServerMetrics`` is the
``AccessObserver`` of ``server.core.access``), so a log line and the metrics always describe the
same calls, rejected ones included. Batcher and engine numbers are read from the batcher's
counters when Prometheus scrapes (``BatcherCollector``): nothing in the batching loop is
instrumented. Every server owns its ``CollectorRegistry``, so several servers in one process
(tests, benchmarks) never share or clash over a metric.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rdn.metadata import ModelMetadata
from server.config import BatcherConfig, MetricsConfig
from server.core.access import AccessRecord
from server.pb.rdn.v1 import upscale_pb2

NAMESPACE = "rdn"
# Seconds: a tiny-model tile takes ~1 ms on CPU, a 4096x4096 paper-model image minutes.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
METHODS = tuple(m.name for m in upscale_pb2.DESCRIPTOR.services_by_name["Upscaler"].methods)
STOP_TIMEOUT_S = 5.0  # longest wait for the HTTP thread to end
METRICS_PATH = "/metrics"
log = logging.getLogger(__name__)


class BatcherStats(Protocol):
    """The read-only counters of ``server.core.batcher.TileBatcher`` that are exported."""

    @property
    def config(self) -> BatcherConfig: ...
    @property
    def batch_sizes(self) -> dict[int, int]: ...
    @property
    def tiles_computed(self) -> int: ...
    @property
    def tiles_dropped(self) -> int: ...
    @property
    def engine_calls(self) -> int: ...
    @property
    def engine_seconds(self) -> float: ...
    @property
    def engine_failures(self) -> int: ...
    @property
    def queued_tiles(self) -> int: ...
    @property
    def reserved_tiles(self) -> int: ...
    @property
    def pending_requests(self) -> int: ...


class UploadStats(Protocol):
    """The read-only counters of ``server.core.uploads.UploadBudget`` that are exported."""

    @property
    def held_bytes(self) -> int: ...
    @property
    def uploads(self) -> int: ...


class ModelSource(Protocol):
    """What the info metric needs from the engine (``server.core.engine.Engine`` is one)."""

    scale: int
    active_provider: str


class ServedModel(Protocol):
    """A served model (``server.core.pipeline.Pipeline`` is one)."""

    name: str
    engine: ModelSource
    metadata: ModelMetadata | None  # parsed once when the model was opened


# ------------------------------------------------------------------------- pure helpers


def model_labels(model: ServedModel) -> dict[str, str]:
    """Labels of ``rdn_model_info``: what is being served, on which execution provider."""
    engine, meta = model.engine, model.metadata
    return {
        "model": model.name,
        "provider": engine.active_provider,
        "scale": str(engine.scale),
        "precision": meta.precision if meta else "float32",
        "weights_sha256": meta.weights_sha256 if meta else "",
    }


def batch_size_bounds(max_batch: int) -> tuple[int, ...]:
    """Histogram bucket bounds for batch sizes: the powers of two below ``max_batch``, then
    ``max_batch`` itself, so "how often was the batch full" is one bucket."""
    bounds = []
    bound = 1
    while bound < max_batch:
        bounds.append(bound)
        bound *= 2
    return (*bounds, max_batch)


def cumulative_buckets(counts: Mapping[int, int], bounds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Prometheus ``le`` buckets (cumulative, ``+Inf`` last) from value -> occurrences."""
    buckets = [(floatToGoString(b), sum(n for v, n in counts.items() if v <= b)) for b in bounds]
    return [*buckets, ("+Inf", sum(counts.values()))]


# --------------------------------------------------------------------------- collectors


class BatcherCollector(Collector):
    """Reads the batcher's counters and the model's identity each time Prometheus scrapes.

    Runs in the HTTP thread; every value read is a plain int / float or a dict copy made in
    one C call, so no lock is needed against the event loop that updates them.
    """

    def __init__(self, batcher: BatcherStats, models: Callable[[], Iterable[ServedModel]]) -> None:
        self._batcher = batcher
        self._models = models
        self._bounds = batch_size_bounds(batcher.config.max_batch)

    def collect(self) -> Iterator[Metric]:
        b = self._batcher
        sizes = b.batch_sizes
        batch = HistogramMetricFamily(
            f"{NAMESPACE}_batch_size", "Tiles per engine call (cross-request batches)."
        )
        batch.add_metric(
            [], cumulative_buckets(sizes, self._bounds), float(sum(v * n for v, n in sizes.items()))
        )
        yield batch
        yield _counter("tiles_computed", "Tiles run through the engine.", b.tiles_computed)
        yield _counter(
            "tiles_dropped",
            "Tiles dropped before reaching the engine (request cancelled or failed).",
            b.tiles_dropped,
        )
        yield _counter("engine_calls", "Engine calls (batches run).", b.engine_calls)
        yield _counter("engine_seconds", "Wall time spent in engine calls.", b.engine_seconds)
        yield _counter(
            "engine_failures",
            "Engine calls that raised (each failed its batch).",
            b.engine_failures,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_tiles", "Tiles accepted but not yet in a batch.", b.queued_tiles
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_reserved_tiles",
            "Tiles admitted requests hold in reserve, not yet queued.",
            b.reserved_tiles,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_capacity_tiles",
            "Queued tiles beyond which requests are refused (--max-queue-tiles).",
            b.config.max_queue_tiles,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_pending_requests",
            "Requests with tiles waiting for a batch.",
            b.pending_requests,
        )
        info = InfoMetricFamily(f"{NAMESPACE}_model", "A served model and its execution provider.")
        for model in self._models():
            info.add_metric([], model_labels(model))
        yield info


class UploadCollector(Collector):
    """Request bytes held and uploads in progress (``--max-buffered-bytes``, ``--max-uploads``)."""

    def __init__(self, uploads: UploadStats) -> None:
        self._uploads = uploads

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{NAMESPACE}_request_bytes_held",
            "Request bytes reserved by calls in flight.",
            self._uploads.held_bytes,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_uploads_in_progress",
            "UpscaleStream uploads being received.",
            self._uploads.uploads,
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NAMESPACE}_{name}", documentation, value=value)


class ServerMetrics:
    """The metrics of one server: request metrics fed by access records, the rest at scrape.

    ``started`` / ``finished`` make it a ``server.core.access.AccessObserver``.
    """

    def __init__(
        self,
        batcher: BatcherStats,
        models: Callable[[], Iterable[ServedModel]],
        uploads: UploadStats | None = None,
    ) -> None:
        """``models`` lists the models served at the moment of a scrape."""
        self.registry = CollectorRegistry()
        self._requests = Counter(
            f"{NAMESPACE}_requests_total",
            "Finished calls by protocol (grpc, http), method and gRPC status code.",
            ["protocol", "method", "code"],
            registry=self.registry,
        )
        self._model_requests = Counter(
            f"{NAMESPACE}_model_requests_total",
            "Finished calls that ran (or named) a model, by model and gRPC status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self._model_compute = Counter(
            f"{NAMESPACE}_model_compute_seconds",
            "Engine time of the batches that carried a model's requests.",
            ["model"],
            registry=self.registry,
        )
        self._inflight = Gauge(
            f"{NAMESPACE}_inflight_requests",
            "Calls being handled now.",
            registry=self.registry,
        )
        self._queue = self._histogram("request_queue_seconds", "Submit to first tile dispatched.")
        self._compute = self._histogram(
            "request_compute_seconds", "Engine time of the batches that carried a request's tiles."
        )
        self._total = self._histogram(
            "request_duration_seconds", "Whole call, as the server saw it (any status)."
        )
        self._image_pixels = Counter(
            f"{NAMESPACE}_image_pixels",
            "LR pixels of the images of computed requests.",
            ["method"],
            registry=self.registry,
        )
        self._computed_pixels = Counter(
            f"{NAMESPACE}_computed_pixels",
            "LR pixels the model computed for them (tiles with their context); the ratio of the "
            "two is the tiling's waste.",
            ["method"],
            registry=self.registry,
        )
        for method in METHODS:  # series exist from the start, so rate() works from zero
            self._requests.labels("grpc", method, "OK")
            self._total.labels(method)
        self.registry.register(BatcherCollector(batcher, models))
        if uploads is not None:
            self.registry.register(UploadCollector(uploads))
        ProcessCollector(registry=self.registry)  # CPU, memory, open fds of this process

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            f"{NAMESPACE}_{name}",
            documentation,
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    # -- AccessObserver -------------------------------------------------------------------
    def started(self, record: AccessRecord) -> None:
        self._inflight.inc()

    def finished(self, record: AccessRecord) -> None:
        self._inflight.dec()
        fields = record.fields
        protocol = str(fields.get("protocol", "grpc"))
        self._requests.labels(protocol, record.method, str(fields["status"])).inc()
        self._total.labels(record.method).observe(fields["total_ms"] / 1e3)
        model = fields.get("model")
        if isinstance(model, str) and model:
            self._model_requests.labels(model, str(fields["status"])).inc()
            if "compute_ms" in fields:
                self._model_compute.labels(model).inc(fields["compute_ms"] / 1e3)
        if "queue_ms" in fields:  # the request reached the batcher and got its tiles back
            self._queue.labels(record.method).observe(fields["queue_ms"] / 1e3)
            self._compute.labels(record.method).observe(fields["compute_ms"] / 1e3)
            self._image_pixels.labels(record.method).inc(fields["image_pixels"])
            self._computed_pixels.labels(record.method).inc(fields["computed_pixels"])

    # -- exposition -----------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (what ``/metrics`` answers)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, idle_timeout_s: float = 10.0) -> MetricsEndpoint:
        """Answer scrapes of ``/metrics`` over HTTP on ``host:port`` (0 = any free port), each
        connection in a daemon thread that ends after ``idle_timeout_s`` of silence.

        Raises ``OSError`` when the address cannot be bound.
        """
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_MetricsServer", (_MetricsServer,), {"address_family": family})
        handler = type("_Handler", (_QuietHandler,), {"timeout": idle_timeout_s})
        server = make_server(
            host, port, only_metrics(make_wsgi_app(self.registry)), server_class, handler
        )
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return MetricsEndpoint(server, thread)


_StartResponse = Callable[..., Any]
_WsgiApp = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


def only_metrics(app: _WsgiApp) -> _WsgiApp:
    """``app`` at METRICS_PATH; 404 for every other path."""

    def wrapped(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found; metrics are at {METRICS_PATH}\n".encode()]

    return wrapped


class _QuietHandler(WSGIRequestHandler):
    """No stderr line per scrape; ``timeout`` (set per server) ends a silent connection."""

    def log_message(self, format: str, *args: Any) -> None:  # no stderr line per scrape
        pass


class _MetricsServer(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics connection from %s ended with an error", client_address)


def exposure_warning(metrics: MetricsConfig, protected: bool) -> str | None:
    """The warning for metrics served beyond this machine while gRPC is protected (TLS or a
    token): /metrics is plain HTTP without auth. None when there is nothing to warn about."""
    if metrics.port is None or not protected or is_loopback(metrics.host):
        return None
    return (
        f"metrics on {metrics.host} are plain HTTP without auth while gRPC uses TLS or a token; "
        "anyone who reaches that address reads them (--metrics-host 127.0.0.1 keeps them on "
        "this machine)"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsEndpoint:
    """A running ``/metrics`` HTTP server; ``close`` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT_S)


# ------------------------------------------------------------------------- command line


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 = no metrics endpoint), got {value}")
    return value


def add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    """rdn-serve's Prometheus flags."""
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=0,
        help="serve Prometheus metrics over HTTP at /metrics on this port; 0 = off",
    )
    group.add_argument(
        "--metrics-host",
        default=MetricsConfig().host,
        help="address for --metrics-port; metrics are plain HTTP without auth, so expose them "
        "beyond this machine only on a trusted network",
    )


def metrics_config_from_args(args: argparse.Namespace) -> MetricsConfig:
    return MetricsConfig(port=args.metrics_port or None, host=args.metrics_host)
