"""What the codec keeps of a file besides its pixels (profile, EXIF, XMP, 16 bits), on files
the tests make, without a model: decode, a stand-in 'upscale' (pixel repeat), encode."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from server.imaging.codec import answer_notes, decode_image, encode_image, finish_output
from server.imaging.headers import ImageError
from server.imaging.metadata import orient, png_with_metadata
from server.imaging.options import DEFAULT_OPTIONS, ImageOptions
from tests.server.imaging.files import (
    BAD_EXIF,
    BAD_ICC,
    MAKE,
    ORIENTATION,
    XMP,
    exif_with,
    make_file,
    png16,
    read_back,
    swapped_profile,
    xmp_of,
)

LIMIT = 10**7


@pytest.fixture(scope="module")
def photo(set5_dir: Path) -> np.ndarray:
    bgr = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[40:56, 30:54]
    return np.ascontiguousarray(bgr[:, :, ::-1])  # 16 x 24 RGB


def round_trip(data: bytes, fmt: str, options: ImageOptions = DEFAULT_OPTIONS) -> bytes:
    decoded = decode_image(data, LIMIT, LIMIT, options=options)
    big = decoded.rgb.repeat(2, 0).repeat(2, 1)
    alpha = None if decoded.alpha is None else decoded.alpha.repeat(2, 0).repeat(2, 1)
    return encode_image(finish_output(big, decoded, 2, alpha), fmt, 95, metadata=decoded.metadata)


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("answer", ["png", "jpeg", "webp"])
def test_profile_exif_and_xmp_are_carried_and_the_image_turned(
    photo: np.ndarray, source: str, answer: str
) -> None:
    icc = swapped_profile()
    data = make_file(photo, source, icc=icc, exif=exif_with(orientation=6), xmp=XMP)
    pixels, info, exif = read_back(round_trip(data, answer))
    assert pixels.shape[:2] == (48, 32)  # 16 x 24 turned by orientation 6, then x2
    assert info.get("icc_profile") == icc
    assert exif[MAKE] == "RDN Camera" and exif[ORIENTATION] == 1
    assert b"dc:creator" in xmp_of(info) and b'tiff:Orientation="1"' in xmp_of(info)


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP"])
def test_every_format_turns_its_pixels_as_its_orientation_says(
    photo: np.ndarray, source: str
) -> None:
    """PNG and WebP are turned here, JPEG by OpenCV: the same pixels for the same tag."""
    for orientation in range(1, 9):
        data = make_file(photo, source, exif=exif_with(orientation))
        plain = decode_image(make_file(photo, source), LIMIT, LIMIT).rgb
        turned = decode_image(data, LIMIT, LIMIT).rgb
        np.testing.assert_array_equal(turned, orient(plain, orientation), f"{orientation}")


def test_strip_drops_exif_and_xmp_and_keeps_the_profile(photo: np.ndarray) -> None:
    icc = swapped_profile()
    data = make_file(photo, "JPEG", icc=icc, exif=exif_with(), xmp=XMP)
    for answer in ("png", "jpeg", "webp"):
        _, info, exif = read_back(round_trip(data, answer, ImageOptions(strip_metadata=True)))
        assert info.get("icc_profile") == icc and not xmp_of(info) and len(exif) == 0


def test_to_srgb_converts_the_pixels_and_writes_no_profile(photo: np.ndarray) -> None:
    data = make_file(photo, "PNG", icc=swapped_profile())
    kept, info, _ = read_back(round_trip(data, "png"))
    converted, info_srgb, _ = read_back(round_trip(data, "png", ImageOptions(convert_to_srgb=True)))
    assert info.get("icc_profile") and "icc_profile" not in info_srgb
    np.testing.assert_array_equal(kept[::2, ::2], photo)  # carried: pixels untouched
    # red and green swapped by the profile: the converted red plane follows the input's green
    assert np.abs(converted[::2, ::2, 0].astype(int) - photo[:, :, 1]).mean() < 12
    assert np.abs(converted[::2, ::2].astype(int) - photo).mean() > 10
    same = make_file(photo, "PNG")  # no profile: sRGB assumed, nothing converted
    np.testing.assert_array_equal(
        read_back(round_trip(same, "png", ImageOptions(convert_to_srgb=True)))[0][::2, ::2], photo
    )


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP"])
def test_an_unparseable_profile_is_refused_naming_it(photo: np.ndarray, source: str) -> None:
    with pytest.raises(ImageError, match=r"ICC colour profile .* cannot be parsed"):
        decode_image(make_file(photo, source, icc=BAD_ICC), LIMIT, LIMIT)


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP"])
def test_malformed_exif_is_dropped_with_a_note(photo: np.ndarray, source: str) -> None:
    decoded = decode_image(make_file(photo, source, exif=BAD_EXIF, xmp=XMP), LIMIT, LIMIT)
    assert decoded.metadata.exif is None and decoded.metadata.xmp  # XMP is still carried
    assert any("EXIF dropped" in note for note in answer_notes(decoded, "png"))
    assert decoded.rgb.shape[:2] == photo.shape[:2]


def test_sixteen_bits_are_kept_in_png_and_said_lost_in_jpeg(photo: np.ndarray) -> None:
    rgb16 = photo.astype(np.uint16) * 257 + 99
    decoded = decode_image(png16(rgb16), LIMIT, LIMIT)
    assert decoded.rgb.dtype == np.uint16
    pixels, _, _ = read_back(round_trip(png16(rgb16), "png"))
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[::2, ::2], rgb16)
    assert answer_notes(decoded, "png") == ()
    assert "16-bit image answered with 8 bits" in answer_notes(decoded, "jpeg")[0]
    with_profile = png_with_metadata(png16(rgb16), swapped_profile(), None, None)
    kept = decode_image(with_profile, LIMIT, LIMIT)
    assert kept.rgb.dtype == np.uint16 and kept.metadata.icc == swapped_profile()
    with pytest.raises(ImageError, match="convert_to_srgb works on 8-bit images"):
        decode_image(with_profile, LIMIT, LIMIT, options=ImageOptions(convert_to_srgb=True))
