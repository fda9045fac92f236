"""The README's picture of a real JPEG upscaled three ways: bicubic | clean model | photo model.

There is no ground truth for a real JPEG, so the crop shown is the most detailed square of the
photo model's output (``rdn.eval_pictures.comparison_box``), enlarged like rdn-eval's comparisons.

    python docs/photo_comparison.py data/BSDS200/100075.jpg \\
        --clean server/models/default_x2.onnx --photo server/models/rdn_x2_photo.onnx \\
        -o docs/photo_x2.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from rdn.eval_pictures import comparison_image
from rdn.evaluate import EvalError, OnnxUpscaler
from rdn.imaging import ImageReadError, read_rgb, upscale_bicubic

log = logging.getLogger("photo_comparison")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photo_comparison", description=__doc__)
    parser.add_argument("image", type=Path, help="an image file (a real JPEG)")
    parser.add_argument("--clean", type=Path, required=True, help="ONNX model trained on bicubic")
    parser.add_argument("--photo", type=Path, required=True, help="ONNX photo model, same scale")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        lr = read_rgb(args.image)
        clean, photo = OnnxUpscaler(args.clean), OnnxUpscaler(args.photo)
        if clean.scale != photo.scale:
            raise EvalError(f"the models' scales differ: x{clean.scale} and x{photo.scale}")
        panels = upscale_bicubic(lr, clean.scale), clean(lr), photo(lr)
    except (EvalError, ImageReadError, OSError) as e:
        print(f"photo_comparison: error: {e}", file=sys.stderr)
        return 1
    # comparison_image shows (bicubic, sr, reference) and picks the crop on the reference.
    Image.fromarray(comparison_image(panels[2], panels[0], panels[1])).save(
        args.output, optimize=True
    )
    log.info("wrote %s (bicubic | clean | photo, x%d)", args.output, clean.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
