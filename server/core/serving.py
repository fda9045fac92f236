"""The serving core: one object per server that every door (rdn.v1 gRPC, KServe gRPC, HTTP)
calls, holding the repository, the tile batcher, the request-byte budget, the codec pool, the
serving state, the access observer and the limits.

Its operations take and give plain Python values and raise the domain errors of
``server.core.errors`` (classified once in ``server.core.failures``); the doors only translate wire
messages to these calls and the answers and errors back. Each check of an upscale runs here,
once, in this order: request id, serving state, output options, model and size, then the
request's bytes are held and its tiles reserved before any pixel is decoded. An inference's
tensor is read by its door (where its bytes travel is the protocol's), then checked here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np

from server.config import ServerConfig
from server.core.access import AccessObserver, AccessRecord, check_request_id
from server.core.animated import upscale_any
from server.core.batcher import TileBatcher
from server.core.chunked import Progress
from server.core.errors import NotServing, RequestError
from server.core.kserve_rules import FLOAT32_LE, Shape, check_limits, check_model, index_rows
from server.core.pipeline import Pipeline
from server.core.repository import LoadFailed, ModelRepository, Snapshot
from server.core.sizing import SizeOptions, check_options
from server.core.uploads import Hold, UploadBudget
from server.core.upscaling import (
    ImageSource,
    UpscaleContext,
    Upscaled,
    UpscaleTicket,
    check_message,
    output_spec,
)
from server.core.worker_pool import in_pool
from server.imaging.options import DEFAULT_OPTIONS, ImageOptions

T = TypeVar("T")


class ServingCore:
    """What every door needs of the server, once."""

    def __init__(
        self,
        repository: ModelRepository,
        batcher: TileBatcher,
        config: ServerConfig,
        *,
        uploads: UploadBudget,
        codec_pool: Executor,
        serving: Callable[[], bool],
        access_observer: AccessObserver | None = None,
    ) -> None:
        self.repository = repository
        self.batcher = batcher
        self.config = config
        self.uploads = uploads
        self.pool = codec_pool
        self.access_observer = access_observer
        self._serving = serving
        self._upscaling = UpscaleContext(batcher, codec_pool, config.limits)

    # -- state ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The models served now (a call keeps the one it started with)."""
        return self.repository.snapshot

    def serving(self) -> bool:
        """Warm-up over and not draining."""
        return self._serving()

    def ready(self) -> bool:
        """Serving, with at least one model loaded (what every readiness probe answers)."""
        return self._serving() and bool(self.repository.snapshot.models)

    def check_serving(self) -> None:
        """``NotServing`` (UNAVAILABLE, 503) unless warm-up is over and the server not draining."""
        if not self._serving():
            raise NotServing("the server is warming up or shutting down; retry shortly")

    def record(self, method: str) -> AccessRecord:
        """A new access record for one call, seen by the access observer (metrics)."""
        return AccessRecord(method, self.access_observer)

    async def in_pool(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the codec pool, awaited."""
        return await in_pool(self.pool, function, *args)

    # -- upscaling images ---------------------------------------------------------------------
    def admit_upscale(
        self,
        request_id: str,
        options: SizeOptions,
        output_format: str,
        quality: int,
        record: AccessRecord,
        *,
        received: float | None = None,
        check_serving: bool = True,
        image: ImageOptions = DEFAULT_OPTIONS,
    ) -> UpscaleTicket:
        """Every check an upscale passes before its image is read: request id, serving state,
        output options, model and size options against the served models; ``image``: how
        the file's profile, metadata and alpha are handled."""
        request_id = check_request_id(request_id)
        record.set(request_id=request_id)
        if check_serving:
            self.check_serving()
        spec = output_spec(output_format, quality, image)
        check_options(options)
        snapshot = self.repository.snapshot  # this call's models, whatever reloads follow
        snapshot.check(options)
        return UpscaleTicket(
            request_id,
            options,
            spec,
            snapshot,
            time.perf_counter() if received is None else received,
        )

    def hold(self, nbytes: int, *, upload: bool = False) -> Hold:
        """Hold ``nbytes`` of request bytes in the server's budget (``Busy`` when they do not
        fit); release it when the call ends."""
        return self.uploads.hold(nbytes, upload=upload)

    async def upscale(
        self,
        ticket: UpscaleTicket,
        source: ImageSource,
        record: AccessRecord,
        *,
        unary: bool,
        progress: Progress | None = None,
    ) -> Upscaled:
        """Upscale one admitted image; ``unary``: the answer must fit one message."""
        done = await upscale_any(self._upscaling, ticket, source, record, unary, progress)
        if unary and ticket.spec.name != "raw":
            check_message(done.image, self.config.limits)
        return done

    # -- inferring tensors (KServe) ---------------------------------------------------------------
    def model(self, name: str, version: str = "") -> Pipeline:
        """The served model ``name`` at ``version`` ("" = the latest); ``NotFound`` otherwise."""
        return check_model(name, version, self.repository.snapshot)

    async def infer(
        self,
        pipeline: Pipeline,
        shape: Shape,
        load: Callable[[], np.ndarray],
        request_id: str,
        record: AccessRecord,
        received: float,
    ) -> np.ndarray:
        """Run the [N, 3, H, W] images ``load()`` returns (on the codec pool) through
        ``pipeline`` on the shared batcher; the float32 [N, 3, sH, sW] answer. Admission first:
        the request's bytes are held and its tiles reserved, or it is refused before any work."""
        n, _, height, width = shape
        record.set(images=n, width=width, height=height)
        limits = self.config.limits
        units = check_limits(shape, limits.max_pixels, limits.max_message_bytes, pipeline)
        bytes_in = int(np.prod(shape)) * FLOAT32_LE.itemsize
        record.set(bytes_in=bytes_in)
        scale = pipeline.scale
        try:
            with (
                self.uploads.hold(bytes_in, upload=False),
                self.batcher.reserve(units) as reservation,
            ):
                images = await self.in_pool(load)
                # Chunk by chunk into the float32 answer (server/core/chunked.py): bounded memory.
                canvas = np.empty((n, 3, scale * height, scale * width), np.float32)
                result = await pipeline.run(
                    self.batcher.lane(pipeline.engine),
                    list(images),
                    list(canvas),
                    request_id,
                    reservation,
                )
        except Exception:
            pipeline.stats.failed(time.perf_counter() - received)
            raise
        record.set(
            tiles=result.tiles,
            image_pixels=n * height * width,
            computed_pixels=result.computed_pixels,
            waste=round(result.computed_pixels / (n * height * width), 3),
            queue_ms=round(1e3 * result.queue_seconds, 2),
            compute_ms=round(1e3 * result.compute_seconds, 2),
        )
        pipeline.stats.succeeded(n, time.perf_counter() - received, result, 0.0)
        return canvas

    # -- the model repository -----------------------------------------------------------------
    def models(self, name: str = "", version: str = "") -> list[Pipeline]:
        """The model ``name`` (at ``version``), or every served model when ``name`` is empty."""
        if name:
            return [self.model(name, version)]
        return self.repository.snapshot.ordered()

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        """Triton's RepositoryIndex: every model known, loaded or not (``ready_only``: loaded)."""
        return index_rows(self.repository.index(), ready_only)

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` from the repository's files; calls in flight finish on the
        version they started with. A file that cannot be loaded is the client's error."""
        try:
            await self.repository.load(name)
        except LoadFailed as e:
            raise RequestError(str(e)) from e

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; calls in flight finish on it."""
        await self.repository.unload(name)
