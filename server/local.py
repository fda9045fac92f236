"""The local API: upscale in-process with the server's pipeline (same tiling, same resize,
same codecs), without a server and without torch.

    from server.local import LocalUpscaler

    upscaler = LocalUpscaler("rdn_x2")  # a shipped model's name, or an .onnx file's path
    upscaler = LocalUpscaler("auto", scale=2)  # per image: the clean or the photo x2 model
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

from rdn.constants import CPU, DEFAULT_SCALE
from server.config import EngineConfig, LimitsConfig, TilingConfig
from server.core.animated import AUTO, STILL_DEFAULT, finish_frames
from server.core.batch_types import Reservation, TileResult
from server.core.chunked import chunk_tiles, from_unit_float, to_unit_float
from server.core.engine import Engine
from server.core.model_choice import ModelChoice, choose_model
from server.core.pipeline import Pipeline, PipelineEngine, PipelineSettings
from server.core.planner import make_planner
from server.core.repository import (
    RepositoryConfig,
    Snapshot,
    choose_defaults,
    choose_photos,
    discover,
    model_name_of,
)
from server.core.sizing import SizeOptions, check_options, needed_factor, output_size, resize_output
from server.core.upscaling import OutputSpec
from server.imaging.alpha import alpha_planes, fold_alpha
from server.imaging.animation import (
    check_animation_side,
    container_of,
    decode_animation,
    probe,
    read_animation_header,
)
from server.imaging.codec import answer_notes, decode_image, encode_image, finish_output
from server.imaging.options import ImageOptions, alpha_mode
from server.models import MODELS_DIR
from server.wire import AUTO_MODEL

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
    model: str = ""  # the model that ran
    model_reason: str = ""  # why (model "auto": what the input showed)
    notes: tuple[str, ...] = ()  # what the answer could not keep (16 bits in a JPEG ...)
    frames: int = 1  # an animation's frames
    format: str = "png"  # the answer's format ("auto" resolved)


def _open(path: Path, engine: EngineConfig, tiling: TilingConfig, ensemble: bool) -> Pipeline:
    opened = Engine(path, engine)
    planner = make_planner(tiling, opened.active_provider)
    settings = PipelineSettings(ensemble=ensemble, chunk_tiles=chunk_tiles(LOCAL_MAX_BATCH))
    return Pipeline(model_name_of(path), path, opened, planner, settings)


def shipped_choice(
    scale: int, engine: EngineConfig, tiling: TilingConfig, ensemble: bool
) -> Snapshot:
    """The shipped models of ``scale`` that ``model=auto`` chooses between, picked by
    rdn-serve's rules (its default clean model and photo model, int8 twins where preferred)."""
    shipped = discover(RepositoryConfig(model_dir=MODELS_DIR))
    found = {n: p for n, p in shipped.items() if f"_x{scale}" in n or n == f"default_x{scale}"}
    models = {n: _open(p, engine, tiling, ensemble) for n, p in found.items()}
    models = {n: p for n, p in models.items() if p.scale == scale}
    if not models:
        raise ValueError(f"no shipped model of scale x{scale}; shipped: {', '.join(shipped)}")
    defaults = choose_defaults(models, ())
    photos = choose_photos(models, defaults)
    used = {defaults[scale], *photos.values()}
    return Snapshot({n: models[n] for n in used}, defaults, defaults[scale], photos)


class LocalUpscaler:
    """ONNX models and their pipeline, run in this process: ``model`` is an .onnx file, the
    name of a shipped model (``rdn_x2``, ``rdn_x4_photo`` ...), or ``"auto"``: the shipped clean
    and photo models of ``scale``, one chosen per image as rdn-serve's ``model=auto`` does."""

    def __init__(
        self,
        model: str | Path,
        engine: EngineConfig = CPU_ONLY,
        tiling: TilingConfig = DEFAULT_TILING,
        limits: LimitsConfig = DEFAULT_LIMITS,
        ensemble: bool = False,
        scale: int = DEFAULT_SCALE,
    ) -> None:
        if str(model) == AUTO_MODEL:
            self._models = shipped_choice(scale, engine, tiling, ensemble)
            self.pipeline = self._models.default()
        else:
            self.pipeline = _open(resolve_model(model), engine, tiling, ensemble)
            name = self.pipeline.name
            self._models = Snapshot({name: self.pipeline}, {self.pipeline.scale: name}, name)
        self._options = SizeOptions(model="" if str(model) == AUTO_MODEL else self.pipeline.name)
        self.limits = limits

    @property
    def scale(self) -> int:
        return self.pipeline.scale

    def choose(self, rgb: np.ndarray, data: bytes | None = None) -> ModelChoice:
        """The model that answers this image (``data``: its file, read for JPEG tables)."""
        height, width = rgb.shape[:2]
        units = self.pipeline.units(height, width)
        return choose_model(self._models, self._options, self.pipeline, data, rgb, units, False)

    def upscale(self, rgb: np.ndarray) -> np.ndarray:
        """An H x W x 3 uint8 (or uint16: 16-bit in, 16-bit out) RGB array upscaled by the
        model's scale (model "auto": the model its pixels call for)."""
        if rgb.dtype not in (np.uint8, np.uint16) or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(
                f"expected an H x W x 3 uint8 or uint16 array, got {rgb.shape} {rgb.dtype}"
            )
        pipeline = self.choose(rgb).pipeline if rgb.dtype == np.uint8 else self.pipeline
        return self._run(pipeline, [rgb.transpose(2, 0, 1)], rgb.dtype)[0]

    def _run(
        self, pipeline: Pipeline, planes: list[np.ndarray], dtype: np.dtype
    ) -> list[np.ndarray]:
        """Each 3 x H x W of ``planes`` upscaled by ``pipeline``, as sH x sW x 3 ``dtype``."""
        scale = pipeline.scale
        outs = [np.empty((scale * p.shape[1], scale * p.shape[2], 3), dtype) for p in planes]
        run = pipeline.run(
            _Direct(pipeline.engine),
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
        output_format: str = "auto",
        quality: int = 95,
        *,
        width: int = 0,
        height: int = 0,
        outscale: float = 0.0,
        convert_to_srgb: bool = False,
        strip_metadata: bool = False,
        alpha: str = "",
    ) -> LocalResult:
        """An image file (PNG, JPEG, WebP, BMP, TIFF, HEIC, AVIF; GIF, APNG, animated WebP)
        upscaled and encoded as ``output_format`` ("png", "jpeg", "webp", "avif", "gif",
        "tiff", "raw"; "auto": an animation's own kind, else PNG); ``width`` and/or ``height`` or
        ``outscale`` resize the model's output as the server does (within 1 .. its scale).

        As the server: the ICC profile, EXIF (orientation applied, then 1) and XMP are carried
        and 16 bits kept where the format holds them; ``convert_to_srgb`` converts the pixels
        to sRGB instead of carrying the profile, ``strip_metadata`` drops EXIF and XMP,
        ``alpha`` ("model" or "bicubic", "" = the default) says how alpha is upscaled."""
        options = SizeOptions(target_width=width, target_height=height, outscale=outscale)
        check_options(options)
        if probe(data) is not None:
            return self._upscale_animation(data, output_format, quality, options)
        fmt = STILL_DEFAULT if output_format == AUTO else output_format
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
        choice = self.choose(decoded.rgb, data)
        outs = self._run(choice.pipeline, planes, decoded.rgb.dtype)
        sr_alpha = fold_alpha(outs[1]) if by_model else None
        sr = finish_output(outs[0], decoded, scale, sr_alpha)
        image = encode_image(resize_output(sr, size), fmt, quality, metadata=decoded.metadata)
        resized = size != (in_w * scale, in_h * scale)
        notes = answer_notes(decoded, fmt)
        name, reason = choice.pipeline.name, choice.reason
        return LocalResult(image, size[0], size[1], resized, name, reason, notes, 1, fmt)

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
        choice = self.choose(frames[0].rgb)
        planes = [frame.rgb.transpose(2, 0, 1) for frame in frames]
        canvases = self._run(choice.pipeline, planes, np.dtype(np.uint8))
        spec = OutputSpec(output_format, quality)
        image, fmt = finish_frames(canvases, frames, animation, kind, spec, scale, size)
        resized = size != (in_w * scale, in_h * scale)
        name, reason = choice.pipeline.name, choice.reason
        return LocalResult(image, size[0], size[1], resized, name, reason, (), len(frames), fmt)
