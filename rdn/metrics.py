"""Super-resolution metrics as the literature reports them: PSNR and SSIM on the Y channel.

Protocol (RDN, EDSR and most SR papers): convert 8-bit RGB to the BT.601 luma
Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]; Y in [16, 235], not rounded),
shave ``scale`` pixels from every border, then PSNR and SSIM with data range 255. SSIM uses a
Gaussian window (sigma 1.5, K = (0.01, 0.03)), the settings of Wang et al. 2004. The
computations are scikit-image's; this module only fixes their parameters.

A single-channel (greyscale) image is its own luma and is scored on its values in [0, 255],
as the benchmark scripts do (MATLAB ``if size(im, 3) == 1``): Set14's bicubic baseline comes
out at 30.23 / 27.54 / 26.00 dB (published 30.24 / 27.55 / 26.00) that way, and 0.09 dB higher
if its greyscale image is first replicated to RGB and converted to Y.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DATA_RANGE = 255.0  # luma is compared on the 8-bit scale
SSIM_SIGMA = 1.5  # pixels: Gaussian window of Wang et al. 2004
SSIM_WINDOW = 11  # pixels: that window truncated at 3.5 sigma; the smallest image side SSIM takes
Y_BLACK, Y_WHITE = 16.0, 235.0  # BT.601 studio range of Y


def _check_uint8(image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise TypeError(
            f"expected an 8-bit image (uint8), got {image.dtype}; metrics are defined on the "
            "rounded 8-bit output (use rdn.imaging.from_tensor_layout to convert)"
        )


def _is_single_channel(image: np.ndarray) -> bool:
    return image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an HxWx3 uint8 RGB image as float64 in [16, 235] (``rgb2ycbcr``)."""
    _check_uint8(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return rgb2ycbcr(image)[:, :, 0]


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """Full-range BT.601 luma (0.299 R + 0.587 G + 0.114 B) rounded to uint8 HxW.

    For scoring an RGB output against a greyscale ground truth; an RGB image with three
    equal channels gives back exactly those values.
    """
    full_range = (rgb_to_y(image) - Y_BLACK) * (255.0 / (Y_WHITE - Y_BLACK))
    return np.clip(np.floor(full_range + 0.5), 0, 255).astype(np.uint8)


def luma(image: np.ndarray) -> np.ndarray:
    """What the metrics compare, as float64 HxW: Y of an RGB image (in [16, 235]), or the
    values of a single-channel (HxW or HxWx1) image (in [0, 255])."""
    _check_uint8(image)
    if _is_single_channel(image):
        return image.reshape(image.shape[:2]).astype(np.float64)
    return rgb_to_y(image)


def shave_border(image: np.ndarray, shave: int) -> np.ndarray:
    """Drop ``shave`` pixels from every border (the SR benchmarks shave ``scale`` pixels)."""
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    if shave == 0:
        return image
    h, w = image.shape[:2]
    if h <= 2 * shave or w <= 2 * shave:
        raise ValueError(f"image {w}x{h} is too small to shave {shave} pixels from each border")
    return image[shave : h - shave, shave : w - shave]


def _y_pair(sr: np.ndarray, hr: np.ndarray, shave: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(
            f"SR image {sr.shape[1]}x{sr.shape[0]} and HR image {hr.shape[1]}x{hr.shape[0]} "
            "differ in size; modcrop the HR image to a multiple of the scale"
        )
    if _is_single_channel(sr) != _is_single_channel(hr):
        raise ValueError(
            f"SR image has shape {sr.shape} and HR image {hr.shape}: one is greyscale; convert "
            "the RGB one with rgb_to_grey so both are scored on the same scale"
        )
    return shave_border(luma(sr), shave), shave_border(luma(hr), shave)


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB) of the luma after shaving; ``float('inf')`` when the lumas are equal.

    Equal images have zero error, so their PSNR is unbounded; returning infinity (instead of
    scikit-image's divide-by-zero warning) keeps "identical" distinguishable from any finite
    score, and a mean over images containing it is infinite too.
    """
    y_sr, y_hr = _y_pair(sr, hr, shave)
    if np.array_equal(y_sr, y_hr):
        return float("inf")
    return float(peak_signal_noise_ratio(y_hr, y_sr, data_range=DATA_RANGE))


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """Mean SSIM of the luma after shaving (Gaussian window, sigma 1.5, data range 255)."""
    y_sr, y_hr = _y_pair(sr, hr, shave)
    if min(y_hr.shape) < SSIM_WINDOW:
        raise ValueError(
            f"image {y_hr.shape[1]}x{y_hr.shape[0]} after shaving is smaller than the "
            f"{SSIM_WINDOW}x{SSIM_WINDOW} SSIM window"
        )
    return float(
        structural_similarity(
            y_hr,
            y_sr,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            data_range=DATA_RANGE,
        )
    )
