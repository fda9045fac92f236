"""PSNR/SSIM on Y against hand-computed cases and the published Set5 bicubic baseline."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from rdn.imaging import downscale, list_images, modcrop, read_rgb, upscale_bicubic
from rdn.metrics import luma, psnr_y, rgb_to_grey, rgb_to_y, shave_border, ssim_y

# Published bicubic baseline on Set5 (RDN paper, Table 3): scale -> (PSNR dB, SSIM).
SET5_BICUBIC = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


def grey(value: int, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.full((*shape, 3), value, np.uint8)


def noise_image(seed: int, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_y_matches_bt601_on_primaries() -> None:
    image = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    y = rgb_to_y(image.astype(np.uint8))
    np.testing.assert_allclose(y[0], [235.0, 16.0, 81.481, 144.553, 40.966], atol=1e-9)


@pytest.mark.parametrize("layout", ["HxW", "HxWx1"])
def test_single_channel_image_is_its_own_luma(layout: str) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = values if layout == "HxW" else values[:, :, None]
    np.testing.assert_array_equal(luma(image), values.astype(np.float64))
    rgb = np.repeat(values[:, :, None], 3, axis=2)
    # 65.481 + 128.553 + 24.966 = 219: replicated to RGB, grey level v has Y = 16 + 219 v / 255
    np.testing.assert_allclose(luma(rgb), 16 + 219 * values.astype(float) / 255, atol=1e-9)


def test_rgb_to_grey_is_full_range_bt601_and_exact_on_grey() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(rgb_to_grey(np.repeat(values[:, :, None], 3, axis=2)), values)
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]]], np.uint8)
    expected = [[76, 150, 29, round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)]]  # 0.299/0.587/0.114
    np.testing.assert_array_equal(rgb_to_grey(primaries), expected)


def test_identical_images_have_infinite_psnr_without_warnings() -> None:
    image = noise_image(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr_y(image, image.copy(), shave=2) == math.inf


def test_known_mse_gives_known_psnr() -> None:
    hr = grey(100)
    sr = grey(110)
    # Y differs by 219 * 10 / 255 everywhere: PSNR = 20 log10(255 / dY) = 29.4527 dB
    expected = 20 * math.log10(255 / (219 * 10 / 255))
    assert psnr_y(sr, hr, shave=0) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(29.4527, abs=1e-4)
    # Half the pixels wrong halves the MSE: +10 log10(2) dB
    half = hr.copy()
    half[:16] = 110
    assert psnr_y(half, hr, shave=0) == pytest.approx(expected + 10 * math.log10(2), abs=1e-9)
    # Greyscale images are scored on their own values: 10 grey levels off is 20 log10(25.5) dB
    assert psnr_y(sr[:, :, 0], hr[:, :, 0], shave=0) == pytest.approx(20 * math.log10(25.5))


def test_psnr_is_symmetric_and_finite_for_different_images() -> None:
    a, b = noise_image(1), noise_image(2)
    assert math.isfinite(psnr_y(a, b, shave=1))
    assert psnr_y(a, b, shave=1) == pytest.approx(psnr_y(b, a, shave=1), abs=1e-12)


def test_ssim_of_identical_is_one_and_of_different_is_less() -> None:
    image = noise_image(3)
    assert ssim_y(image, image.copy(), shave=2) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(
        image.astype(int) + np.random.default_rng(4).integers(-20, 21, image.shape), 0, 255
    )
    value = ssim_y(noisy.astype(np.uint8), image, shave=2)
    assert 0.0 < value < 0.99


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shave_removes_exactly_scale_pixels_from_every_border(scale: int) -> None:
    hr = noise_image(5)
    sr = hr.copy()
    ring = np.ones(hr.shape[:2], bool)
    ring[scale:-scale, scale:-scale] = False
    sr[ring] = 255 - sr[ring]  # only the outer ring of width ``scale`` differs
    assert psnr_y(sr, hr, shave=scale) == math.inf
    assert ssim_y(sr, hr, shave=scale) == pytest.approx(1.0, abs=1e-12)
    assert math.isfinite(psnr_y(sr, hr, shave=scale - 1))
    assert ssim_y(sr, hr, shave=scale - 1) < 1.0


def test_shave_border_shape() -> None:
    assert shave_border(np.zeros((20, 30)), 3).shape == (14, 24)
    assert shave_border(np.zeros((20, 30)), 0).shape == (20, 30)
    with pytest.raises(ValueError, match="too small"):
        shave_border(np.zeros((6, 30)), 3)


def test_inputs_are_validated() -> None:
    image = noise_image(6)
    with pytest.raises(ValueError, match="differ in size"):
        psnr_y(image, image[:-2], shave=0)
    with pytest.raises(TypeError, match="uint8"):
        psnr_y(image / 255.0, image, shave=0)
    with pytest.raises(ValueError, match="HxWx3"):
        rgb_to_y(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="HxWx3"):
        rgb_to_y(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="rgb_to_grey"):
        psnr_y(image, image[:, :, 0], shave=0)
    with pytest.raises(ValueError, match="SSIM window"):
        ssim_y(image[:14], image[:14], shave=2)  # 10 rows left after shaving


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_bicubic_matches_the_published_baseline(set5_dir: Path, scale: int) -> None:
    psnrs, ssims = [], []
    for path in list_images(set5_dir):
        hr = modcrop(read_rgb(path), scale)
        bicubic = upscale_bicubic(downscale(hr, scale), scale)
        psnrs.append(psnr_y(bicubic, hr, shave=scale))
        ssims.append(ssim_y(bicubic, hr, shave=scale))
    psnr, ssim = SET5_BICUBIC[scale]
    assert np.mean(psnrs) == pytest.approx(psnr, abs=0.05)
    assert np.mean(ssims) == pytest.approx(ssim, abs=0.002)
