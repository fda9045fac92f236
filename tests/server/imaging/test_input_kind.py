"""server.imaging.input_kind on real files made here: PNGs, JPEGs at known qualities, noisy PNGs.

Each file is written to disk by Pillow or OpenCV and read back as bytes and pixels, as a
request would arrive; images are 96-192 pixels so that the module runs in milliseconds.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from server.imaging import input_kind
from server.imaging.input_kind import Choice, Features, JpegQuality, choose, jpeg_quality, measure

SIDE = 192


def scene(side: int = SIDE, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth shading, soft shapes and a little fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = 60 + 120 * xx + 40 * np.sin(6 * yy)
    blobs = cv2.GaussianBlur(rng.random((side, side)).astype(np.float32), (0, 0), 6)
    blobs = (blobs - blobs.min()) / (np.ptp(blobs) + 1e-6) * 60
    rgb = np.stack([base + blobs, base * 0.8 + 20, 200 - base * 0.5 + blobs], axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write(tmp_path: Path, name: str, rgb: np.ndarray, **save: object) -> Path:
    path = tmp_path / name
    Image.fromarray(rgb).save(path, **save)
    return path


def read(path: Path) -> tuple[bytes, np.ndarray]:
    """A file's bytes and its pixels decoded as the server decodes them (OpenCV, RGB)."""
    data = path.read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return data, np.ascontiguousarray(bgr[:, :, ::-1])


def noisy(rgb: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(rgb.shape) * sigma
    return np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 85, 90, 95])
def test_quality_of_pillow_and_opencv_jpegs_is_exact(tmp_path: Path, quality: int) -> None:
    pil = write(tmp_path, "pil.jpg", scene(64), quality=quality)
    assert jpeg_quality(pil.read_bytes()) == JpegQuality(quality, exact=True)
    ok, data = cv2.imencode(".jpg", scene(64), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    assert jpeg_quality(data.tobytes()) == JpegQuality(quality, exact=True)


def test_quality_of_greyscale_jpeg_reads_the_luma_table(tmp_path: Path) -> None:
    path = write(tmp_path, "grey.jpg", scene(64)[:, :, 0], quality=60)
    assert jpeg_quality(path.read_bytes()) == JpegQuality(60, exact=True)


def test_quality_of_custom_tables_is_the_nearest_ijg_quality(tmp_path: Path) -> None:
    # A camera-style table: the IJG quality-80 luma table with every entry one step finer.
    luma = np.maximum(input_kind.ijg_table(input_kind.IJG_LUMA, 80) - 1, 1)
    chroma = input_kind.ijg_table(input_kind.IJG_CHROMA, 80)
    buffer = io.BytesIO()
    Image.fromarray(scene(64)).save(buffer, "JPEG", qtables=[list(luma), list(chroma)])
    estimate = jpeg_quality(buffer.getvalue())
    assert estimate is not None and not estimate.exact
    assert 80 <= estimate.quality <= 86


def test_quality_of_a_huge_declared_jpeg_is_read_without_a_bomb_check(tmp_path: Path) -> None:
    data = bytearray(write(tmp_path, "q42.jpg", scene(32), quality=42).read_bytes())
    frame = data.find(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[frame + 5 : frame + 9] = (60000).to_bytes(2, "big") * 2
    assert jpeg_quality(bytes(data)) == JpegQuality(42, exact=True)


def test_quality_is_none_for_other_formats(tmp_path: Path) -> None:
    assert jpeg_quality(write(tmp_path, "a.png", scene(32)).read_bytes()) is None


@pytest.mark.parametrize("sigma", [3.0, 5.0, 10.0, 15.0])
def test_noise_estimate_is_near_the_true_sigma(tmp_path: Path, sigma: float) -> None:
    data, pixels = read(write(tmp_path, "n.png", noisy(scene(), sigma)))
    estimate = measure(data, pixels).noise_sigma
    assert estimate is not None and abs(estimate - sigma) <= 0.1 * sigma + 0.3


def test_noise_estimate_of_a_clean_image_is_small(tmp_path: Path) -> None:
    data, pixels = read(write(tmp_path, "c.png", scene()))
    estimate = measure(data, pixels).noise_sigma
    assert estimate is not None and estimate < 1.0


def test_blockiness_separates_a_jpeg_resaved_as_png_from_a_clean_png(tmp_path: Path) -> None:
    _, decoded = read(write(tmp_path, "q50.jpg", scene(), quality=50))
    resaved = measure(*read(write(tmp_path, "q50.png", decoded)))
    clean = measure(*read(write(tmp_path, "clean.png", scene())))
    assert resaved.jpeg is None and clean.jpeg is None
    assert clean.blockiness is not None and resaved.blockiness is not None
    assert clean.blockiness < 1.1
    assert resaved.blockiness >= input_kind.PHOTO_MIN_BLOCKINESS[2] > clean.blockiness


@pytest.mark.parametrize("scale", [2, 4])
def test_each_kind_of_file_gets_its_model(tmp_path: Path, scale: int) -> None:
    clean = choose(measure(*read(write(tmp_path, "c.png", scene()))), scale)
    assert clean == Choice("clean", "clean")
    jpeg50 = choose(measure(*read(write(tmp_path, "q50.jpg", scene(), quality=50))), scale)
    assert jpeg50 == Choice("photo", "JPEG quality 50")
    jpeg95 = choose(measure(*read(write(tmp_path, "q95.jpg", scene(), quality=95))), scale)
    assert jpeg95.kind == "clean"
    noise = choose(measure(*read(write(tmp_path, "n10.png", noisy(scene(), 10)))), scale)
    assert noise.kind == "photo" and noise.reason.startswith("noise sigma ")
    _, decoded = read(write(tmp_path, "q30.jpg", scene(), quality=30))
    resaved = choose(measure(*read(write(tmp_path, "q30.png", decoded))), scale)
    assert resaved.kind == "photo" and resaved.reason.startswith("8x8 blocking ")


def test_decision_rules_one_feature_at_a_time() -> None:
    quality = input_kind.PHOTO_MAX_JPEG_QUALITY[2]
    sigma = input_kind.PHOTO_MIN_NOISE_SIGMA[2]
    smooth = input_kind.PHOTO_MIN_SMOOTH_SIGMA[2]
    ratio = input_kind.PHOTO_MIN_NOISE_TO_DETAIL[2]
    blocks = input_kind.PHOTO_MIN_BLOCKINESS[2]

    def features(
        jpeg: JpegQuality | None = None,
        sigma: float = 0.5,
        detail: float = 20.0,
        blockiness: float = 1.0,
    ) -> Features:
        return Features(jpeg=jpeg, noise_sigma=sigma, detail=detail, blockiness=blockiness)

    assert choose(features(JpegQuality(quality, True)), 2) == Choice(
        "photo", f"JPEG quality {quality}"
    )
    assert choose(features(JpegQuality(quality + 1, True)), 2) == Choice("clean", "clean")
    assert choose(features(JpegQuality(quality, False)), 2).reason == f"JPEG quality ~{quality}"
    assert choose(features(sigma=sigma), 2) == Choice("photo", f"noise sigma {sigma:.1f}")
    assert choose(features(sigma=sigma - 0.1), 2) == Choice("clean", "clean")
    # Between the two noise thresholds the detail decides: a smooth image goes to photo.
    smooth_detail = smooth / ratio
    assert choose(features(sigma=smooth, detail=smooth_detail), 2).reason == (
        f"noise sigma {smooth:.1f} on a smooth image (detail {smooth_detail:.1f})"
    )
    assert choose(features(sigma=smooth, detail=smooth_detail + 0.5), 2).kind == "clean"
    assert choose(features(sigma=smooth - 0.1, detail=smooth), 2).kind == "clean"
    assert choose(features(blockiness=blocks), 2) == Choice("photo", f"8x8 blocking {blocks:.2f}")
    # At x2 a smooth JPEG a little above the quality threshold goes to photo, at x4 it does not.
    top, most_detail = input_kind.PHOTO_SMOOTH_JPEG[2]
    assert choose(features(JpegQuality(top, True), detail=most_detail), 2).reason == (
        f"JPEG quality {top} on a smooth image (detail {most_detail:.1f})"
    )
    assert choose(features(JpegQuality(top, True), detail=most_detail + 0.1), 2).kind == "clean"
    assert choose(features(JpegQuality(top + 1, True), detail=0.0), 2).kind == "clean"
    assert 4 not in input_kind.PHOTO_SMOOTH_JPEG
    # A JPEG file above the quality threshold: its tables, not its blocks, decide.
    assert choose(features(JpegQuality(quality + 5, True), blockiness=blocks + 1), 2).kind == (
        "clean"
    )
    # x3 has no photo model: always clean, whatever the input.
    assert choose(features(JpegQuality(30, True), sigma=20), 3) == Choice(
        "clean", "clean (no photo model at x3)"
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8", b"\xff\xd8\xff\xdb\x00\x43\x00" + bytes(10), b"not an image at all"],
    ids=["empty", "soi-only", "truncated-dqt", "garbage"],
)
def test_malformed_bytes_do_not_crash(data: bytes) -> None:
    features = measure(data, None)
    assert features.jpeg is None and features.noise_sigma is None
    choice = choose(features, 2)
    assert choice.kind == "clean" and choice.reason.startswith("clean (not measured: ")


def test_truncated_jpeg_still_gives_its_header_quality(tmp_path: Path) -> None:
    data = write(tmp_path, "q40.jpg", scene(), quality=40).read_bytes()
    assert measure(data[: len(data) // 3], None).jpeg == JpegQuality(40, exact=True)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((8, 8, 3), np.uint8), np.zeros((64, 64, 3), np.float32), np.zeros(64, np.uint8)],
    ids=["tiny", "float", "1-d"],
)
def test_pixels_that_cannot_be_measured_give_a_clean_choice(pixels: np.ndarray) -> None:
    features = measure(None, pixels)
    assert features.noise_sigma is None and features.detail is None and features.note
    assert features.blockiness is None
    assert choose(features, 4).kind == "clean"


def test_greyscale_and_rgba_pixels_are_measured() -> None:
    grey = measure(None, noisy(scene(), 8)[:, :, 1])
    rgba = measure(None, np.dstack([noisy(scene(), 8), np.full((SIDE, SIDE), 255, np.uint8)]))
    assert grey.noise_sigma is not None and 6 < grey.noise_sigma < 10
    assert rgba.noise_sigma is not None and 6 < rgba.noise_sigma < 10


def test_large_inputs_are_measured_on_a_crop_on_the_jpeg_grid() -> None:
    crop = input_kind.centre_crop(np.zeros((3000, 2000, 3), np.uint8))
    assert crop.shape[0] * crop.shape[1] <= input_kind.MAX_MEASURED_PIXELS


def test_module_does_not_import_torch() -> None:
    code = "import sys, server.imaging.input_kind; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_long_thin_strip_is_cropped_to_measurable_blocks() -> None:
    features = measure(None, np.zeros((16, 170_000, 3), np.uint8))
    assert features.noise_sigma is not None and features.blockiness is not None
