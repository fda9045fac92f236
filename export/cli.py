"""rdn-export: checkpoint -> verified ONNX file (and optionally a Triton model repository).

    rdn-export --checkpoint CKPT --output model.onnx [--opset N] [--fp16] [--no-verify]
               [--verify-image PNG] [--triton-repo DIR [--model-name NAME] [--max-batch B]]
               [--int8 --calibrate DIR [--calibrate-limit N] [--int8-max-loss DB]
                [--allow-int8-loss] [--reference FLOAT.onnx]]

Progress goes to stderr one line per fact; the last line on stdout names what was written.
Errors are one line on stderr: exit 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from export.to_onnx import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ExportError,
    ExportOptions,
    check_opset,
    export_onnx,
)
from export.triton import TritonModelConfig, serve_command, write_model_repository
from export.verify import check_writable
from rdn.metadata import valid_model_name

PROG = "rdn-export"
log = logging.getLogger(PROG)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _opset(text: str) -> int:
    try:
        opset = int(text)
        check_opset(opset)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"opset must be an integer, got {text!r}") from e
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return opset


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _model_name(text: str) -> str:
    if not valid_model_name(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '_', '.', '-' (at most 64, starting with a letter "
            "or digit)"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = TritonModelConfig()
    p = _Parser(prog=PROG, description="Export an RDN checkpoint to a verified ONNX file.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint from rdn-train")
    p.add_argument("--output", type=Path, required=True, help="ONNX file to write (atomically)")
    p.add_argument(
        "--opset",
        type=_opset,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights for GPUs (inputs and outputs stay float32)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the onnxruntime-vs-torch and fold checks (structure is still checked)",
    )
    p.add_argument(
        "--verify-image",
        type=Path,
        help="RGB image for the real-image check (default: scikit-image's astronaut)",
    )
    p.add_argument(
        "--name",
        type=_model_name,
        help="the name rdn-serve serves it under (default rdn_x{scale}, with the training "
        "degradation appended when not bicubic: rdn_x2_photo)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="write a QDQ int8 model (integer convolutions on CPUs); a --qat checkpoint keeps "
        "its trained ranges, a float one is calibrated on --calibrate",
    )
    p.add_argument(
        "--calibrate",
        type=Path,
        help="with --int8: folder of photos to calibrate on and to measure the int8 model's "
        "Y-PSNR loss against the float one",
    )
    p.add_argument(
        "--calibrate-limit",
        type=_positive,
        default=ExportOptions.calibrate_limit,
        help=f"photos of --calibrate used (default {ExportOptions.calibrate_limit})",
    )
    p.add_argument(
        "--int8-max-loss",
        type=_nonnegative_float,
        default=ExportOptions.int8_max_loss,
        help=f"refuse an int8 model losing more Y-PSNR dB (default {ExportOptions.int8_max_loss})",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="with --int8: the float ONNX model the int8 one replaces (e.g. the model a --qat "
        "run started from); the loss is measured against it instead of the float graph of the "
        "same weights",
    )
    p.add_argument(
        "--allow-int8-loss",
        action="store_true",
        help="write the int8 model even when it loses more than --int8-max-loss",
    )
    p.add_argument("--triton-repo", type=Path, help="also write a Triton model repository here")
    p.add_argument(
        "--model-name", help=f"Triton model name (default {defaults.name!r}; needs --triton-repo)"
    )
    p.add_argument(
        "--max-batch",
        type=_positive,
        help=f"Triton max_batch_size (default {defaults.max_batch_size}; needs --triton-repo)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.triton_repo is None and (args.model_name is not None or args.max_batch is not None):
        parser.error("--model-name and --max-batch need --triton-repo")
    if args.int8 and args.calibrate is None:
        parser.error("--int8 needs --calibrate DIR (photos to calibrate on and to verify with)")
    if args.int8 and args.fp16:
        parser.error("--int8 and --fp16 exclude each other")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    triton = None
    if args.triton_repo is not None:
        overrides = {"name": args.model_name, "max_batch_size": args.max_batch}
        try:
            triton = TritonModelConfig(**{k: v for k, v in overrides.items() if v is not None})
        except ValueError as e:
            parser.error(str(e))
    options = ExportOptions(
        opset=args.opset,
        fp16=args.fp16,
        verify=args.verify,
        verify_image=args.verify_image,
        name=args.name or "",
        int8=args.int8,
        calibrate=args.calibrate,
        calibrate_limit=args.calibrate_limit,
        int8_max_loss=args.int8_max_loss,
        allow_int8_loss=args.allow_int8_loss,
        reference=args.reference,
    )
    try:
        if triton is not None:  # fail before the export, not after
            check_writable(args.triton_repo / triton.name / "config.pbtxt")
        report = export_onnx(args.checkpoint, args.output, options)
        if triton is not None:
            folder = write_model_repository(args.triton_repo, args.output, triton, report.metadata)
            log.info("wrote Triton model %s (config.pbtxt, 1/model.onnx)", folder)
            log.info("serve it with: %s", serve_command(args.triton_repo))
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the Triton repository write
        print(f"{PROG}: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    diff = (
        "not verified" if report.max_abs_diff is None else f"max |diff| {report.max_abs_diff:.3g}"
    )
    if report.int8_loss is not None:
        diff += f", int8 loses {report.int8_loss.loss_db:.3f} dB Y-PSNR"
    print(f"{report.output} x{report.scale} {report.precision} opset {report.opset} {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
