"""rdn-eval: PSNR/SSIM (Y channel) of a checkpoint or an ONNX model on a benchmark folder.

Protocol (the RDN paper's; docs/evaluation.md): for every image HR = modcrop(image, scale),
LR = MATLAB-style bicubic downscale of HR, SR = model(LR) rounded to 8 bits; SR and the
bicubic upscale of LR are scored against HR on Y with ``scale`` pixels shaved from every
border (greyscale files on their grey values, see ``rdn.metrics``). The same loop
(``evaluate``) serves both backends and training's validation (``evaluate_model``), so their
numbers are comparable.

torch is imported only where a torch model is involved: ``rdn-eval --onnx`` starts without it
(importing torch costs ~2 s and 220 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnxruntime as ort
from PIL import Image

from rdn.degradations import Degradation, DegradationError, degrade, parse_degradation
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
from rdn.metrics import psnr_y, rgb_to_grey, rgb_to_y, ssim_y
from server.providers import CUDA, GPU_HINT, cuda_probe

if TYPE_CHECKING:
    import torch

    from rdn.model import RDN

log = logging.getLogger("rdn.evaluate")

SCALES = (2, 3, 4)  # rdn.model.SCALES, repeated so that this module does not import torch

ONNX_SCALE_KEY = "rdn.scale"  # metadata_props key the exporter writes
ONNX_PROBE_SIDE = 16  # LR pixels: probe input that measures the scale of an ONNX model lacking it
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GREYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})  # Pillow modes
COMPARISON_CROP = 128  # HR pixels: side of the region shown in a comparison picture
COMPARISON_PANEL = 256  # pixels: smaller crops are enlarged (nearest neighbour) to at least this
COMPARISON_GAP = 4  # pixels of white between the panels
COMPARISON_STRIDE = 8  # HR pixels: grid on which the highest-variance crop is searched


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
    """An ONNX model run by onnxruntime; the scale comes from metadata ``rdn.scale``.

    A model without that metadata is measured once on a small probe input instead.
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        self_ensemble: bool = False,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"model file {path}: no such file")
        if CUDA in providers and not cuda_probe().usable:
            # Checked before onnxruntime is asked, which would log an error and a warning first.
            raise EvalError(
                f"{CUDA} cannot run here: {cuda_probe().reason}; {GPU_HINT}, or use --providers cpu"
            )
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers))
        except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail)
            raise EvalError(
                f"model file {path}: not a loadable ONNX model (truncated, or not ONNX?): "
                f"{_first_line(e)}"
            ) from e
        # onnxruntime falls back to CPU when a provider's libraries are missing: refuse that.
        missing = [p for p in providers if p not in self.session.get_providers()]
        if missing:
            raise EvalError(
                f"model file {path}: onnxruntime could not start {', '.join(missing)} and would "
                f"run on {', '.join(self.session.get_providers())} (CUDA 13 / cuDNN 9 libraries "
                "missing?); install onnxruntime-gpu[cuda,cudnn] or use --providers cpu"
            )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise EvalError(
                f"model file {path}: expected one NCHW input and one output, got inputs "
                f"{[(i.name, i.shape) for i in inputs]} and {len(outputs)} output(s); "
                "export it with rdn-export"
            )
        self.path = path
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.self_ensemble = self_ensemble
        self.scale = self._read_scale()

    def _read_scale(self) -> int:
        metadata = self.session.get_modelmeta().custom_metadata_map
        if ONNX_SCALE_KEY in metadata:
            value = metadata[ONNX_SCALE_KEY]
            if not value.strip().isdigit() or int(value) not in SCALES:
                raise EvalError(
                    f"model file {self.path}: metadata {ONNX_SCALE_KEY}={value!r} is not one of "
                    f"{SCALES}; re-export the model with rdn-export"
                )
            return int(value)
        probe = np.zeros((1, 3, ONNX_PROBE_SIDE, ONNX_PROBE_SIDE), np.float32)
        side = self.predict(probe).shape[-1]
        if side % ONNX_PROBE_SIDE or side // ONNX_PROBE_SIDE not in SCALES:
            raise EvalError(
                f"model file {self.path}: maps {ONNX_PROBE_SIDE} pixels to {side}, not a scale "
                f"in {SCALES}; is it a super-resolution model?"
            )
        log.info("%s has no %s metadata; measured scale x%d", self.path, ONNX_SCALE_KEY, side)
        return side // ONNX_PROBE_SIDE

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 in [0, 1] -> NCHW float32 SR (not clipped)."""
        (y,) = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})
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


def comparison_box(hr: np.ndarray, size: int = COMPARISON_CROP) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the ``size``-pixel square with the largest Y variance.

    Searched on a ``COMPARISON_STRIDE`` grid; ties go to the first (top-left) position, so the
    choice is deterministic. Images smaller than ``size`` are shown whole along that side.
    """
    y = rgb_to_y(hr)
    h, w = y.shape
    ch, cw = min(size, h), min(size, w)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = y.cumsum(0).cumsum(1)
    integral_sq = np.zeros((h + 1, w + 1))
    integral_sq[1:, 1:] = (y * y).cumsum(0).cumsum(1)
    tops = np.arange(0, h - ch + 1, COMPARISON_STRIDE)[:, None]
    lefts = np.arange(0, w - cw + 1, COMPARISON_STRIDE)[None, :]

    def window_sum(table: np.ndarray) -> np.ndarray:
        return (
            table[tops + ch, lefts + cw]
            - table[tops, lefts + cw]
            - table[tops + ch, lefts]
            + table[tops, lefts]
        )

    n = ch * cw
    variance = window_sum(integral_sq) / n - (window_sum(integral) / n) ** 2
    i, j = np.unravel_index(int(np.argmax(variance)), variance.shape)
    return int(tops[i, 0]), int(lefts[0, j]), ch, cw


def comparison_image(
    hr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, size: int = COMPARISON_CROP
) -> np.ndarray:
    """bicubic | model | ground truth of one crop, side by side with white gaps, uint8 RGB."""
    top, left, ch, cw = comparison_box(hr, size)
    zoom = max(1, math.ceil(COMPARISON_PANEL / max(ch, cw)))
    panels = [
        np.repeat(np.repeat(image[top : top + ch, left : left + cw], zoom, 0), zoom, 1)
        for image in (bicubic, sr, hr)
    ]
    ph, pw = ch * zoom, cw * zoom
    canvas = np.full((ph, 3 * pw + 2 * COMPARISON_GAP, 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        x = k * (pw + COMPARISON_GAP)
        canvas[:, x : x + pw] = panel
    return canvas


def save_comparison(sample: ImageSample, folder: Path, scale: int) -> Path:
    """Write ``<folder>/<image>_x<scale>.png`` (bicubic | model | ground truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sample.path.stem}_x{scale}.png"
    Image.fromarray(comparison_image(sample.hr, sample.bicubic, sample.sr)).save(
        path, optimize=True
    )
    return path


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (raised, so ``main`` returns 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rdn-eval",
        description="PSNR/SSIM on Y (shave = scale) of an RDN checkpoint or ONNX model, "
        "against bicubic, on a folder of HR images.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint written by rdn-train")
    source.add_argument("--onnx", type=Path, help="ONNX model written by rdn-export")
    parser.add_argument("--data", type=Path, required=True, help="folder of HR images")
    parser.add_argument(
        "--scale", type=int, choices=SCALES, help="upscaling factor (default: the model's)"
    )
    parser.add_argument(
        "--degradation",
        default="bicubic",
        metavar="SPEC",
        help="LR made from HR by: bicubic (default, the benchmark), bd, dn, jpeg:Q, noise:S or "
        "photo; bicubic upscales the same LR",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the degradation's random draws (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--self-ensemble", action="store_true", help="x8 flip/rotate self-ensemble (RDN+)"
    )
    parser.add_argument(
        "--save-comparison",
        type=Path,
        metavar="DIR",
        help="write bicubic | model | ground-truth crops as PNGs into DIR",
    )
    parser.add_argument(
        "--comparison-limit",
        type=int,
        metavar="N",
        help="with --save-comparison: only the first N images",
    )
    parser.add_argument(
        "--comparison-image",
        action="append",
        metavar="NAME",
        help="with --save-comparison: only this image (file name without extension); repeatable",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        help="--checkpoint only: torch device (default auto: cuda if available)",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        metavar="PROVIDER",
        help="--onnx only: onnxruntime execution providers in priority order, full names or "
        "cpu/cuda/tensorrt (default cpu)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    return parser


def _check_usage(args: argparse.Namespace) -> None:
    try:
        args.degradation = parse_degradation(args.degradation)
    except DegradationError as e:
        raise _UsageError(f"--degradation: {e}") from e
    if args.checkpoint is not None and args.providers is not None:
        raise _UsageError("--providers applies to --onnx; use --device with --checkpoint")
    if args.onnx is not None and args.device is not None:
        raise _UsageError("--device applies to --checkpoint; use --providers with --onnx")
    if args.comparison_image is not None and args.save_comparison is None:
        raise _UsageError("--comparison-image needs --save-comparison DIR")
    if args.comparison_limit is not None:
        if args.save_comparison is None:
            raise _UsageError("--comparison-limit needs --save-comparison DIR")
        if args.comparison_limit < 1:
            raise _UsageError(f"--comparison-limit must be >= 1, got {args.comparison_limit}")


def _providers(names: Sequence[str] | None) -> list[str]:
    if not names:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    providers = []
    for name in names:
        provider = PROVIDER_ALIASES.get(name.lower(), name)
        if provider not in available:
            raise _UsageError(
                f"--providers: unknown provider {name!r}; available: {', '.join(available)}"
            )
        providers.append(provider)
    return providers


def _torch_device(name: str | None) -> torch.device:
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError(
            f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu"
        )
    return torch.device(name)


def _load_upscaler(args: argparse.Namespace, providers: list[str]) -> tuple[Upscaler, str]:
    """The upscaler the arguments name, and a description of where it runs."""
    if args.checkpoint is not None:
        from rdn.checkpoint import CheckpointError, load_model

        device = _torch_device(args.device)
        try:
            model, _ = load_model(args.checkpoint, map_location=device)
        except CheckpointError as e:
            raise EvalError(str(e)) from e
        return TorchUpscaler(model, self_ensemble=args.self_ensemble), f"torch {device}"
    upscaler = OnnxUpscaler(args.onnx, providers=providers, self_ensemble=args.self_ensemble)
    return upscaler, f"onnxruntime {','.join(upscaler.providers)}"


def _json_number(value: float) -> float | None:
    """Strict JSON has no Infinity: an exact match (PSNR = inf) is written as null."""
    return value if math.isfinite(value) else None


def _json_report(result: EvalResult, args: argparse.Namespace, runs_on: str) -> str:
    report: dict[str, Any] = {
        **result.to_dict(),
        "self_ensemble": bool(args.self_ensemble),
        "model": str(args.checkpoint or args.onnx),
        "backend": runs_on,
        "data": str(args.data),
        "degradation": args.degradation.spec,
        "seed": args.seed,
    }
    for key in ("model_psnr_y", "model_ssim_y", "bicubic_psnr_y", "bicubic_ssim_y"):
        report[key] = _json_number(report[key])
    report["per_image"] = [
        {k: _json_number(v) if isinstance(v, float) else v for k, v in image.items()}
        for image in report["per_image"]
    ]
    return json.dumps(report, allow_nan=False)


TABLE_ROW = "{:<16} {:>11} {:>11} {:>13} {:>13}"


def _row(name: str, psnr: float, ssim: float, bic_psnr: float, bic_ssim: float) -> str:
    return TABLE_ROW.format(
        name[:16], f"{psnr:.2f}", f"{ssim:.4f}", f"{bic_psnr:.2f}", f"{bic_ssim:.4f}"
    )


def _run(args: argparse.Namespace, upscaler: Upscaler, runs_on: str) -> EvalResult:
    """Evaluate, printing the table as images finish and saving comparisons if asked."""
    saved = 0

    def on_image(sample: ImageSample) -> None:
        nonlocal saved
        r = sample.result
        if args.json:
            log.info("%s: model %.2f dB, bicubic %.2f dB", r.name, r.model_psnr_y, r.bicubic_psnr_y)
        else:
            row = _row(r.name, r.model_psnr_y, r.model_ssim_y, r.bicubic_psnr_y, r.bicubic_ssim_y)
            print(row, flush=True)
        limit, wanted = args.comparison_limit, args.comparison_image
        if (
            args.save_comparison is not None
            and (limit is None or saved < limit)
            and (wanted is None or r.name in wanted)
        ):
            log.info("wrote %s", save_comparison(sample, args.save_comparison, upscaler.scale))
            saved += 1

    model = args.checkpoint or args.onnx
    log.info("evaluating %s (x%d, %s) on %s", model, upscaler.scale, runs_on, args.data)
    if not args.json:
        print(TABLE_ROW.format("image", "model PSNR", "model SSIM", "bicubic PSNR", "bicubic SSIM"))
    return evaluate(
        upscaler,
        args.data,
        upscaler.scale,
        on_image=on_image,
        degradation=args.degradation,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_usage(args)
        providers = _providers(args.providers) if args.onnx is not None else []
    except _UsageError as e:
        print(f"rdn-eval: error: {e} (see rdn-eval --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # onnxruntime logs a provider that fails to load in lines of its own; OnnxUpscaler turns
    # that case into one error, so keep them for --verbose.
    ort.set_default_logger_severity(2 if args.verbose else 4)
    try:
        find_images(args.data)  # fail on a bad folder before loading a model
        upscaler, runs_on = _load_upscaler(args, providers)
        if args.scale is not None and args.scale != upscaler.scale:
            print(
                f"rdn-eval: error: --scale {args.scale} does not match the model's scale "
                f"x{upscaler.scale}; omit --scale or pass a x{args.scale} model",
                file=sys.stderr,
            )
            return 2
        result = _run(args, upscaler, runs_on)
    except (EvalError, ImageReadError, OSError) as e:
        print(f"rdn-eval: error: {_first_line(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(_json_report(result, args, runs_on))
    else:
        means = (result.model_psnr_y, result.model_ssim_y)
        bicubic = (result.bicubic_psnr_y, result.bicubic_ssim_y)
        print(_row(f"mean ({len(result.images)})", *means, *bicubic))
        ensemble = "self-ensemble x8, " if args.self_ensemble else ""
        print(f"x{result.scale}, LR {args.degradation.spec}, {ensemble}{runs_on}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
