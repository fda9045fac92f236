"""The server's assembly: open every model, build the serving core and its three doors
(rdn.v1 gRPC, KServe gRPC, HTTP), bind, warm up, and hand back a ``RunningServer``.

``build_server`` runs the same server inside any event loop: ``rdn-serve`` (server/main.py),
tests and benchmarks. Start-up order: the models (a missing or corrupt file raises before any
port is bound); bind; health NOT_SERVING (Upscale and ModelInfer answer UNAVAILABLE); warm-up of
every batch size; health SERVING; one "listening on HOST:PORT" line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rdn.constants import CUDA
from server.config import (
    ServerConfig,
)
from server.core.batcher import TileBatcher
from server.core.chunked import chunk_tiles
from server.core.engine import Engine
from server.core.pipeline import Pipeline, PipelineSettings
from server.core.planner import Planner, make_planner
from server.core.repository import ModelRepository, RepositoryConfig, Snapshot
from server.core.serving import ServingCore
from server.core.uploads import UploadBudget
from server.doors.cross_site import exposure_warning as http_exposure_warning
from server.doors.cross_site import http_bind_host
from server.doors.http import HttpFrontDoor
from server.doors.kserve_grpc import KServeService
from server.doors.parse_guard import ParseGuard
from server.doors.upscaler import UpscalerService
from server.ops.auth import auth_interceptors
from server.ops.health import NOT_SERVING, SERVING, Health
from server.ops.metrics import (
    MetricsEndpoint,
    ServerMetrics,
    exposure_warning,
)
from server.ops.security import (
    SecurityError,
    add_port,
    describe,
    server_ssl_context,
)
from server.pb.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from server.wire import HTTP2_MAX_FRAME_BYTES, SERVICE_NAME

log = logging.getLogger("rdn.serve")


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
            await http.start(http_host, config.http_port, server_ssl_context(config.security))
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
