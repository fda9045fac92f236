"""One loaded model and what runs it: the object both servicers (rdn.v1 and KServe) share.

A ``Pipeline`` holds a model's engine, its tile planner, its metadata (read once, through
``rdn.metadata``), the self-ensemble switch and the admission rule, and runs images through
any ``TileSource``: the server's shared batcher (``TileBatcher.lane(engine)``) or, for the local
API (``server.local``), the engine directly. It keeps the model's statistics (Triton's
ModelStatistics). The servicers resolve a request to a pipeline once, at its start, and use
that object to the end: a reload swaps pipelines, never a pipeline's parts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rdn.ensemble import N_TRANSFORMS
from rdn.metadata import MetadataError, ModelMetadata
from server.core.batch_types import Reservation
from server.core.chunked import (
    IN_FLIGHT,
    ChunkTimings,
    Progress,
    TileSource,
    chunk_size,
    infer_chunked,
)
from server.core.errors import RequestTooLarge
from server.core.planner import Planner

log = logging.getLogger(__name__)


class PipelineEngine(Protocol):
    """What a pipeline needs from an engine (``server.core.engine.Engine`` is one)."""

    scale: int
    active_provider: str
    providers: tuple[str, ...]
    metadata: Mapping[str, str]
    spinning: bool
    cpu_arena: bool

    def run(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PipelineSettings:
    """How every model of a server runs (from ServerConfig)."""

    ensemble: bool = False  # x8 geometric self-ensemble
    max_queue_units: int = 4096  # an image needing more could never enter the queue
    chunk_tiles: int = 64  # tiles per chunk submitted (server/core/chunked.py)


class ModelStats:
    """Counts and cumulative durations of one model's requests (Triton's InferStatistics).

    Updated from the event loop and read by the metrics thread: a lock keeps each update whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inference_count = 0  # images
        self.execution_count = 0  # requests run
        self.last_inference_ms = 0
        self.success = [0, 0]  # count, ns
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute_infer = [0, 0]
        self.compute_output = [0, 0]

    def succeeded(
        self, images: int, total_s: float, timings: ChunkTimings, output_s: float
    ) -> None:
        with self._lock:
            self.inference_count += images
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1e3)
            for pair, seconds in (
                (self.success, total_s),
                (self.queue, timings.queue_seconds),
                (self.compute_infer, timings.compute_seconds),
                (self.compute_output, output_s),
            ):
                pair[0] += 1
                pair[1] += int(seconds * 1e9)

    def failed(self, total_s: float) -> None:
        with self._lock:
            self.fail[0] += 1
            self.fail[1] += int(total_s * 1e9)

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return StatsSnapshot(
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                last_inference_ms=self.last_inference_ms,
                success=(self.success[0], self.success[1]),
                fail=(self.fail[0], self.fail[1]),
                queue=(self.queue[0], self.queue[1]),
                compute_infer=(self.compute_infer[0], self.compute_infer[1]),
                compute_output=(self.compute_output[0], self.compute_output[1]),
            )


@dataclass(frozen=True)
class StatsSnapshot:
    """ModelStats at one moment; each duration is (count, cumulative nanoseconds)."""

    inference_count: int
    execution_count: int
    last_inference_ms: int
    success: tuple[int, int]
    fail: tuple[int, int]
    queue: tuple[int, int]
    compute_infer: tuple[int, int]
    compute_output: tuple[int, int]


def read_metadata_once(engine: PipelineEngine, source: str) -> ModelMetadata | None:
    """The engine's ``rdn.*`` metadata, parsed; None (with a warning) when it has none."""
    try:
        return ModelMetadata.from_props(engine.metadata, source=source)
    except MetadataError as e:
        log.warning("%s", e)
        return None


class Pipeline:
    """One served model: engine, planner, metadata, admission, and the run of an image."""

    def __init__(
        self,
        name: str,
        path: Path,
        engine: PipelineEngine,
        planner: Planner,
        settings: PipelineSettings,
        version: int = 1,
    ) -> None:
        self.name = name
        self.path = path
        self.engine = engine
        self.planner = planner
        self.settings = settings
        self.version = version
        self.metadata = read_metadata_once(engine, f"model {name} ({path.name})")
        self.stats = ModelStats()

    @property
    def scale(self) -> int:
        return self.engine.scale

    @property
    def chunk_pixels(self) -> int:
        return self.settings.chunk_tiles * self.planner.unit_pixels

    def units(self, height: int, width: int, images: int = 1, turnable: bool = False) -> int:
        """Queue units ``images`` images of ``height`` x ``width`` need: all 8 views each with
        self-ensemble; with ``turnable`` the larger of the two orientations (an encoded file's
        orientation tag may turn it when decoded)."""
        straight = self.planner.units(self.planner.plan(height, width))
        if self.settings.ensemble or turnable:
            turned = self.planner.units(self.planner.plan(width, height))
        if self.settings.ensemble:
            return images * N_TRANSFORMS // 2 * (straight + turned)
        return images * (max(straight, turned) if turnable else straight)

    def frames_in_flight(self, height: int, width: int, frames: int) -> int:
        """Chunks of ``frames`` images of ``height`` x ``width`` to keep in flight: IN_FLIGHT
        chunks' worth of tiles, so small frames (one chunk each) reach the batcher together
        and share engine calls, with the memory of a still image's chunks in flight."""
        plan = self.planner.plan(height, width)
        frame_pixels = min(plan.count, chunk_size(plan, self.chunk_pixels)) * plan.tile_pixels
        return max(IN_FLIGHT, min(frames, IN_FLIGHT * self.chunk_pixels // frame_pixels))

    def admit(self, units: int, what: str) -> None:
        """Refuse (``RequestTooLarge``, not retryable) work whose tiles could never enter the
        queue; ``what`` names it ("a 4000x3000 image")."""
        limit = self.settings.max_queue_units
        if units > limit:
            tile = self.planner.tile
            raise RequestTooLarge(
                f"{what} needs {units} tiles of {tile}x{tile}"
                f"{' (x8 self-ensemble)' if self.settings.ensemble else ''}, more than the queue "
                f"holds ({limit}, --max-queue-tiles); send fewer or smaller images"
            )

    async def run(
        self,
        source: TileSource,
        sources: Sequence[np.ndarray],
        canvases: Sequence[np.ndarray],
        request_id: str,
        reservation: Reservation | None = None,
        to_model: Callable[[np.ndarray], np.ndarray] | None = None,
        from_model: Callable[[np.ndarray], np.ndarray] | None = None,
        progress: Progress | None = None,
        in_flight: int = IN_FLIGHT,
    ) -> ChunkTimings:
        """Super-resolve each ``sources[i]`` [3, H, W] into ``canvases[i]`` [3, sH, sW]
        through ``source``, chunk by chunk (``server.core.chunked.infer_chunked``), telling
        ``progress(done, total)`` as tiles complete; ``in_flight`` chunks at a time."""
        extra: dict[str, Any] = {"progress": progress, "in_flight": in_flight}
        if to_model is not None:
            extra["to_model"] = to_model
        if from_model is not None:
            extra["from_model"] = from_model
        return await infer_chunked(
            source,
            sources,
            canvases,
            plan=self.planner.plan,
            scale=self.scale,
            ensemble=self.settings.ensemble,
            chunk_pixels=self.chunk_pixels,
            request_id=request_id,
            reservation=reservation,
            **extra,
        )
