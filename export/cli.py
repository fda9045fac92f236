"""rdn-export: checkpoint -> verified ONNX file (and optionally a Triton model repository).

    rdn-export --checkpoint CKPT --output model.onnx [--opset N] [--fp16] [--no-verify]
               [--verify-image PNG] [--triton-repo DIR [--model-name NAME] [--max-batch B]]

Progress goes to stderr one line per fact; the last line on stdout names what was written.
Errors are one line on stderr: exit 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from export.metadata import valid_model_name
from export.to_onnx import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ExportError,
    ExportOptions,
    check_opset,
    check_writable,
    export_onnx,
)
from export.triton import TritonModelConfig, serve_command, write_model_repository

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
    print(f"{report.output} x{report.scale} {report.precision} opset {report.opset} {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
