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
from server.core.batch_types import Reservation, TileResult
from server.core.chunked import chunk_tiles, from_unit_float, to_unit_float
from server.core.engine import Engine
from server.core.pipeline import Pipeline, PipelineEngine, PipelineSettings
from server.core.planner import make_planner
from server.core.repository import RepositoryConfig, discover, model_name_of
from server.core.sizing import SizeOptions, check_options, needed_factor, output_size, resize_output
from server.imaging.alpha import alpha_planes, fold_alpha
from server.imaging.codec import answer_notes, decode_image, encode_image, finish_output
from server.imaging.options import ImageOptions, alpha_mode
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
    notes: tuple[str, ...] = ()  # what the answer could not keep (16 bits in a JPEG ...)


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
        """An H x W x 3 uint8 (or uint16: 16-bit in, 16-bit out) RGB array upscaled by the
        model's scale."""
        if rgb.dtype not in (np.uint8, np.uint16) or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(
                f"expected an H x W x 3 uint8 or uint16 array, got {rgb.shape} {rgb.dtype}"
            )
        return self._run([rgb.transpose(2, 0, 1)], rgb.dtype)[0]

    def _run(self, planes: list[np.ndarray], dtype: np.dtype) -> list[np.ndarray]:
        """Each 3 x H x W of ``planes`` upscaled, as sH x sW x 3 arrays of ``dtype``."""
        scale = self.pipeline.scale
        outs = [np.empty((scale * p.shape[1], scale * p.shape[2], 3), dtype) for p in planes]
        run = self.pipeline.run(
            _Direct(self.pipeline.engine),
            planes,
            [out.transpose(2, 0, 1) for out in outs],
            "local",
            to_model=to_unit_float,
            from_model=from_unit_float(dtype),
        )
        asyncio.run(run)
        return outs

    def upscale_bytes(
        self,
        data: bytes,
        output_format: str = "png",
        quality: int = 95,
        *,
        width: int = 0,
        height: int = 0,
        outscale: float = 0.0,
        convert_to_srgb: bool = False,
        strip_metadata: bool = False,
        alpha: str = "",
    ) -> LocalResult:
        """An image file (PNG, JPEG, WebP, BMP, TIFF) upscaled and encoded as
        ``output_format`` ("png", "jpeg", "webp", "raw"); ``width`` and/or ``height`` or
        ``outscale`` resize the model's output as the server does (within 1 .. its scale).

        As the server: the ICC profile, EXIF (orientation applied, then 1) and XMP are carried
        and 16 bits kept where the format holds them; ``convert_to_srgb`` converts the pixels
        to sRGB instead of carrying the profile, ``strip_metadata`` drops EXIF and XMP,
        ``alpha`` ("model" or "bicubic", "" = the default) says how alpha is upscaled."""
        options = SizeOptions(target_width=width, target_height=height, outscale=outscale)
        check_options(options)
        handling = ImageOptions(convert_to_srgb, strip_metadata, alpha_mode(alpha))
        limits = self.limits
        decoded = decode_image(data, limits.max_pixels, limits.max_request_bytes, options=handling)
        in_h, in_w = decoded.rgb.shape[:2]
        scale = self.pipeline.scale
        size = output_size(options, in_w, in_h) or (in_w * scale, in_h * scale)
        needed_factor(in_w, in_h, size, scale, f"the scale of {self.pipeline.name}")
        planes = [decoded.rgb.transpose(2, 0, 1)]
        by_model = decoded.alpha is not None and handling.alpha == "model"
        if by_model:
            planes.append(alpha_planes(decoded.alpha))
        outs = self._run(planes, decoded.rgb.dtype)
        sr_alpha = fold_alpha(outs[1]) if by_model else None
        sr = finish_output(outs[0], decoded, scale, sr_alpha)
        image = encode_image(
            resize_output(sr, size), output_format, quality, metadata=decoded.metadata
        )
        resized = size != (in_w * scale, in_h * scale)
        notes = answer_notes(decoded, output_format)
        return LocalResult(image, size[0], size[1], resized, notes)
