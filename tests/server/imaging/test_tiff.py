"""TIFF answers keep what a PNG answer keeps: 16 bits, the ICC profile, EXIF (orientation 1)
and XMP, and RGBA's alpha marked as alpha. Inputs are written by tifffile (it comes with
scikit-image), a writer independent of the server's, and answers are read back by Pillow,
OpenCV and tifffile."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from server.imaging.codec import answer_notes, decode_image, encode_image
from server.imaging.metadata import FileMetadata
from server.imaging.tiff import EXTRA_SAMPLES, UNASSOCIATED_ALPHA
from tests.server.imaging.files import (
    MAKE,
    ORIENTATION,
    XMP,
    exif_with,
    make_file,
    read_back,
    swapped_profile,
    tiff_file,
    xmp_of,
)
from tests.server.imaging.test_keep import LIMIT, round_trip


@pytest.fixture(scope="module")
def photo(set5_dir: Path) -> np.ndarray:
    bgr = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[40:56, 30:54]
    return np.ascontiguousarray(bgr[:, :, ::-1])  # 16 x 24 RGB


def tiff_tags(data: bytes) -> dict[int, object]:
    """The first page's tags as tifffile reads them (an independent reader)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return {tag.code: tag.value for tag in tif.pages[0].tags.values()}


def test_a_16_bit_tiff_comes_back_16_bit_with_profile_exif_and_xmp(photo: np.ndarray) -> None:
    rgb16 = photo.astype(np.uint16) * 257 + 99  # not a multiple of 257: 8 bits would lose it
    icc = swapped_profile()
    data = tiff_file(rgb16, icc=icc, orientation=6, xmp=XMP)
    decoded = decode_image(data, LIMIT, LIMIT)
    assert decoded.rgb.dtype == np.uint16 and answer_notes(decoded, "tiff") == ()
    answer = round_trip(data, "tiff")
    pixels, info, exif = read_back(answer)
    assert pixels.dtype == np.uint16 and pixels.shape == (48, 32, 3)  # turned by 6, then x2
    np.testing.assert_array_equal(pixels[::2, ::2], np.rot90(rgb16, -1))
    assert info.get("icc_profile") == icc
    assert exif[ORIENTATION] == 1 and exif[MAKE] == "RDN Camera"
    assert b"dc:creator" in xmp_of(info) and b'tiff:Orientation="1"' in xmp_of(info)
    tags = tiff_tags(answer)
    assert tags[258] == (16, 16, 16) and tags[34675] == icc and tags[274] == 1


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_every_kind_of_input_keeps_its_metadata_in_a_tiff_answer(
    photo: np.ndarray, source: str
) -> None:
    icc = swapped_profile()
    data = make_file(photo, source, icc=icc, exif=exif_with(orientation=6), xmp=XMP)
    pixels, info, exif = read_back(round_trip(data, "tiff"))
    assert pixels.dtype == np.uint8 and pixels.shape[:2] == (48, 32)
    assert info.get("icc_profile") == icc
    assert exif[MAKE] == "RDN Camera" and exif[ORIENTATION] == 1
    assert exif.get_ifd(0x8825)  # GPS kept (strip_metadata drops it)
    assert b'tiff:Orientation="1"' in xmp_of(info)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgba_alpha_is_marked_unassociated_and_comes_back(photo: np.ndarray, dtype: type) -> None:
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None, :].repeat(16, 0)
    rgba = np.dstack([photo, alpha]).astype(dtype) * (257 if dtype == np.uint16 else 1)
    answer = encode_image(rgba, "tiff", 95)
    assert tiff_tags(answer)[EXTRA_SAMPLES] == (UNASSOCIATED_ALPHA,)
    decoded = decode_image(answer, LIMIT, LIMIT)
    assert decoded.channels == 4 and decoded.rgb.dtype == dtype
    np.testing.assert_array_equal(decoded.alpha, rgba[:, :, 3])
    np.testing.assert_array_equal(decoded.rgb, rgba[:, :, :3])  # straight, not premultiplied


def test_grey_16_bit_stays_grey_and_16_bit(photo: np.ndarray) -> None:
    grey = (photo[:, :, 1].astype(np.uint16) * 257 + 3)[:, :, None]
    meta = FileMetadata(exif=exif_with(orientation=1))
    answer = encode_image(grey, "tiff", 95, metadata=meta)
    decoded = decode_image(answer, LIMIT, LIMIT)
    assert decoded.channels == 1 and decoded.rgb.dtype == np.uint16
    np.testing.assert_array_equal(decoded.rgb[:, :, 0], grey[:, :, 0])


def test_nothing_to_add_leaves_opencvs_file_as_it_is(photo: np.ndarray) -> None:
    answer = encode_image(photo, "tiff", 95)
    assert 34675 not in tiff_tags(answer) and 700 not in tiff_tags(answer)
    np.testing.assert_array_equal(decode_image(answer, LIMIT, LIMIT).rgb, photo)


def test_the_profile_description_is_read_for_the_answer_headers(photo: np.ndarray) -> None:
    data = tiff_file(photo, icc=swapped_profile())
    assert decode_image(data, LIMIT, LIMIT).metadata.profile_name  # lcms names its sRGB
    assert decode_image(tiff_file(photo), LIMIT, LIMIT).metadata.profile_name == ""
