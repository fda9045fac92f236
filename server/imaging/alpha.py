"""An alpha channel upscaled by the model: the grey plane replicated to the three channels the
model takes, through the same tiles as the colour, and folded back to one plane.

Which images may carry alpha is read from the header before decoding, so the tile queue can
hold the alpha's tiles too from the start (server/core/upscaling.py reserves them)."""

from __future__ import annotations

import struct

import cv2
import numpy as np

_PNG_ALPHA_TYPES = (4, 6)  # grey + alpha, RGBA (a palette or colour key needs a tRNS chunk)


def declares_alpha(data: bytes | bytearray) -> bool:
    """Whether the image file ``data`` (its header already checked) may decode with alpha:
    exact for PNG and WebP, cautious (True) for TIFF, False for JPEG and BMP."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        image_data = data.find(b"IDAT")
        return data[25] in _PNG_ALPHA_TYPES or b"tRNS" in data[: max(image_data, 0)]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8X":
            return bool(data[20] & 0x10)
        if chunk == b"VP8L":
            (bits,) = struct.unpack("<I", data[21:25])
            return bool((bits >> 28) & 1)
        return False
    # TIFF, and HEIC / AVIF (ISOBMFF: whether an alpha item exists is not read here): may
    return data[:4] in (b"II*\x00", b"MM\x00*") or data[4:8] == b"ftyp"


def alpha_planes(alpha: np.ndarray) -> np.ndarray:
    """H x W alpha -> 3 x H x W, a read-only view (no copy): the model's planar input."""
    return np.broadcast_to(alpha, (3, *alpha.shape))


def fold_alpha(sr_planes: np.ndarray) -> np.ndarray:
    """sH x sW x 3 model output of an alpha -> sH x sW, its channels' weighted mean (they
    differ only by the model's small colour cross-talk)."""
    return cv2.cvtColor(sr_planes, cv2.COLOR_RGB2GRAY)
