"""rdn.degradations: spec parsing, each degradation's effect, purity in the generator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rdn.data import PatchDataset, build_dataset
from rdn.degradations import (
    BD_KERNEL,
    BD_SIGMA,
    Degradation,
    DegradationError,
    PhotoRanges,
    degrade,
    gaussian_kernel,
    jpeg_round_trip,
    parse_degradation,
)
from rdn.imaging import downscale


@pytest.fixture(scope="module")
def hr() -> np.ndarray:
    """A 96x128 photo-like image: smooth gradients, an edge and texture."""
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    rng = np.random.default_rng(5)
    base = np.stack([x * 1.5, y * 2.0, 128 + 60 * np.sin(x / 7) * np.cos(y / 5)], axis=-1)
    base[:, 64:] += 40
    base += rng.normal(0, 4, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("text", "canonical", "low", "high"),
    [
        ("bicubic", "bicubic", 0, 0),
        ("BD", "bd", 0, 0),
        ("dn", "dn", 0, 0),
        ("jpeg:50", "jpeg:50", 50, 50),
        ("jpeg:30-95", "jpeg:30-95", 30, 95),
        ("noise:10", "noise:10", 10, 10),
        ("noise:2.5-7.5", "noise:2.5-7.5", 2.5, 7.5),
        ("photo", "photo", 0, 0),
    ],
)
def test_specs_parse_to_their_canonical_text(text: str, canonical: str, low: float, high: float):
    spec = parse_degradation(text)
    assert (spec.spec, spec.low, spec.high) == (canonical, low, high)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("sharpen", "unknown; allowed: bicubic, bd, dn, jpeg:Q"),
        ("jpeg", "needs a number or a range"),
        ("jpeg:0", "JPEG quality must be integers 1..100"),
        ("jpeg:90-50", "JPEG quality must be integers 1..100, A<=B"),
        ("jpeg:50.5", "JPEG quality must be integers"),
        ("noise:300", "noise sigma must be in 0..255"),
        ("noise:-3", "needs a number or a range"),
        ("bd:3", "bd takes no parameter"),
    ],
)
def test_bad_specs_say_what_is_allowed(text: str, says: str) -> None:
    with pytest.raises(DegradationError, match=says.replace("(", r"\(")):
        parse_degradation(text)


def test_bicubic_is_the_benchmark_downscale(hr: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    assert np.array_equal(degrade(hr, 2, parse_degradation("bicubic"), rng), downscale(hr, 2))


def test_bd_blurs_with_the_papers_kernel_before_downscaling(hr: np.ndarray) -> None:
    out = degrade(hr, 2, parse_degradation("bd"), np.random.default_rng(0))
    kernel = (BD_KERNEL, BD_KERNEL)
    blurred = cv2.GaussianBlur(hr, kernel, BD_SIGMA, borderType=cv2.BORDER_REPLICATE)
    assert np.array_equal(out, downscale(blurred, 2))
    # The blur removes detail the plain downscale keeps: less high-frequency energy.
    lap = lambda a: float(np.abs(cv2.Laplacian(a.astype(np.float32), cv2.CV_32F)).mean())  # noqa: E731
    assert lap(out) < 0.8 * lap(downscale(hr, 2))


@pytest.mark.parametrize(("text", "sigma"), [("noise:10", 10.0), ("dn", 30.0)])
def test_gaussian_noise_has_the_asked_sigma(text: str, sigma: float) -> None:
    grey = np.full((256, 256, 3), 128, np.uint8)  # mid-grey: no clipping at 0 or 255
    out = degrade(grey, 2, parse_degradation(text), np.random.default_rng(1))
    measured = float((out.astype(np.float64) - 128).std())
    assert measured == pytest.approx(sigma, rel=0.03)


def test_noise_range_draws_sigma_inside_the_range() -> None:
    grey = np.full((128, 128, 3), 128, np.uint8)
    spec = parse_degradation("noise:5-15")
    sigmas = [
        float((degrade(grey, 2, spec, np.random.default_rng(s)).astype(float) - 128).std())
        for s in range(20)
    ]
    assert 4.5 < min(sigmas) < max(sigmas) < 15.5 and max(sigmas) - min(sigmas) > 3


def test_jpeg_is_the_round_trip_of_the_bicubic_lr_and_lower_quality_loses_more(
    hr: np.ndarray,
) -> None:
    clean = downscale(hr, 2)
    out50 = degrade(hr, 2, parse_degradation("jpeg:50"), np.random.default_rng(0))
    assert np.array_equal(out50, jpeg_round_trip(clean, 50))
    out90 = degrade(hr, 2, parse_degradation("jpeg:90"), np.random.default_rng(0))
    err = lambda a: float(np.abs(a.astype(float) - clean).mean())  # noqa: E731
    assert 0 < err(out90) < err(out50)


def test_photo_chain_is_a_pure_function_of_its_generator(hr: np.ndarray) -> None:
    spec = parse_degradation("photo")
    a = degrade(hr, 2, spec, np.random.default_rng([7, 1]))
    b = degrade(hr, 2, spec, np.random.default_rng([7, 1]))
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    others = [degrade(hr, 2, spec, np.random.default_rng([7, s])) for s in range(2, 12)]
    assert sum(not np.array_equal(a, o) for o in others) >= 9
    assert {o.shape for o in others} == {(48, 64, 3)}


def test_photo_ranges_of_zero_probability_reduce_to_a_plain_resize(hr: np.ndarray) -> None:
    ranges = PhotoRanges(blur_prob=0, noise_prob=0, jpeg_prob=0, resize_weights=(1.0, 0.0, 0.0))
    out = degrade(hr, 4, Degradation("photo", photo=ranges), np.random.default_rng(3))
    assert np.array_equal(out, downscale(hr, 4))


def test_always_degrade_gives_a_sample_that_drew_nothing_the_jpeg_round_trip(
    hr: np.ndarray,
) -> None:
    values = dict(blur_prob=0, noise_prob=0, jpeg_prob=0, resize_weights=(1.0, 0.0, 0.0))
    ranges = PhotoRanges(**values, jpeg_quality=(50, 50), always_degrade=True)
    out = degrade(hr, 4, Degradation("photo", photo=ranges), np.random.default_rng(3))
    assert np.array_equal(out, jpeg_round_trip(downscale(hr, 4), 50))
    noisy = PhotoRanges(**{**values, "noise_prob": 1.0}, gaussian_sigma=(5, 5), always_degrade=True)
    plain = PhotoRanges(**{**values, "noise_prob": 1.0}, gaussian_sigma=(5, 5))
    pick = Degradation("photo", photo=noisy), Degradation("photo", photo=plain)
    a, b = (degrade(hr, 4, p, np.random.default_rng(3)) for p in pick)
    assert np.array_equal(a, b)  # a noisy sample is degraded already: no JPEG added


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"always_degrade": "yes"}, "always_degrade must be true or false"),
        ({"blur_prob": 1.5}, "blur_prob must be a probability"),
        ({"jpeg_quality": [95, 30]}, "jpeg_quality must be 0 <= low <= high"),
        ({"jpeg_quality": [0, 50]}, "jpeg_quality must be integers in 1..100"),
        ({"blur_sigma": [0.5, 9.0]}, "blur_sigma must stay <="),
        ({"resize_weights": [1, 1]}, "resize_weights needs 3 weights"),
        ({"gaussian_sigma": "loud"}, r"gaussian_sigma must be \[low, high\]"),
        ({"sharpness": 1}, r"unknown photo range\(s\) \['sharpness'\]"),
    ],
)
def test_bad_photo_ranges_are_refused(values: dict, says: str) -> None:
    with pytest.raises(DegradationError, match=says):
        PhotoRanges.from_dict(values)


def test_gaussian_kernel_is_normalised_and_anisotropic_when_asked() -> None:
    iso = gaussian_kernel(1.0, 1.0, 0.0)
    assert iso.sum() == pytest.approx(1.0, abs=1e-5) and np.allclose(iso, iso.T, atol=1e-7)
    wide = gaussian_kernel(2.0, 0.5, 0.0)  # wide along x: rows spread more than columns
    rows, cols = wide.sum(axis=0), wide.sum(axis=1)
    grid = np.arange(len(rows)) - len(rows) // 2
    assert (rows * grid**2).sum() > 4 * (cols * grid**2).sum()


def test_degraded_training_samples_depend_only_on_their_key() -> None:
    spec = parse_degradation("photo")
    dataset = build_dataset(None, 2, 16, channel_shuffle=True, degradation=spec)
    assert isinstance(dataset, PatchDataset) and dataset.degradation == spec
    lr1, hr1 = dataset.sample((0, 5, 0, 1))
    lr2, hr2 = dataset.sample((0, 5, 0, 1))
    assert lr1.shape == (16, 16, 3) and hr1.shape == (32, 32, 3)
    assert np.array_equal(lr1, lr2) and np.array_equal(hr1, hr2)
    clean = build_dataset(None, 2, 16, channel_shuffle=True)
    _, hr_clean = clean.sample((0, 5, 0, 1))
    assert np.array_equal(hr_clean, hr1)  # the same patch plan ...
    differing = sum(
        not np.array_equal(dataset.sample((0, s, 0, 0))[0], clean.sample((0, s, 0, 0))[0])
        for s in range(12)
    )
    assert differing >= 8  # ... degraded in most samples (noise or JPEG in 94 % of draws)
