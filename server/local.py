"""The local API: upscale in-process with the server's pipeline (same tiling, same resize,
same codecs), without a server and without torch.

    from server.local import LocalUpscaler

    upscaler = LocalUpscaler("rdn_x2")  # a shipped model's name, or an .onnx file's path
    sr = upscaler.upscale(rgb)  # H x W x 3 uint8 RGB -> 2H x 2W x 3
    png = upscaler.upscale_bytes(open("photo.jpg", "rb").read(), "png", width=1000).image

The tiles go straight to the engine instead of through the server's batcher; everything else
is the ``Pipeline`` the server runs. Calls block; one ``LocalUpscaler`` serves one thread at a
time (make one per thread to run several).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdn.constants import CPU
from server.config import EngineConfig, LimitsConfig, TilingConfig
from server.core.animated import AUTO, STILL_DEFAULT, finish_frames
from server.core.batch_types import Reservation, TileResult
from server.core.chunked import chunk_tiles, to_uint8, to_unit_float
from server.core.engine import Engine
from server.core.pipeline import Pipeline, PipelineEngine, PipelineSettings
from server.core.planner import make_planner
from server.core.repository import RepositoryConfig, discover, model_name_of
from server.core.sizing import SizeOptions, check_options, needed_factor, output_size, resize_output
from server.core.upscaling import OutputSpec
from server.imaging.animation import (
    check_animation_side,
    container_of,
    decode_animation,
    probe,
    read_animation_header,
)
from server.imaging.codec import decode_image, encode_image, finish_output
from server.models import MODELS_DIR

CPU_ONLY = EngineConfig(providers=(CPU,))
DEFAULT_TILING = TilingConfig()  # fitted tiles on a CPU, as rdn-serve
DEFAULT_LIMITS = LimitsConfig()
LOCAL_MAX_BATCH = 1  # tiles per engine call on a CPU (batching gains nothing there)


def resolve_model(model: str | Path) -> Path:
    """The model file ``model`` names: a path as given (the engine says what is wrong with a bad
    one), or a bare name of a shipped model, the name rdn-serve serves it under (``rdn_x4``)."""
    path = Path(model)
    if path.exists() or path.suffix == ".onnx" or len(path.parts) != 1:
        return path
    shipped = discover(RepositoryConfig(model_dir=MODELS_DIR))
    if path.name in shipped:
        return shipped[path.name]
    raise ValueError(
        f"model {str(model)!r}: no such file and no shipped model of that name; shipped models: "
        f"{', '.join(sorted(shipped))} (or give the path of an .onnx file)"
    )


class _Direct:
    """A ``TileSource`` that runs tiles on the engine at once, in the calling thread."""

    def __init__(self, engine: PipelineEngine) -> None:
        self._engine = engine

    async def submit(
        self, tiles: np.ndarray, request_id: str = "", reservation: Reservation | None = None
    ) -> TileResult:
        return TileResult(outputs=self._engine.run(tiles), queue_seconds=0.0)


@dataclass(frozen=True)
class LocalResult:
    """An encoded upscaled image and its size."""

    image: bytes
    width: int
    height: int
    resized: bool  # the model's output was resized to the requested size
    frames: int = 1  # an animation's frames
    format: str = "png"  # the answer's format ("auto" resolved)


class LocalUpscaler:
    """One ONNX model and its pipeline, run in this process: ``model`` is an .onnx file or the
    name of a shipped model (``rdn_x2``, ``rdn_x4_photo`` ...)."""

    def __init__(
        self,
        model: str | Path,
        engine: EngineConfig = CPU_ONLY,
        tiling: TilingConfig = DEFAULT_TILING,
        limits: LimitsConfig = DEFAULT_LIMITS,
        ensemble: bool = False,
    ) -> None:
        path = resolve_model(model)
        opened = Engine(path, engine)
        planner = make_planner(tiling, opened.active_provider)
        settings = PipelineSettings(ensemble=ensemble, chunk_tiles=chunk_tiles(LOCAL_MAX_BATCH))
        self.pipeline = Pipeline(model_name_of(path), path, opened, planner, settings)
        self.limits = limits

    @property
    def scale(self) -> int:
        return self.pipeline.scale

    def upscale(self, rgb: np.ndarray) -> np.ndarray:
        """An H x W x 3 uint8 RGB array upscaled by the model's scale."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 array, got {rgb.shape} {rgb.dtype}")
        height, width = rgb.shape[:2]
        scale = self.pipeline.scale
        out = np.empty((scale * height, scale * width, 3), np.uint8)
        run = self.pipeline.run(
            _Direct(self.pipeline.engine),
            [rgb.transpose(2, 0, 1)],
            [out.transpose(2, 0, 1)],
            "local",
            to_model=to_unit_float,
            from_model=to_uint8,
        )
        asyncio.run(run)
        return out

    def upscale_bytes(
        self,
        data: bytes,
        output_format: str = "auto",
        quality: int = 95,
        *,
        width: int = 0,
        height: int = 0,
        outscale: float = 0.0,
    ) -> LocalResult:
        """An image file (PNG, JPEG, WebP, BMP, TIFF, HEIC, AVIF; GIF, APNG, animated WebP)
        upscaled and encoded as ``output_format`` ("png", "jpeg", "webp", "avif", "gif",
        "raw"; "auto": an animation's own kind, else PNG); ``width`` and/or ``height`` or
        ``outscale`` resize the model's output as the server does (within 1 .. its scale)."""
        options = SizeOptions(target_width=width, target_height=height, outscale=outscale)
        check_options(options)
        if probe(data) is not None:
            return self._upscale_animation(data, output_format, quality, options)
        fmt = STILL_DEFAULT if output_format == AUTO else output_format
        decoded = decode_image(data, self.limits.max_pixels, self.limits.max_request_bytes)
        in_h, in_w = decoded.rgb.shape[:2]
        scale = self.pipeline.scale
        size = output_size(options, in_w, in_h) or (in_w * scale, in_h * scale)
        needed_factor(in_w, in_h, size, scale, f"the scale of {self.pipeline.name}")
        sr = finish_output(self.upscale(decoded.rgb), decoded, scale)
        image = encode_image(resize_output(sr, size), fmt, quality)
        return LocalResult(image, size[0], size[1], size != (in_w * scale, in_h * scale), 1, fmt)

    def _upscale_animation(
        self, data: bytes, output_format: str, quality: int, options: SizeOptions
    ) -> LocalResult:
        """Every frame of a GIF, APNG or animated WebP through the engine, the server's way."""
        limits = self.limits
        header = read_animation_header(data, limits.max_pixels, limits.max_request_bytes)
        kind = container_of(output_format, header.kind, header.frames)
        in_w, in_h, scale = header.width, header.height, self.pipeline.scale
        size = output_size(options, in_w, in_h) or (in_w * scale, in_h * scale)
        needed_factor(in_w, in_h, size, scale, f"the scale of {self.pipeline.name}")
        if kind is not None:
            check_animation_side(kind, *size)
        animation, frames = decode_animation(data, header)
        canvases = [np.empty((scale * in_h, scale * in_w, 3), np.uint8) for _ in frames]
        run = self.pipeline.run(
            _Direct(self.pipeline.engine),
            [frame.rgb.transpose(2, 0, 1) for frame in frames],
            [canvas.transpose(2, 0, 1) for canvas in canvases],
            "local",
            to_model=to_unit_float,
            from_model=to_uint8,
        )
        asyncio.run(run)
        spec = OutputSpec(output_format, quality)
        image, fmt = finish_frames(canvases, frames, animation, kind, spec, scale, size)
        resized = size != (in_w * scale, in_h * scale)
        return LocalResult(image, size[0], size[1], resized, len(frames), fmt)
