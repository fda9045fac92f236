"""The evaluation protocol: PSNR/SSIM (Y channel) of a model on a folder of HR images.

Protocol (the RDN paper's; docs/evaluation.md): for every image HR = modcrop(image, scale),
LR = MATLAB-style bicubic downscale of HR, SR = model(LR) rounded to 8 bits; SR and the
bicubic upscale of LR are scored against HR on Y with ``scale`` pixels shaved from every
border (greyscale files on their grey values, see ``rdn.metrics``). The same loop
(``evaluate``) serves both backends and training's validation (``evaluate_model``), so their
numbers are comparable.

A model is an ``Upscaler``: ``TorchUpscaler`` (an in-memory RDN) or ``OnnxUpscaler`` (a file
opened by ``rdn.onnx_session.open_model``, the rules the server's engine opens it with). The
command line is ``rdn.eval_cli`` (rdn-eval), the comparison pictures ``rdn.eval_pictures``.

torch is imported only where a torch model is involved: ``rdn-eval --onnx`` starts without it
(importing torch costs ~2 s and 220 MB).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from rdn.constants import CPU, CUDA, SCALES
from rdn.degradations import Degradation, degrade
from rdn.ensemble import self_ensemble
from rdn.imaging import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    downscale,
    from_tensor_layout,
    list_images,
    modcrop,
    read_rgb,
    to_tensor_layout,
    upscale_bicubic,
)
from rdn.metadata import KEY_SCALE
from rdn.metrics import psnr_y, rgb_to_grey, ssim_y
from rdn.onnx_session import (
    GpuRequired,
    ModelLoadError,
    OnnxModel,
    ProviderError,
    SessionConfig,
    open_model,
)

if TYPE_CHECKING:
    import torch

    from rdn.model import RDN

log = logging.getLogger("rdn.evaluate")

GREYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})  # Pillow modes


class EvalError(RuntimeError):
    """An evaluation cannot run (folder, model or image); the message names it and the fix."""


class Upscaler(Protocol):
    """A super-resolution model as evaluation sees it: HxWx3 uint8 LR -> sHxsWx3 uint8 SR."""

    scale: int

    def __call__(self, lr: np.ndarray) -> np.ndarray: ...


def _upscale_with(
    predict: Callable[[np.ndarray], np.ndarray], lr: np.ndarray, ensemble: bool
) -> np.ndarray:
    """Run an NCHW float predictor on one uint8 image, optionally x8 self-ensembled."""
    x = to_tensor_layout(lr)
    y = self_ensemble(predict, x) if ensemble else predict(x)
    return from_tensor_layout(y)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class TorchUpscaler:
    """An in-memory RDN on its own device; whole-image inference in eval mode.

    Each call switches the model to eval mode and restores its previous mode afterwards, so
    training can evaluate a model mid-run without disturbing it.
    """

    def __init__(self, model: RDN, *, self_ensemble: bool = False) -> None:
        self.model = model
        self.scale = model.config.scale
        self.self_ensemble = self_ensemble
        self.device = next(model.parameters()).device

    def predict(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 in [0, 1] -> NCHW float32 SR (not clipped)."""
        import torch

        with eval_mode(self.model), torch.inference_mode():
            y = self.model(torch.from_numpy(x).to(self.device))
        return y.float().cpu().numpy()

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        return _upscale_with(self.predict, lr, self.self_ensemble)


class OnnxUpscaler:
    """An ONNX model run by onnxruntime, opened by ``open_model`` (the server engine's rules).

    Every provider asked for must run: CUDA asked for where it cannot run is an error, not a
    silent CPU run. The scale is measured (and ``rdn.scale`` metadata must agree).
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] = (CPU,),
        self_ensemble: bool = False,
    ) -> None:
        path = Path(path)
        config = SessionConfig(providers=tuple(providers), require_gpu=CUDA in providers)
        try:
            self.model: OnnxModel = open_model(path, config)
        except GpuRequired as e:
            raise EvalError(f"{e}, or use --providers cpu") from e
        except (ModelLoadError, ProviderError) as e:
            raise EvalError(str(e)) from e
        if self.model.scale not in SCALES:
            raise EvalError(
                f"model file {path}: upscales x{self.model.scale}, not a scale in {SCALES}; is "
                "it a super-resolution model?"
            )
        if KEY_SCALE not in self.model.metadata:
            log.info("%s has no %s metadata; measured scale x%d", path, KEY_SCALE, self.scale)
        self.path = path
        self.session = self.model.session
        self.self_ensemble = self_ensemble

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def providers(self) -> list[str]:
        return list(self.model.providers)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 in [0, 1] -> NCHW float32 SR (not clipped)."""
        (y,) = self.session.run(None, {self.model.input_name: x.astype(np.float32, copy=False)})
        return np.asarray(y, dtype=np.float32)

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        return _upscale_with(self.predict, lr, self.self_ensemble)


@dataclass(frozen=True)
class ImageResult:
    """Scores of one image (PSNR in dB, infinite for an exact match; SSIM in [-1, 1])."""

    name: str
    model_psnr_y: float
    model_ssim_y: float
    bicubic_psnr_y: float
    bicubic_ssim_y: float
    greyscale: bool  # a single-channel file, scored on grey values instead of Y


@dataclass(frozen=True)
class ImageSample:
    """The images behind one ``ImageResult``, handed to ``evaluate``'s ``on_image`` hook."""

    path: Path
    hr: np.ndarray
    bicubic: np.ndarray
    sr: np.ndarray
    result: ImageResult


@dataclass(frozen=True)
class EvalResult:
    """Per-image scores of one run over a folder, with their means as properties."""

    scale: int
    images: tuple[ImageResult, ...]

    def _mean(self, key: str) -> float:
        return float(np.mean([getattr(image, key) for image in self.images]))

    @property
    def model_psnr_y(self) -> float:
        return self._mean("model_psnr_y")

    @property
    def model_ssim_y(self) -> float:
        return self._mean("model_ssim_y")

    @property
    def bicubic_psnr_y(self) -> float:
        return self._mean("bicubic_psnr_y")

    @property
    def bicubic_ssim_y(self) -> float:
        return self._mean("bicubic_ssim_y")

    def summary(self) -> dict[str, float | int]:
        """The means, image count and scale (what training logs)."""
        return {
            "model_psnr_y": self.model_psnr_y,
            "model_ssim_y": self.model_ssim_y,
            "bicubic_psnr_y": self.bicubic_psnr_y,
            "bicubic_ssim_y": self.bicubic_ssim_y,
            "scale": self.scale,
            "images": len(self.images),
        }

    def to_dict(self) -> dict[str, Any]:
        """``summary()`` plus ``per_image``."""
        return {**self.summary(), "per_image": [asdict(image) for image in self.images]}


def find_images(folder: Path) -> list[Path]:
    """The image files of a benchmark folder; ``EvalError`` if it is missing or has none."""
    folder = Path(folder)
    try:
        paths = list_images(folder)
    except FileNotFoundError as e:
        raise EvalError(f"{e}; pass a folder of HR images (e.g. tests/data/Set5)") from e
    if not paths:
        raise EvalError(
            f"image folder {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) directly inside"
        )
    return paths


def is_greyscale_file(path: Path) -> bool:
    """Whether the file stores a single channel (its header says so; pixels are not read)."""
    try:
        with Image.open(path) as image:
            return image.mode in GREYSCALE_MODES
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"image {path}: cannot be decoded ({e})") from e


def evaluate(
    upscale: Callable[[np.ndarray], np.ndarray],
    folder: Path,
    scale: int,
    *,
    on_image: Callable[[ImageSample], None] | None = None,
    degradation: Degradation | None = None,
    seed: int = 0,
) -> EvalResult:
    """Score ``upscale`` (uint8 LR -> uint8 SR) and bicubic on every image of ``folder``.

    The LR is the benchmark's bicubic downscale, or ``degradation`` applied to the HR with a
    generator seeded by ``(seed, image index)``; bicubic upscales the same LR.

    Models always see RGB; for a greyscale file the outputs are reduced to grey
    (``rgb_to_grey``) and scored against the file's grey values, as the benchmarks do.
    """
    results = []
    for index, path in enumerate(find_images(folder)):
        hr = modcrop(read_rgb(path), scale)
        greyscale = is_greyscale_file(path)
        if min(hr.shape[:2]) < 2 * scale:
            raise EvalError(f"image {path}: {hr.shape[1]}x{hr.shape[0]} is too small for x{scale}")
        if degradation is None or degradation.is_bicubic:
            lr = downscale(hr, scale)
        else:
            lr = degrade(hr, scale, degradation, np.random.default_rng([seed, index]))
        sr = upscale(lr)
        if sr.shape != hr.shape or sr.dtype != np.uint8:
            raise EvalError(
                f"image {path}: model returned {sr.dtype} {sr.shape} for LR {lr.shape}, expected "
                f"uint8 {hr.shape}; is the model x{scale}?"
            )
        bicubic = upscale_bicubic(lr, scale)
        truth, model_out, baseline = hr, sr, bicubic
        if greyscale:
            truth, model_out, baseline = hr[:, :, 0], rgb_to_grey(sr), rgb_to_grey(bicubic)
        try:
            result = ImageResult(
                name=path.stem,
                model_psnr_y=psnr_y(model_out, truth, shave=scale),
                model_ssim_y=ssim_y(model_out, truth, shave=scale),
                bicubic_psnr_y=psnr_y(baseline, truth, shave=scale),
                bicubic_ssim_y=ssim_y(baseline, truth, shave=scale),
                greyscale=greyscale,
            )
        except ValueError as e:
            raise EvalError(f"image {path}: {e}") from e
        results.append(result)
        if on_image is not None:
            on_image(ImageSample(path=path, hr=hr, bicubic=bicubic, sr=sr, result=result))
    return EvalResult(scale=scale, images=tuple(results))


def evaluate_model(
    model: RDN,
    folder: Path,
    scale: int | None = None,
    *,
    device: torch.device | str | None = None,
    self_ensemble: bool = False,
    degradation: Degradation | None = None,
) -> EvalResult:
    """Validation for training: score an in-memory model where it lives, mode left unchanged.

    ``scale`` defaults to the model's; ``device``, if given, must be where the model is (the
    model is not moved). Read ``.model_psnr_y`` / ``.model_ssim_y`` or ``.summary()``.
    """
    import torch

    upscaler = TorchUpscaler(model, self_ensemble=self_ensemble)
    if scale is not None and scale != upscaler.scale:
        raise ValueError(f"scale x{scale} given for a x{upscaler.scale} model")
    if device is not None and not same_device(torch.device(device), upscaler.device):
        raise ValueError(
            f"model is on {upscaler.device}, not {device}; move it first (model.to(device))"
        )
    return evaluate(upscaler, folder, upscaler.scale, degradation=degradation)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices name the same one; no index ("cuda") matches any index ("cuda:0")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
