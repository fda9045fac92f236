"""What kind of input a request holds, and which model suits it: the clean or the photo one.

The clean models (``default_x*``) were trained on clean bicubic LR; the photo models
(``rdn_x*_photo``) on LR damaged by JPEG and noise. Each is better on its own kind of input
(docs/models.md, "Choosing the model per input", has the measurements), so ``model=auto``
looks at the input and picks one:

- a JPEG file: the quality it was saved at, from its quantization tables (read from the file
  header by Pillow, no pixel decoded), matched against the IJG tables that libjpeg,
  libjpeg-turbo, OpenCV and Pillow all scale from their quality setting;
- any input: its noise level and its detail (a robust form of Immerkaer's fast estimator, on
  its flattest and busiest 8x8 blocks), and the blocking of an earlier JPEG compression (the
  step at 8-pixel boundaries against the steps elsewhere), for PNGs that were once JPEGs.

``measure`` computes the features, ``choose`` decides; both are pure and torch-free. A feature
that cannot be computed is ``None`` and never fails the request: the choice falls back to the
clean model and its reason says why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import JpegImagePlugin

Kind = Literal["clean", "photo"]

# IJG base tables (ITU-T T.81 Annex K, natural order), which libjpeg scales by the quality.
IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.int32,
).ravel()
IJG_CHROMA = np.array(
    [
        [17, 18, 24, 47, 99, 99, 99, 99],
        [18, 21, 26, 66, 99, 99, 99, 99],
        [24, 26, 56, 99, 99, 99, 99, 99],
        [47, 66, 99, 99, 99, 99, 99, 99],
        *[[99] * 8] * 4,
    ],
    dtype=np.int32,
).ravel()
JPEG_HEADER_BYTES = 1 << 20  # the tables precede the scans: markers past this are not read
JPEG_BLOCK = 8  # pixels: the side of a JPEG DCT block in the luma plane
# 2-D second difference: on white Gaussian noise of sigma s its response has deviation 6 s.
NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
NOISE_BLOCK = 8  # pixels: side of the blocks whose noise levels are compared
NOISE_BLOCK_PERCENTILE = 10  # the flattest tenth of the blocks sets the noise level
DETAIL_BLOCK_PERCENTILE = 90  # the busiest tenth sets the detail level
# sigma / mean |response|: sqrt(pi / 2) / 6 for Gaussian noise (6 s is the response's
# deviation), times 1.136 for the low percentile's bias (measured on 512x512 RGB Gaussian
# noise of sigma 2-20: 0.877-0.889 of the truth without it; greyscale reads 9 % lower).
NOISE_CALIBRATION = float(np.sqrt(np.pi / 2) / 6) * 1.136
FLAT_STEP = 4.0  # grey levels: mean neighbouring step below which a spot counts as flat
MIN_SIDE = 16  # pixels: smaller inputs are too small to measure (two JPEG blocks)
MAX_MEASURED_PIXELS = 1 << 20  # larger inputs are measured on a centred crop of this many

# Thresholds, set on 40 BSDS200 photos (every 5th from the first; no shipped model trained on
# BSDS200), centred crops of 160 LR pixels, fp32 clean and photo models, Y-PSNR as rdn-eval
# scores it (docs/models.md, "Choosing the model per input"). JPEG: the photo model's mean
# led from quality 85 down (x2: -0.17 dB at 90, +0.14 at 85; x4: -0.13, +0.03). Noise: from
# sigma 7 the photo model won on nearly every photo; at sigma 3-6 it won on smooth photos and
# lost on detailed ones, so there the noise is weighed against the detail (x2: 0.55 and 0.6
# tied on the tuning crops, 0.65 lost 0.19 dB at sigma 5 on the held-out SunHays80 photos;
# x4: 0.65 both kept the tuning crops and the SunHays80 photos within 0.04 dB). Blocking: the
# value that kept every PNG kind's mean closest to its better model.
PHOTO_MAX_JPEG_QUALITY = {2: 85, 4: 85}  # IJG quality of a JPEG file at or below: photo
# x2 only: a JPEG up to this quality whose detail is at most this is smooth enough for the
# photo model (quality 90: it won on smooth crops, lost on detailed ones; x4 showed no such
# split). Detail 7 lies on the tuning crops' plateau (4-7 all gained, +0.01-0.02 dB).
PHOTO_SMOOTH_JPEG = {2: (90, 7.0)}  # scale: (max JPEG quality, max detail)
PHOTO_MIN_NOISE_SIGMA = {2: 6.5, 4: 6.5}  # ``noise_sigma`` (0-255) at or above: photo
PHOTO_MIN_SMOOTH_SIGMA = {2: 3.0, 4: 3.0}  # at or above, with noise/detail as below: photo
PHOTO_MIN_NOISE_TO_DETAIL = {2: 0.55, 4: 0.65}  # noise sigma / detail at or above: photo
PHOTO_MIN_BLOCKINESS = {2: 1.3, 4: 1.3}  # ``blockiness`` of a file without JPEG tables


@dataclass(frozen=True)
class JpegQuality:
    """The IJG quality whose tables are nearest to a file's, and whether they match exactly."""

    quality: int  # 1..100
    exact: bool  # the file's tables are the IJG tables of ``quality``, entry for entry


@dataclass(frozen=True)
class Features:
    """What ``measure`` saw: each feature ``None`` where it does not apply or failed."""

    jpeg: JpegQuality | None  # only for JPEG files
    noise_sigma: float | None  # 0-255 scale, per colour channel
    detail: float | None  # high-frequency content of the busiest blocks, noise_sigma's scale
    blockiness: float | None  # ~1.0 for a never-compressed image, larger with 8x8 blocking
    note: str = ""  # why a feature is missing, if it is


@dataclass(frozen=True)
class Choice:
    """The model kind for a request and a short reason a person can read."""

    kind: Kind
    reason: str


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """The table libjpeg writes for ``quality`` (``jpeg_quality_scaling``, baseline-limited)."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


_IJG_LUMA_TABLES = np.stack([ijg_table(IJG_LUMA, q) for q in range(1, 101)])
_IJG_CHROMA_TABLES = np.stack([ijg_table(IJG_CHROMA, q) for q in range(1, 101)])


def quality_from_tables(tables: dict[int, list[int]] | dict[int, np.ndarray]) -> JpegQuality:
    """The IJG quality of a JPEG's quantization tables (Pillow's ``Image.quantization``).

    Table 0 is luma, table 1 (if present) chroma, both in natural order. Tables from another
    encoder (a camera, Photoshop, mozjpeg) match no IJG quality exactly: the quality whose
    tables are nearest (in mean absolute log ratio, so that the fine low frequencies weigh as
    much as the coarse high ones) is returned with ``exact=False``.
    """
    if 0 not in tables:
        raise ValueError("JPEG has no luma quantization table (table 0)")
    luma = np.asarray(tables[0], dtype=np.int32).ravel()
    if luma.size != 64:
        raise ValueError(f"JPEG luma quantization table has {luma.size} entries, not 64")
    candidates = [(luma, _IJG_LUMA_TABLES)]
    if 1 in tables:
        chroma = np.asarray(tables[1], dtype=np.int32).ravel()
        if chroma.size == 64:
            candidates.append((chroma, _IJG_CHROMA_TABLES))
    exact = np.ones(100, dtype=bool)
    distance = np.zeros(100)
    for table, references in candidates:
        exact &= (references == table).all(axis=1)
        distance += np.abs(np.log(np.maximum(table, 1)) - np.log(references)).mean(axis=1)
    if exact.any():
        # Qualities 98-100 can share tables; the highest one that matches is reported.
        return JpegQuality(int(np.flatnonzero(exact)[-1]) + 1, True)
    return JpegQuality(int(np.argmin(distance)) + 1, False)


def jpeg_quality(data: bytes | bytearray) -> JpegQuality | None:
    """The quality a JPEG file was saved at, from its header; ``None`` if it is not a JPEG.

    Only the first JPEG_HEADER_BYTES are read (the tables come before the scan data), so a
    large upload is not copied. Raises ``ValueError`` for a JPEG whose header cannot be read
    (truncated, no tables).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    data = bytes(data[:JPEG_HEADER_BYTES])
    try:
        # The plugin class, not Image.open: only the header is parsed, and a large declared
        # size (the request's own limit was checked before) trips no decompression-bomb check.
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as image:
            tables = getattr(image, "quantization", None)
    except Exception as e:  # Pillow's parsers raise OSError, SyntaxError, EOFError, struct.error...
        raise ValueError(f"JPEG header unreadable: {e}") from e
    if not tables:
        raise ValueError("JPEG has no quantization tables")
    return quality_from_tables(tables)


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an HxWx3 (or HxW) uint8 image, uint8 (what a JPEG encoder blocks)."""
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(np.ascontiguousarray(rgb[:, :, :3]), cv2.COLOR_RGB2GRAY)


def centre_crop(image: np.ndarray, max_pixels: int = MAX_MEASURED_PIXELS) -> np.ndarray:
    """A centred crop of at most ``max_pixels``, its origin on the 8-pixel JPEG grid."""
    height, width = image.shape[:2]
    if height * width <= max_pixels:
        return image
    # each side at least MIN_SIDE (a 16 x 170000 strip stays measurable), at most the image's
    side_h = min(height, max(MIN_SIDE, int(np.sqrt(max_pixels * height / width))))
    side_w = min(width, max(MIN_SIDE, max_pixels // side_h))
    top = (height - side_h) // 2 // JPEG_BLOCK * JPEG_BLOCK
    left = (width - side_w) // 2 // JPEG_BLOCK * JPEG_BLOCK
    return image[top : top + side_h, left : left + side_w]


def noise_and_detail(rgb: np.ndarray) -> tuple[float, float]:
    """Noise sigma per colour channel (0-255) and the image's detail on the same scale.

    Immerkaer's estimator (1996) filters with a 2-D second difference, which cancels locally
    linear image content and leaves the noise; its mean absolute response over each 8x8 block
    (all channels) is the block's noise level plus its texture. The noise is read from the
    flattest tenth of the blocks, where texture adds least, as estimators for textured images
    do (Liu et al. 2013, "weak textured patches"); the detail from the busiest tenth
    (``DETAIL_BLOCK_PERCENTILE``). Both use the scale that makes the noise of pure Gaussian
    noise read its sigma (``NOISE_CALIBRATION``); its detail then reads 1.28 sigma (measured,
    sigma 3 and 10), so noise over detail is at most about 0.78.
    """
    image = rgb if rgb.ndim == 3 else rgb[:, :, None]
    channels = image.shape[2]
    response = cv2.filter2D(image, cv2.CV_16S, NOISE_KERNEL, borderType=cv2.BORDER_REFLECT_101)
    np.abs(response, out=response)
    side = NOISE_BLOCK
    rows, cols = (image.shape[0] - 2) // side, (image.shape[1] - 2) // side
    blocks = response[1 : 1 + rows * side, 1 : 1 + cols * side]  # no border pixels
    # One sum per block over its rows, columns and channels (a block row is side * channels).
    sums = blocks.reshape(rows, side, cols, side * channels).sum(axis=(1, 3), dtype=np.int32)
    sums = sums.ravel()
    low = int(NOISE_BLOCK_PERCENTILE / 100 * (sums.size - 1))
    high = int(DETAIL_BLOCK_PERCENTILE / 100 * (sums.size - 1))
    ordered = np.partition(sums, (low, high))
    per_sample = NOISE_CALIBRATION / (side * side * channels)
    return float(ordered[low]) * per_sample, float(ordered[high]) * per_sample


def blockiness(grey: np.ndarray) -> float:
    """How much larger the steps across the 8-pixel JPEG grid are than the steps elsewhere.

    Over the flat parts of the image (where the two neighbouring steps average at most
    ``FLAT_STEP`` grey levels; texture would drown the blocking), the mean absolute step
    between neighbours across block boundaries (columns 7|8, 15|16, ... and the same rows)
    over that mean at the other positions: about 1.0 for an image never compressed, larger
    for one decoded from a coarse JPEG, whose blocks were quantized independently. The grid is
    taken at the image origin, where an uncropped JPEG has it.
    """
    y = grey.astype(np.int16)
    ratios = []
    for steps in (np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0)).T):
        flat = (steps[:, :-2] + steps[:, 2:]) <= 2 * FLAT_STEP
        step_sums = np.where(flat, steps[:, 1:-1], 0).sum(axis=0, dtype=np.int64)
        flat_counts = flat.sum(axis=0, dtype=np.int64)
        boundary = np.arange(1, steps.shape[1] - 1) % JPEG_BLOCK == JPEG_BLOCK - 1
        across, inside = flat_counts[boundary].sum(), flat_counts[~boundary].sum()
        if across == 0 or inside == 0:
            continue
        mean_across = step_sums[boundary].sum() / across
        mean_inside = step_sums[~boundary].sum() / inside
        ratios.append(float(mean_across) / max(float(mean_inside), 0.05))
    return float(np.mean(ratios)) if ratios else 1.0


def measure(data: bytes | bytearray | None, rgb: np.ndarray | None) -> Features:
    """The features of one input: its encoded bytes (for JPEG tables) and decoded pixels.

    Either may be ``None`` (a raw-pixel request has no file; a caller may skip the pixels).
    Nothing here raises: a feature that cannot be computed is ``None`` and ``note`` says why.
    """
    notes = []
    jpeg = None
    if data is not None:
        try:
            jpeg = jpeg_quality(data)
        except ValueError as e:
            notes.append(str(e))
    sigma = detail = blocks = None
    if rgb is None:
        notes.append("no pixels")
    elif rgb.ndim not in (2, 3) or rgb.dtype != np.uint8:
        notes.append(f"pixels of {rgb.dtype} {rgb.shape} not measured")
    elif min(rgb.shape[:2]) < MIN_SIDE:
        notes.append(f"{rgb.shape[1]}x{rgb.shape[0]} too small to measure")
    else:
        pixels = centre_crop(rgb if rgb.ndim == 2 else rgb[:, :, :3])
        (sigma, detail), blocks = noise_and_detail(pixels), blockiness(luma(pixels))
    return Features(jpeg, sigma, detail, blocks, note="; ".join(notes))


def choose(features: Features, scale: int) -> Choice:
    """Clean or photo model for an input of ``features`` at ``scale`` (thresholds above).

    The photo model when the input was saved as a JPEG at or below the quality threshold (at
    x2 a higher one for smooth images), is noisy (above the noise threshold, or above the
    lower one on a smooth image: noise at least ``PHOTO_MIN_NOISE_TO_DETAIL`` of its detail),
    or, not being a JPEG file, shows 8x8 blocking (a JPEG file's own tables say more about
    its compression than its blocks do); otherwise the clean model. Only x2 and x4 have photo
    models and thresholds: other scales get the clean model.
    """
    if scale not in PHOTO_MAX_JPEG_QUALITY:
        return Choice("clean", f"clean (no photo model at x{scale})")
    jpeg, sigma, detail = features.jpeg, features.noise_sigma, features.detail
    if jpeg is not None and jpeg.quality <= PHOTO_MAX_JPEG_QUALITY[scale]:
        return Choice("photo", f"JPEG quality {'' if jpeg.exact else '~'}{jpeg.quality}")
    smooth_jpeg = PHOTO_SMOOTH_JPEG.get(scale)
    if (
        jpeg is not None
        and smooth_jpeg is not None
        and detail is not None
        and jpeg.quality <= smooth_jpeg[0]
        and detail <= smooth_jpeg[1]
    ):
        quality = f"{'' if jpeg.exact else '~'}{jpeg.quality}"
        return Choice("photo", f"JPEG quality {quality} on a smooth image (detail {detail:.1f})")
    if sigma is not None and sigma >= PHOTO_MIN_NOISE_SIGMA[scale]:
        return Choice("photo", f"noise sigma {sigma:.1f}")
    if (
        sigma is not None
        and detail is not None
        and sigma >= PHOTO_MIN_SMOOTH_SIGMA[scale]
        and sigma >= PHOTO_MIN_NOISE_TO_DETAIL[scale] * detail
    ):
        return Choice("photo", f"noise sigma {sigma:.1f} on a smooth image (detail {detail:.1f})")
    blocks = features.blockiness
    if jpeg is None and blocks is not None and blocks >= PHOTO_MIN_BLOCKINESS[scale]:
        return Choice("photo", f"8x8 blocking {blocks:.2f}")
    if sigma is None and jpeg is None:
        return Choice("clean", f"clean (not measured: {features.note or 'no features'})")
    return Choice("clean", "clean")
