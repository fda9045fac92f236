"""HEIC and AVIF in, AVIF and GIF out: the formats OpenCV does not read or write, through
Pillow (AVIF is built into Pillow >= 11.2 with libavif) and pillow-heif (libheif, HEIC).

``server/imaging/codec.py`` calls these after the header checks (``server/imaging/isobmff.py``
reads the declared size first), so only images within the pixel limit reach a decoder.
Decoding gives OpenCV's channel order (BGR / BGRA / grey) so the rest of ``decode_image`` is
shared with the other formats. HEIC and AVIF come back 8-bit (higher depths are rounded by
the decoders) with their rotation and mirroring ('irot', 'imir') applied.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from server.imaging.headers import Header, ImageError

log = logging.getLogger(__name__)

PILLOW_INPUTS = ("avif", "heic")  # input formats decoded here instead of by OpenCV
PILLOW_OUTPUTS = ("avif", "gif")  # output formats encoded here
AVIF_SPEED = 8  # libavif encoder speed 0 (slowest, smallest) .. 10; 8 keeps a 2 MP answer < 1 s
GIF_COLOURS = 255  # palette entries for colours; the 256th is the transparent one
GIF_TRANSPARENT = 255  # palette index of transparent pixels
GIF_ALPHA_CUT = 128  # alpha below this is transparent in a GIF (GIF has 1-bit transparency)


def _heic_pixels(data: bytes) -> np.ndarray:
    import pillow_heif  # imported on first use: libheif's start-up is only paid by HEIC users

    heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
    return np.asarray(heif)


def _avif_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["AVIF"]) as image:
        image.load()
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            return np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
        return np.asarray(image)


def decode_pillow(data: bytes, fmt: str) -> np.ndarray:
    """An AVIF or HEIC file as H x W (grey), H x W x 3 (BGR) or H x W x 4 (BGRA) uint8."""
    try:
        pixels = _heic_pixels(data) if fmt == "heic" else _avif_pixels(data)
    except Exception as e:  # the decoders raise ValueError, OSError, RuntimeError ...
        raise ImageError(
            f"{fmt.upper()} data could not be decoded ({len(data)} bytes: {e}; truncated or "
            "corrupt?); send the complete file"
        ) from e
    if pixels.dtype != np.uint8:
        raise ImageError(f"{fmt.upper()} image has {pixels.dtype} samples; expected 8 bits")
    if pixels.ndim == 3 and pixels.shape[2] == 2:  # grey + alpha
        grey, alpha = pixels[:, :, 0], pixels[:, :, 1]
        return np.dstack([grey, grey, grey, alpha])
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        return np.ascontiguousarray(pixels[:, :, [2, 1, 0, 3][: pixels.shape[2]]])
    return pixels


def within_extents(pixels: np.ndarray, header: Header) -> bool:
    """A decoded HEIF image fits its declared extents ('ispe' is the coded size: a 'clap'
    crop makes the image smaller, an 'irot' rotation swaps its sides)."""
    height, width = pixels.shape[:2]
    fits = height <= header.height and width <= header.width
    return fits or (height <= header.width and width <= header.height)


def to_palette(image: np.ndarray) -> Image.Image:
    """H x W x C uint8 (C = 1, 3 or 4) as a GIF frame: an adaptive palette of at most
    GIF_COLOURS colours (median cut), and, for RGBA, pixels with alpha < GIF_ALPHA_CUT on the
    transparent index GIF_TRANSPARENT (the frame's ``info["transparency"]``)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    rgb = image.reshape(image.shape[0], image.shape[1], -1)[:, :, : min(channels, 3)]
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    frame = Image.fromarray(np.ascontiguousarray(rgb)).quantize(
        GIF_COLOURS, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    if channels == 4:
        indices = np.asarray(frame).copy()
        indices[image[:, :, 3] < GIF_ALPHA_CUT] = GIF_TRANSPARENT
        palette = frame.getpalette() or []
        frame = Image.fromarray(indices, "P")
        frame.putpalette(palette + [0] * (768 - len(palette)))
        frame.info["transparency"] = GIF_TRANSPARENT
    return frame


def encode_pillow(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """H x W x C uint8 (C = 1 grey, 3 RGB, 4 RGBA) as an AVIF (quality 1..100) or a one-frame
    GIF (palette; transparency where alpha < GIF_ALPHA_CUT)."""
    height, width = image.shape[:2]
    out = io.BytesIO()
    try:
        if fmt == "gif":
            frame = to_palette(image)
            frame.save(out, "GIF", **frame.info)
        else:
            pixels = image.reshape(height, width) if image.ndim == 2 else image
            if pixels.ndim == 3 and pixels.shape[2] == 1:
                pixels = pixels.reshape(height, width)
            Image.fromarray(pixels).save(out, "AVIF", quality=quality, speed=AVIF_SPEED)
    except (OSError, ValueError) as e:
        raise ImageError(f"{fmt} encoding of a {width}x{height} image failed: {e}") from e
    return out.getvalue()
