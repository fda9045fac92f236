"""``rdn-serve``: the gRPC super-resolution server.

Start-up order: logging; the model (a missing or corrupt file ends the process with one line
before any port is bound); bind; health NOT_SERVING (Upscale and ModelInfer answer
UNAVAILABLE); warm-up of every batch size; health SERVING; one "listening on HOST:PORT" line.
SIGTERM / SIGINT: health NOT_SERVING (Watch streams end), new calls refused with UNAVAILABLE,
in-flight calls given ``--grace`` seconds, batcher drained, exit 0. A signal during start-up
stops it and exits 0 as well.

``build_server`` runs the same server inside any event loop, for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from export.metadata import INT8_MAX_LOSS_DB, MetadataError
from server.auth import auth_interceptors
from server.batcher import TileBatcher
from server.chunked import chunk_tiles
from server.config import (
    BatcherConfig,
    EngineConfig,
    HttpLimitsConfig,
    LimitsConfig,
    ServerConfig,
    TilingConfig,
    UploadConfig,
)
from server.cross_site import add_http_flags, cross_site_config_from_args, http_bind_host
from server.cross_site import exposure_warning as http_exposure_warning
from server.engine import CUDA, SWITCHES, Engine, ModelLoadError
from server.health import NOT_SERVING, SERVING, Health
from server.http_door import HttpFrontDoor, server_ssl_context
from server.http_limits import raise_open_file_limit
from server.kserve import KServeService
from server.logging_setup import LEVELS, configure_logging
from server.memory import pin_mmap_threshold
from server.metrics import (
    MetricsEndpoint,
    ServerMetrics,
    add_metrics_flags,
    exposure_warning,
    metrics_config_from_args,
)
from server.models import MODELS_DIR, SCALES
from server.parse_guard import ParseGuard
from server.pb.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.pipeline import Pipeline, PipelineSettings
from server.planner import MODES, Planner, make_planner
from server.repository import ModelRepository, RepositoryConfig, RepositoryError, Snapshot
from server.security import (
    SecurityError,
    add_port,
    add_security_flags,
    describe,
    security_config_from_args,
)
from server.service import UpscalerService
from server.serving import ServingCore
from server.uploads import UploadBudget
from server.wire import HTTP2_MAX_FRAME_BYTES, SERVICE_NAME

log = logging.getLogger("rdn.serve")

T = TypeVar("T")
DEFAULT_SCALE = 2
PRECISION_CHOICES = ("auto", "int8", "fp32")  # --precision: see RepositoryConfig.precision
MIN_MESSAGE_BYTES = 64 * 2**10  # below this even a stream chunk barely fits


class ServerStartError(RuntimeError):
    """The server could not start (port taken, bad address, warm-up failed)."""


class RunningServer:
    """A started server: its bound port, health servicer, and a graceful ``stop``."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health: Health,
        repository: ModelRepository,
        batcher: TileBatcher,
        config: ServerConfig,
        codec_pool: concurrent.futures.ThreadPoolExecutor,
        uploads: UploadBudget,
        metrics: ServerMetrics | None = None,
        metrics_endpoint: MetricsEndpoint | None = None,
        http: HttpFrontDoor | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.repository = repository
        self.batcher = batcher
        self.config = config
        self.codec_pool = codec_pool
        self.uploads = uploads
        self.metrics = metrics
        self.metrics_endpoint = metrics_endpoint  # its .port is the bound /metrics port
        self.http = http  # its .port is the bound HTTP port
        self._stopping: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def engine(self) -> Engine:
        """The engine of the server's default model (benchmarks time it directly)."""
        return self.repository.snapshot.default().engine  # type: ignore[return-value]

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, give in-flight calls ``grace`` s, drain the batcher.

        Idempotent: a second call waits for the first to finish.
        """
        if self._stopping is None:
            grace = self.config.grace_s if grace is None else grace
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        doors = [self.server.stop(grace)]
        if self.http is not None:
            doors.append(self.http.stop())
        await asyncio.gather(*doors)
        await self.batcher.stop()
        self.codec_pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics_endpoint is not None:  # last: the drain stays visible to scrapes
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


CPU_MAX_BATCH = 1  # batching gains nothing on CPU (tests/bench/batching_gain.py)
GPU_MAX_BATCH = 8


def warmup_shapes(planner: Planner, max_batch: int) -> list[tuple[tuple[int, int], int]]:
    """((height, width), batch size) pairs warm-up runs: every batch size of every fixed tile
    shape the planner makes (a batch holds at most ``max_batch`` queue units), or batches of 1
    to ``max_batch`` grid tiles when plans are fitted to each image (shapes not known ahead)."""
    side = planner.tile + 2 * planner.pad
    pairs = []
    for shape in planner.shapes or ((side, side),):
        per_batch = max(1, max_batch // planner.units_per_tile_of(shape))
        pairs += [(shape, size) for size in range(1, per_batch + 1)]
    return pairs


def models_summary(snapshot: Snapshot) -> str:
    """The served models for the start-up line, the server default first: "rdn_x2 (x2,
    default), rdn_x4 (x4) ..."."""
    parts = []
    for pipeline in snapshot.ordered():
        tag = ", default" if pipeline.name == snapshot.primary else ""
        parts.append(f"{pipeline.name} (x{pipeline.scale}{tag})")
    return ", ".join(parts)


def plan_summary(planner: Planner) -> str:
    """How tiles are cut, for the start-up log line."""
    if planner.mode == "fit":
        side = int(planner.max_tile_pixels**0.5)
        return f"fitted (at most {planner.max_tile_pixels} pixels, {side}x{side})"
    if planner.mode == "buckets":
        return f"bucket ({'/'.join(map(str, planner.windows))} per axis)"
    return f"{planner.tile}x{planner.tile} grid"


def _bucket_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected LR core sizes >= 1, comma-separated (e.g. 64,128,256), got {text!r}"
        )
    return sizes


def with_provider_defaults(config: ServerConfig, provider: str) -> ServerConfig:
    """``config`` with the choices left to the provider made: ``max_batch`` 0 becomes 1 on
    CPU and 8 on CUDA."""
    if config.batcher.max_batch != 0:
        return config
    batch = GPU_MAX_BATCH if provider == CUDA else CPU_MAX_BATCH
    return replace(config, batcher=replace(config.batcher, max_batch=batch))


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """One message limit for both directions; a taken port is an error, not a shared port."""
    limit = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),
    ]


def repository_config(config: ServerConfig) -> RepositoryConfig:
    """Where the server's models come from: ``config.model`` first, then ``config.models``,
    then every file of ``config.model_dir``."""
    first = (config.model,) if config.model is not None else ()
    return RepositoryConfig(
        model_dir=config.model_dir,
        models=first + tuple(config.models),
        defaults=config.defaults,
        default_scale=config.default_scale,
        precision=config.precision,
    )


class _PipelineFactory:
    """Opens one model as a ``Pipeline`` and warms it up; the first engine opened settles what
    is left to the provider (``max_batch``), for every model after it."""

    def __init__(self, config: ServerConfig, preloaded: Engine | None) -> None:
        self.config = config
        self._preloaded = preloaded
        self.batcher: TileBatcher | None = None  # once it exists, warm-ups run on its thread

    async def open(self, path: Path, name: str, version: int) -> Pipeline:
        if self._preloaded is not None and path == self.config.model:
            engine, self._preloaded = self._preloaded, None
        else:
            engine = await asyncio.to_thread(Engine, path, self.config.engine)
        self.config = with_provider_defaults(self.config, engine.active_provider)
        planner = make_planner(self.config.tiling, engine.active_provider)
        settings = PipelineSettings(
            ensemble=self.config.self_ensemble,
            max_queue_units=self.config.batcher.max_queue_tiles,
            chunk_tiles=chunk_tiles(self.config.batcher.max_batch),
        )
        return Pipeline(name, path, engine, planner, settings, version)

    async def warm(self, pipeline: Pipeline) -> None:
        shapes = warmup_shapes(pipeline.planner, self.config.batcher.max_batch)
        log.debug(
            "warming up %s: %d engine calls (tile shape x batch size)", pipeline.name, len(shapes)
        )
        for window, size in shapes:
            # one shape per call: a stop waits for one batch at most; on the engine thread,
            # between batches, so a reload never computes beside the models being served
            if self.batcher is not None and self.batcher.running:
                await self.batcher.run_exclusive(pipeline.engine.warmup, window, [size])
            else:
                await asyncio.to_thread(pipeline.engine.warmup, window, [size])


async def build_server(config: ServerConfig, engine: Engine | None = None) -> RunningServer:
    """Open (unless given, for ``config.model``) every model, bind, warm up, and return a
    SERVING server.

    Raises ``ModelLoadError`` / ``RepositoryError`` / ``MetadataError`` before binding when a
    model cannot be loaded and ``ServerStartError`` when the address cannot be bound or warm-up
    fails.
    """
    factory = _PipelineFactory(config, engine)
    repository = ModelRepository(repository_config(config), factory.open, factory.warm)
    snapshot = await repository.start()
    config = factory.config  # with the provider's choices made
    provider = snapshot.default().engine.active_provider
    batcher = TileBatcher(None, config.batcher, snapshot.default().planner.unit_pixels)
    factory.batcher = batcher
    health = Health()
    for service in ("", SERVICE_NAME):
        await health.set(service, NOT_SERVING)
    repository.on_change(lambda published: health.set_models_loaded(bool(published.models)))
    uploads = UploadBudget(config.uploads)
    metrics = None
    if config.metrics.port is not None:
        metrics = ServerMetrics(batcher, lambda: repository.snapshot.ordered(), uploads)
    # ParseGuard last: authentication decides before any request byte is parsed.
    interceptors = [*auth_interceptors(config.security.auth_token, metrics), ParseGuard(metrics)]
    server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
    # Decoding and encoding run in a pool of their own: its size bounds their memory (and
    # their competition with the engine's threads) whatever the machine's core count.
    codec_pool = concurrent.futures.ThreadPoolExecutor(
        config.decode_workers, thread_name_prefix="codec"
    )
    core = ServingCore(
        repository,
        batcher,
        config,
        uploads=uploads,
        codec_pool=codec_pool,
        serving=health.serving,
        access_observer=metrics,
    )
    upscale_pb2_grpc.add_UpscalerServicer_to_server(UpscalerService(core), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeService(core, health), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            upscale_pb2.DESCRIPTOR.services_by_name["Upscaler"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    try:
        port = add_port(server, address, config.security)
    except SecurityError as e:
        raise ServerStartError(str(e)) from e
    except RuntimeError as e:
        raise ServerStartError(f"cannot listen on {address}: {e} (port taken?)") from e
    if port == 0:
        raise ServerStartError(f"cannot listen on {address} (port taken or bad address)")
    endpoint = None
    if metrics is not None and config.metrics.port is not None:
        metrics_address = (config.metrics.host, config.metrics.port)
        protected = config.security.tls or bool(config.security.auth_token)
        warning = exposure_warning(config.metrics, protected)
        if warning is not None:
            log.warning("%s", warning)
        try:
            endpoint = metrics.serve(*metrics_address, config.metrics.idle_timeout_s)
        except OSError as e:
            raise ServerStartError(
                f"cannot serve metrics on {metrics_address[0]}:{metrics_address[1]}: "
                f"{e.strerror or e} (port taken? see --metrics-port)"
            ) from e
    http = None
    if config.http_port is not None:
        http_host = http_bind_host(config)
        warning = http_exposure_warning(config)
        if warning is not None:
            log.warning("%s", warning)
        http = HttpFrontDoor(core)
        try:
            await http.start(http_host, config.http_port, server_ssl_context(config))
        except OSError as e:
            await http.stop()
            await server.stop(0)
            codec_pool.shutdown(wait=False)
            if endpoint is not None:
                endpoint.close()
            raise ServerStartError(
                f"cannot serve HTTP on {http_host}:{config.http_port}: {e.strerror or e} "
                "(port taken? see --http-port)"
            ) from e
    await batcher.start()
    await server.start()
    running = RunningServer(
        server,
        port,
        health,
        repository,
        batcher,
        config,
        codec_pool,
        uploads,
        metrics,
        endpoint,
        http,
    )
    try:
        for pipeline in snapshot.ordered():
            await factory.warm(pipeline)
    except asyncio.CancelledError:  # stopped during warm-up (SIGTERM): nothing may stay bound
        await running.stop(0)
        raise
    except Exception as e:
        await running.stop(0)
        raise ServerStartError(f"warm-up failed: {type(e).__name__}: {e}") from e
    for service in ("", SERVICE_NAME):
        await health.set(service, SERVING)
    log.info(
        "listening on %s (provider %s, models %s, %s tiles, pad %d, max batch %d%s; %s%s%s)",
        running.address,
        provider,
        models_summary(snapshot),
        plan_summary(snapshot.default().planner),
        config.tiling.pad,
        config.batcher.max_batch,
        ", self-ensemble" if config.self_ensemble else "",
        describe(config.security),
        "" if endpoint is None else f"; metrics on port {endpoint.port}",
        "" if http is None else f"; HTTP on {http_bind_host(config)}:{http.port}",
    )
    return running


class BackgroundServer:
    """A server on its own event loop in a daemon thread, for blocking code (tests, benchmarks).

    ``with BackgroundServer(config) as bg: UpscaleClient(f"127.0.0.1:{bg.port}")...``
    """

    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self._config = config
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.running: RunningServer | None = None

    @property
    def port(self) -> int:
        assert self.running is not None, "BackgroundServer not started"
        return self.running.port

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        """Start the thread; return once the server is SERVING (or raise why it is not)."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            try:
                self.running = await build_server(self._config, self._engine)
            except BaseException as e:
                failure.append(e)
            finally:
                ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.create_task(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="rdn-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ServerStartError(f"server did not start within {timeout} s")
        if failure:
            self._finish()
            raise failure[0]
        return self

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the server's loop (e.g. ``bg.running.stop(5)``)."""
        assert self._loop is not None, "BackgroundServer not started"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop and return its result."""
        return self.submit(coroutine).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        """Graceful stop (idempotent), then end the thread."""
        if self.running is not None:
            self.call(self.running.stop(grace))
        self._finish()

    def _finish(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- command line


def _int_at_least(minimum: int) -> type[int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse  # type: ignore[return-value]


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 = any free port), got {value}")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for flags that have a value by default (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="rdn-serve",
        description="Serve RDN ONNX models over gRPC (rdn.v1.Upscaler and KServe v2).",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        help="ONNX model to serve (repeatable; the first answers requests that name no model, "
        "scale or size). Without --model: every model of --model-dir",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="serve every *.onnx in this folder (default without --model: the shipped "
        "server/models/)",
    )
    p.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="NAME",
        help="make model NAME the default of its scale (repeatable; default: rdn_x{scale})",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=SCALES,
        help=f"whose default model answers requests that name no model, scale or size (default "
        f"{DEFAULT_SCALE}); with --model, checked against the first model",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=d.precision,
        help="which model answers a request naming only a scale when an int8 twin "
        "(rdn_x2_int8 beside rdn_x2) is served: auto (default) the int8 one on a CPU if its "
        f"export measured at most {INT8_MAX_LOSS_DB} dB loss, the float one on CUDA; int8; fp32",
    )
    p.add_argument("--host", default=d.host, help="address to bind")
    p.add_argument("--port", type=_port, default=d.port, help="port to bind; 0 = any free port")
    p.add_argument(
        "--max-batch",
        type=_int_at_least(0),
        default=d.batcher.max_batch,
        help=f"tiles per engine call; 0 = by provider ({CPU_MAX_BATCH} on CPU, "
        f"{GPU_MAX_BATCH} on CUDA)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=_non_negative_float,
        default=d.batcher.max_delay_ms,
        help="longest wait for more tiles while the engine is busy",
    )
    p.add_argument(
        "--max-queue-tiles",
        type=_int_at_least(1),
        default=d.batcher.max_queue_tiles,
        help="queued tiles beyond this are refused (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--tiling",
        choices=MODES,
        default=d.tiling.mode,
        help="fit: tiles fitted to each image (whole image under --max-tile-pixels); buckets: "
        "square windows of a few fixed sizes (--tile-buckets); grid: fixed --tile cores; auto: "
        "fit on CPU, buckets on CUDA",
    )
    p.add_argument(
        "--tile-buckets",
        type=_bucket_list,
        default=d.tiling.buckets,
        help="bucket tiling: LR core sizes, comma-separated (default 64,128,256; windows add "
        "2 x --tile-pad)",
    )
    p.add_argument(
        "--max-tile-pixels",
        type=_int_at_least(0),
        default=d.tiling.max_tile_pixels,
        help="fit tiling: largest tile, LR pixels; 0 = 384x384",
    )
    p.add_argument(
        "--tile", type=_int_at_least(1), default=d.tiling.tile, help="grid tiling: LR tile core"
    )
    p.add_argument(
        "--tile-pad", type=_int_at_least(0), default=d.tiling.pad, help="LR context per side"
    )
    p.add_argument(
        "--providers",
        default=",".join(d.engine.providers),
        help="onnxruntime execution providers, comma-separated, in priority order",
    )
    p.add_argument("--require-gpu", action="store_true", help="exit 1 unless CUDA is active")
    p.add_argument(
        "--threads", type=_int_at_least(0), default=0, help="onnxruntime intra-op threads; 0 = auto"
    )
    p.add_argument(
        "--ort-spinning",
        choices=SWITCHES,
        default=d.engine.spinning,
        help="onnxruntime intra-op threads spin between ops (auto: on for CPU, off for CUDA)",
    )
    p.add_argument(
        "--ort-cpu-arena",
        choices=SWITCHES,
        default=d.engine.cpu_arena,
        help="onnxruntime CPU memory arena (auto: on)",
    )
    p.add_argument(
        "--max-pixels", type=_int_at_least(1), default=d.limits.max_pixels, help="input W*H limit"
    )
    p.add_argument(
        "--max-request-bytes",
        type=_int_at_least(1),
        default=d.limits.max_request_bytes,
        help="largest encoded or raw input (streams included)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_int_at_least(MIN_MESSAGE_BYTES),
        default=d.limits.max_message_bytes,
        help="gRPC message limit, both directions (clients must use the same)",
    )
    p.add_argument(
        "--max-uploads",
        type=_int_at_least(1),
        default=d.uploads.max_concurrent,
        help="UpscaleStream uploads in progress at once; more are refused (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--max-buffered-bytes",
        type=_int_at_least(1),
        default=d.uploads.max_buffered_bytes,
        help="request bytes all calls together may hold (at least --max-request-bytes)",
    )
    p.add_argument(
        "--upload-idle-timeout",
        type=_positive_float,
        default=d.uploads.idle_timeout_s,
        help="seconds an upload may pause between messages",
    )
    p.add_argument(
        "--upload-deadline",
        type=_positive_float,
        default=d.uploads.deadline_s,
        help="seconds a whole upload (UpscaleStream, HTTP body) may take",
    )
    p.add_argument(
        "--upload-min-rate",
        type=_non_negative_float,
        default=d.uploads.min_rate_bytes_s,
        help="bytes/s an upload must average after its first --upload-idle-timeout seconds; "
        "slower ones end, and give their slot to a new upload when all are taken (0 = no minimum)",
    )
    p.add_argument(
        "--decode-workers",
        type=_int_at_least(1),
        default=d.decode_workers,
        help="threads that decode and encode images (each may hold one decode's memory)",
    )
    p.add_argument(
        "--grace", type=_non_negative_float, default=d.grace_s, help="seconds to drain on SIGTERM"
    )
    p.add_argument("--log-level", choices=LEVELS, default=d.log_level, help="log threshold")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument(
        "--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x compute)"
    )
    p.add_argument(
        "--http-port",
        type=_port,
        default=0,
        help="also serve HTTP here (KServe v2 REST, POST /v1/upscale, the page at /); 0 = off",
    )
    p.add_argument(
        "--http-idle-timeout",
        type=_positive_float,
        default=d.http_limits.idle_timeout_s,
        help="seconds an HTTP connection may take to send a complete request head, after it "
        "opens or after its previous answer (slow heads, idle keep-alive); then it is closed",
    )
    p.add_argument(
        "--http-max-connections",
        type=_int_at_least(1),
        default=d.http_limits.max_connections,
        help="open HTTP connections; more are closed at once (lowered at start to keep file "
        "descriptors for gRPC)",
    )
    add_http_flags(p)
    add_security_flags(p)
    add_metrics_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the flags describe; the shipped models when --model is absent."""
    models = tuple(args.model or ())
    model_dir = args.model_dir if args.model_dir is not None or models else MODELS_DIR
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    if not providers:
        raise ValueError("--providers is empty; name at least one, e.g. CPUExecutionProvider")
    if args.max_buffered_bytes < args.max_request_bytes:
        raise ValueError(
            f"--max-buffered-bytes {args.max_buffered_bytes} is below --max-request-bytes "
            f"{args.max_request_bytes}: a request of the allowed size could never be held"
        )
    return ServerConfig(
        model=models[0] if models else None,
        models=models[1:],
        model_dir=model_dir,
        defaults=tuple(args.default),
        default_scale=args.scale or DEFAULT_SCALE,
        precision=args.precision,
        host=args.host,
        port=args.port,
        grace_s=args.grace,
        engine=EngineConfig(
            providers=providers,
            require_gpu=args.require_gpu,
            intra_op_threads=args.threads,
            spinning=args.ort_spinning,
            cpu_arena=args.ort_cpu_arena,
        ),
        tiling=TilingConfig(
            tile=args.tile,
            pad=args.tile_pad,
            mode=args.tiling,
            max_tile_pixels=args.max_tile_pixels,
            buckets=args.tile_buckets,
        ),
        batcher=BatcherConfig(
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            max_queue_tiles=args.max_queue_tiles,
        ),
        limits=LimitsConfig(
            max_pixels=args.max_pixels,
            max_request_bytes=args.max_request_bytes,
            max_message_bytes=args.max_message_bytes,
        ),
        uploads=UploadConfig(
            idle_timeout_s=args.upload_idle_timeout,
            deadline_s=args.upload_deadline,
            max_concurrent=args.max_uploads,
            max_buffered_bytes=args.max_buffered_bytes,
            min_rate_bytes_s=args.upload_min_rate,
        ),
        decode_workers=args.decode_workers,
        log_level=args.log_level,
        log_json=args.log_json,
        self_ensemble=args.self_ensemble,
        security=security_config_from_args(args),
        metrics=metrics_config_from_args(args),
        http_port=args.http_port or None,
        http_limits=HttpLimitsConfig(
            idle_timeout_s=args.http_idle_timeout, max_connections=args.http_max_connections
        ),
        http_host=args.http_host,
        cross_site=cross_site_config_from_args(args),
    )


async def _start(config: ServerConfig, scale: int | None) -> RunningServer | None:
    """Load the models and start the server; None (after logging why) when it cannot start.

    The first ``--model`` is opened first and checked against ``scale`` before the others."""
    engine = None
    try:
        if config.model is not None:
            engine = await asyncio.to_thread(Engine, config.model, config.engine)
    except (ModelLoadError, RuntimeError, ValueError) as e:
        log.error("%s", e)
        return None
    if engine is not None and scale is not None and engine.scale != scale:
        log.error(
            "--scale %d does not match the model: %s upscales x%d; drop --scale or pick "
            "a x%d model",
            scale,
            config.model,
            engine.scale,
            scale,
        )
        return None
    try:
        return await build_server(config, engine)
    except (ServerStartError, RepositoryError, MetadataError, ModelLoadError) as e:
        log.error("%s", e)
        return None


class EarlySignals:
    """Records SIGTERM / SIGINT until the event loop takes them over, so a signal at any
    moment of start-up stops the server cleanly (exit 0) instead of killing it (exit 143)."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a re-scan before start-up ends: ignored

    def _record(self, signum: int, frame: object) -> None:
        self.received = True


class Rescans:
    """SIGHUP: re-scan the model folder and swap what changed.

    Coalesced: one re-scan runs at a time and at most one waits behind it, so all the signals
    that arrive during a re-scan cost one more re-scan, not one each; that one starts after
    them and sees everything that changed before them. Signals that arrive before the server
    is up wait for it (one re-scan then covers them all)."""

    def __init__(self) -> None:
        self._running: RunningServer | None = None
        self._pending = False  # a signal came while the server started, or during a re-scan
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        if self._running is None:
            log.info("SIGHUP during start-up: the model repository is re-scanned once it is up")
            self._pending = True
            return
        if self._task is not None and not self._task.done():
            if not self._pending:
                log.info("SIGHUP during a re-scan: one more re-scan follows it")
            self._pending = True  # later ones join it
            return
        log.info("SIGHUP: re-scanning the model repository")
        self._task = asyncio.ensure_future(self._rescan(self._running))

    async def _rescan(self, running: RunningServer) -> None:
        while True:
            self._pending = False
            try:
                await running.repository.rescan()
            except Exception:  # the next SIGHUP must still work
                log.exception("model repository re-scan failed")
            if not self._pending:
                return
            log.info("re-scanning the model repository for the SIGHUPs received meanwhile")

    def attach(self, running: RunningServer) -> None:
        self._running = running
        if self._pending:
            self._pending = False
            self.request()


async def serve(
    config: ServerConfig, scale: int | None = None, early: EarlySignals | None = None
) -> int:
    """Run until SIGTERM / SIGINT, then shut down gracefully; the process exit code.

    A signal during start-up (model load, warm-up), or one ``early`` saw before, stops it
    there and exits 0 too.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early is not None and early.received:
        stop.set()
    # SIGHUP from here on is never lost: one that arrives while the server starts (after its
    # start-up scan may have read the folder, or just after "listening on" was logged) re-scans
    # as soon as the server is up.
    rescans = Rescans()
    loop.add_signal_handler(signal.SIGHUP, rescans.request)
    stopped = asyncio.ensure_future(stop.wait())
    starting = asyncio.ensure_future(_start(config, scale))
    await asyncio.wait([starting, stopped], return_when="FIRST_COMPLETED")
    if not starting.done():
        log.info("stop requested during start-up; exiting")
        starting.cancel()
        await asyncio.wait([starting])
        return 0
    running = starting.result()
    if running is None:
        stopped.cancel()
        return 1
    rescans.attach(running)
    terminated = asyncio.ensure_future(running.wait_for_termination())
    await asyncio.wait([terminated, stopped], return_when="FIRST_COMPLETED")
    log.info("shutting down: new calls refused, in-flight calls get up to %.1f s", config.grace_s)
    await running.stop(config.grace_s)
    terminated.cancel()
    stopped.cancel()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``rdn-serve``."""
    early = EarlySignals()
    early.install()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    log.debug("starting")  # from here on a signal is recorded, then stops the start-up
    pin_mmap_threshold()  # large request buffers go back to the system when freed
    raise_open_file_limit()  # descriptors for connections; the HTTP door's cap keeps a reserve
    # A given --model is checked against --scale; otherwise --scale picks the default model.
    scale = args.scale if args.model else None
    try:
        config = config_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 1
    return asyncio.run(serve(config, scale, early))


if __name__ == "__main__":
    sys.exit(main())
