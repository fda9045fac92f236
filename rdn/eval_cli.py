"""rdn-eval: PSNR/SSIM (Y channel) of a checkpoint or an ONNX model on a benchmark folder.

The command line around ``rdn.evaluate`` (the protocol) and ``rdn.eval_pictures`` (the
comparison pictures): options, the table or JSON report, one-line errors. torch is imported only
for ``--checkpoint``: ``rdn-eval --onnx`` starts without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from rdn.constants import CPU, CUDA, SCALES
from rdn.degradations import DegradationError, parse_degradation
from rdn.eval_pictures import save_comparison
from rdn.evaluate import (
    EvalError,
    EvalResult,
    ImageSample,
    OnnxUpscaler,
    TorchUpscaler,
    Upscaler,
    evaluate,
    find_images,
)
from rdn.imaging import ImageReadError
from rdn.onnx_session import first_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rdn.evaluate")

PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (raised, so ``main`` returns 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


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
        return [CPU]
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
        print(f"rdn-eval: error: {first_line(e)}", file=sys.stderr)
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
