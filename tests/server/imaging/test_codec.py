"""Codec contract with real files written by Pillow and OpenCV: round trips, channel layouts,
limits checked before decoding, and a precise ImageError for every kind of bad input."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from server.imaging.codec import (
    OUTPUT_FORMATS,
    DecodedImage,
    ImageError,
    decode_image,
    decode_raw,
    encode_image,
    finish_output,
)
from server.imaging.headers import INPUT_FORMATS, ImageTooLarge
from tests.server.reference import from_planar, to_planar

MAX_PIXELS = 4096 * 4096 + 1
MAX_BYTES = 64 * 2**20
ACCEPTED = "PNG, JPEG, WebP, BMP, TIFF, GIF, HEIC or AVIF"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo crop, 40 x 56 RGB uint8 (skimage's astronaut, her face)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:180:2, 180:292:2])


@pytest.fixture
def save(tmp_path: Path) -> Callable[..., bytes]:
    """Write a Pillow image as a real file in tmp_path and return the file's bytes."""
    count = iter(range(1000))

    def write(image: Image.Image, fmt: str, **options: object) -> bytes:
        path = tmp_path / f"image{next(count)}.{fmt.lower()}"
        image.save(path, fmt, **options)
        return path.read_bytes()

    return write


def decode(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> DecodedImage:
    return decode_image(data, max_pixels, max_bytes)


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "name"),
    [
        ("PNG", {}, "png"),
        ("WEBP", {"lossless": True}, "webp"),
        ("BMP", {}, "bmp"),
        ("TIFF", {}, "tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "tiff"),
    ],
)
def test_lossless_formats_decode_exactly(photo, save, fmt: str, options: dict, name: str) -> None:
    decoded = decode(save(Image.fromarray(photo), fmt, **options))
    assert decoded.source_format == name
    assert decoded.channels == 3 and decoded.alpha is None
    assert decoded.rgb.dtype == np.uint8
    np.testing.assert_array_equal(decoded.rgb, photo)


@pytest.mark.parametrize(("fmt", "options"), [("JPEG", {"quality": 95}), ("WEBP", {"quality": 90})])
def test_lossy_formats_decode_like_pillow(photo, save, fmt: str, options: dict) -> None:
    data = save(Image.fromarray(photo), fmt, **options)
    decoded = decode(data)
    assert decoded.channels == 3 and decoded.rgb.shape == photo.shape
    assert np.abs(decoded.rgb.astype(int) - pillow_rgb(data)).max() <= 2
    assert np.abs(decoded.rgb.astype(int) - photo).mean() < 4


def test_files_written_by_opencv_decode(photo, tmp_path: Path) -> None:
    for ext in ("png", "bmp", "tiff", "webp", "jpg"):
        path = tmp_path / f"cv.{ext}"
        assert cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        decoded = decode(path.read_bytes())
        tolerance = 6 if ext in ("webp", "jpg") else 0
        assert np.abs(decoded.rgb.astype(int) - photo).mean() <= tolerance, ext


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_grey_in_grey_out(photo, save, fmt: str) -> None:
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    options = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    decoded = decode(save(Image.fromarray(grey), fmt, **options))
    # WebP has no grey mode: a grey WebP is an RGB file whose channels happen to be equal.
    assert decoded.channels == (3 if fmt == "WEBP" else 1)
    assert decoded.rgb.shape == (*grey.shape, 3)
    for c in range(3):
        error = np.abs(decoded.rgb[:, :, c].astype(int) - grey)
        assert error.mean() < 3 if fmt == "JPEG" else error.max() == 0
    if fmt == "PNG":
        sr = cv2.resize(decoded.rgb, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        out = finish_output(sr, decoded, 2)
        assert out.shape == (80, 112, 1)
        np.testing.assert_array_equal(out[:, :, 0], grey.repeat(2, 0).repeat(2, 1))
        back = cv2.imdecode(np.frombuffer(encode_image(out, "png", 95), np.uint8), -1)
        assert back.ndim == 2 and back.shape == (80, 112)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("WEBP", {"lossless": True, "exact": True}),  # exact: keep RGB under alpha 0
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_rgba_alpha_is_kept_and_upscaled(photo, save, fmt: str, options: dict) -> None:
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[:, 28:] = 255  # a hard edge: bicubic overshoot must be clipped, not wrapped
    alpha[:10, :10] = 77
    decoded = decode(save(Image.fromarray(np.dstack([photo, alpha])), fmt, **options))
    assert decoded.channels == 4
    np.testing.assert_array_equal(decoded.rgb, photo)
    np.testing.assert_array_equal(decoded.alpha, alpha)

    sr = decoded.rgb.repeat(3, 0).repeat(3, 1)
    out = finish_output(sr, decoded, 3)
    assert out.shape == (120, 168, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, :3], sr)
    up = out[:, :, 3]
    np.testing.assert_array_equal(up, cv2.resize(alpha, (168, 120), interpolation=cv2.INTER_CUBIC))
    assert (up[40:, :80] == 0).all() and (up[:, 88:] == 255).all() and (up[:24, :24] == 77).all()
    # The overshoot of bicubic at the 0 -> 255 edge (column 84) is clipped, not wrapped.
    assert (up[40:, :84] <= 127).all() and (up[40:, 84:] >= 128).all()


def test_grey_alpha_and_palette_transparency_become_rgba(photo, save) -> None:
    grey = Image.fromarray(photo).convert("L")
    la = Image.merge("LA", [grey, Image.new("L", grey.size, 200)])
    decoded = decode(save(la, "PNG"))
    assert decoded.channels == 4 and (decoded.alpha == 200).all()
    np.testing.assert_array_equal(decoded.rgb[:, :, 1], np.asarray(grey))

    palette = Image.fromarray(photo).quantize(16)
    index = np.asarray(palette)
    palette.info["transparency"] = int(index[0, 0])
    decoded = decode(save(palette, "PNG", transparency=int(index[0, 0])))
    assert decoded.channels == 4
    np.testing.assert_array_equal(decoded.alpha == 0, index == index[0, 0])

    decoded = decode(save(la, "TIFF"))  # read with Pillow: OpenCV would drop the alpha
    assert decoded.channels == 4 and (decoded.alpha == 200).all()
    np.testing.assert_array_equal(decoded.rgb[:, :, 0], np.asarray(grey))

    opaque = Image.fromarray(photo).quantize(16)
    decoded = decode(save(opaque, "PNG"))
    assert decoded.channels == 3
    np.testing.assert_array_equal(decoded.rgb, np.asarray(opaque.convert("RGB")))


def test_sixteen_bit_inputs_keep_sixteen_bits_and_eight_bit_answers_round(
    save, tmp_path: Path
) -> None:
    ramp = np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16)
    ramp[0, :4] = [0, 128, 129, 65535]  # 128/257 rounds down, 129/257 rounds up
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert tuple(expected[0, :4]) == (0, 0, 1, 255)

    decoded = decode(save(Image.fromarray(ramp), "PNG"))
    assert decoded.channels == 1 and decoded.rgb.dtype == np.uint16
    np.testing.assert_array_equal(decoded.rgb[:, :, 0], ramp)
    raw = encode_image(decoded.rgb[:, :, :1], "raw", 95)  # 8-bit only: rounded
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(40, 56), expected)

    rgb16 = np.dstack([ramp, ramp[::-1], 65535 - ramp])
    for ext in ("png", "tiff"):
        path = tmp_path / f"rgb16.{ext}"
        assert cv2.imwrite(str(path), rgb16[:, :, ::-1].copy())
        decoded = decode(path.read_bytes())
        assert decoded.channels == 3
        np.testing.assert_array_equal(decoded.rgb, rgb16)
        png = encode_image(decoded.rgb, "png", 95)
        np.testing.assert_array_equal(
            cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)[:, :, ::-1], rgb16
        )


def test_float_tiff_is_refused(photo, save) -> None:
    data = save(Image.fromarray(photo).convert("F"), "TIFF")
    with pytest.raises(ImageError, match=r"float32 samples.*8- or 16-bit"):
        decode(data)


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1), (8, 1)])
def test_jpeg_exif_orientation_is_applied(photo, save, orientation: int, turn: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(Image.fromarray(photo), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data)
    upright = np.rot90(photo, turn)
    assert decoded.rgb.shape == upright.shape
    assert np.abs(decoded.rgb.astype(int) - upright).mean() < 4
    assert np.abs(decoded.rgb.astype(int) - pillow_rgb(data)).max() <= 2


def test_tiff_orientation_tag_is_applied(photo, save) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode(save(Image.fromarray(photo), "TIFF", exif=exif.tobytes()))
    np.testing.assert_array_equal(decoded.rgb, np.rot90(photo, -1))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(photo, save, fmt: str) -> None:
    decoded = decode(save(Image.fromarray(photo).convert("CMYK"), fmt, quality=95))
    assert decoded.channels == 3 and decoded.alpha is None
    assert np.abs(decoded.rgb.astype(int) - photo).mean() < 4


def test_multipage_tiff_yields_the_first_page(photo, save) -> None:
    first, second = Image.fromarray(photo), Image.fromarray(255 - photo[:20])
    decoded = decode(save(first, "TIFF", save_all=True, append_images=[second]))
    np.testing.assert_array_equal(decoded.rgb, photo)


# --- refusals ----------------------------------------------------------------------------------


def test_empty_random_and_foreign_bytes_name_the_problem(photo, save) -> None:
    with pytest.raises(ImageError, match=f"empty; send a {ACCEPTED} file"):
        decode(b"")
    noise = bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8))
    with pytest.raises(ImageError) as info:
        decode(b"\x13\x37" + noise)
    assert f"not a {ACCEPTED} file (first bytes 13 37" in str(info.value)
    with pytest.raises(ImageError, match=r"GIF files are read as animations"):
        decode(save(Image.fromarray(photo).convert("P"), "GIF"))
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    animated = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(ImageError, match="animated WebP is not accepted"):
        decode(animated)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_truncated_files_are_refused_or_complete(photo, save, fmt: str, options: dict) -> None:
    data = save(Image.fromarray(photo), fmt, **options)
    reference = decode(data).rgb
    for cut in (1, 4, 9, 20, 31, 60, len(data) // 3, len(data) // 2, len(data) - 20, len(data) - 1):
        try:
            decoded = decode(data[:cut])
        except ImageError as e:
            message = str(e)
            assert any(word in message for word in ("truncated", "corrupt", "not a PNG")), (
                f"cut at {cut}: {message}"
            )
        else:  # only the trailer was lost: the image must then be complete
            np.testing.assert_array_equal(decoded.rgb, reference, err_msg=f"cut at {cut}")
            assert cut > len(data) - 20


def test_truncated_rgba_tiff_is_refused(photo, save) -> None:
    data = save(Image.fromarray(np.dstack([photo, photo[:, :, 0]])), "TIFF")
    for cut in (20, len(data) // 2, len(data) - 200):
        with pytest.raises(ImageError, match="truncated"):
            decode(data[:cut])


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_damaged_files_decode_or_raise_image_error(photo, save, fmt: str, options: dict) -> None:
    """Bytes flipped anywhere (header included): an image or an ImageError, nothing else."""
    rgba = np.dstack([photo, photo[:, :, 1]])
    data = save(Image.fromarray(rgba if fmt != "JPEG" else photo), fmt, **options)
    rng = np.random.default_rng(sum(data[:64]))
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(40):
        damaged = bytearray(data)
        for where in rng.integers(0, min(len(data), 400), 3):
            damaged[where] ^= int(rng.integers(1, 256))
        try:
            decoded = decode(bytes(damaged), max_pixels=10**6)
        except ImageError as e:
            assert str(e), "an ImageError must say what was wrong"
            outcomes["refused"] += 1
        else:
            assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape[2] == 3
            assert decoded.rgb.shape[0] * decoded.rgb.shape[1] <= 10**6
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0


def test_corrupt_data_inside_a_valid_header_is_refused(photo, save) -> None:
    data = bytearray(save(Image.fromarray(photo), "PNG"))
    data[60:200] = bytes(140)  # wipe part of the compressed pixel data
    with pytest.raises(ImageError, match="PNG data could not be decoded"):
        decode(bytes(data))


# --- limits, checked on the header before any pixel is decoded ----------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_declaring(width: int, height: int, idat: bytes) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_declaring(100_000, 100_000, zlib.compress(bytes(300_001) * 4, 9))
    assert len(bomb) < 5000
    with pytest.raises(ImageTooLarge) as info:
        decode(bomb)
    assert "PNG image 100000x100000 = 10000.0 MP is over --max-pixels 4096x4096 = 16.8 MP" in (
        str(info.value)
    )


def test_oversized_image_allocates_nothing_before_refusal() -> None:
    """A real 3000x3000 PNG (27 MB of pixels, a few kB of file): refused with no allocation;
    decoded, the same file allocates its pixels (so the measurement can see them)."""
    rows = (b"\x00" + bytes(3 * 3000)) * 3000
    data = png_declaring(3000, 3000, zlib.compress(rows, 9))
    del rows
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode(data, max_pixels=1_000_000)
        _, refused_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decoded = decode(data, max_pixels=9_000_000)
        _, decoded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.rgb.shape == (3000, 3000, 3)
    assert refused_peak < 1_000_000
    assert decoded_peak > 27_000_000


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_format_is_measured_from_its_header(photo, save, fmt: str) -> None:
    """Patch each real file's header to declare 20000 x 20000 pixels: refused as too large."""
    pil_fmt, options = {"webp": ("WEBP", {"lossless": True})}.get(fmt, (fmt.upper(), {}))
    data = save(Image.fromarray(photo), pil_fmt, **options)
    if fmt == "png":
        big = png_declaring(20000, 20000, b"")
    elif fmt == "jpeg":
        sof = data.index(b"\xff\xc0")
        big = patch(data, sof + 5, ">HH", 20000, 20000)
    elif fmt == "webp":
        assert data[12:16] == b"VP8L"
        big = patch(data, 21, "<I", 15999 | (15999 << 14) | (data[24] >> 4 << 28))
    elif fmt == "bmp":
        big = patch(data, 18, "<ii", 20000, 20000)
    else:
        big = patch_tiff_size(data, 20000, 20000)
    with pytest.raises(ImageTooLarge, match=r"MP is over --max-pixels 4096x4096 = 16\.8 MP"):
        decode(big)
    # The unpatched file decodes; a limit one pixel below its size refuses it.
    assert decode(data, max_pixels=40 * 56).rgb.shape == (40, 56, 3)
    with pytest.raises(ImageTooLarge, match="40 = 2240 pixels"):
        decode(data, max_pixels=40 * 56 - 1)


def patch_tiff_size(data: bytes, width: int, height: int) -> bytes:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    out = bytearray(data)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        (tag,) = struct.unpack(order + "H", data[entry : entry + 2])
        if tag in (256, 257):
            value = width if tag == 256 else height
            out[entry + 2 : entry + 12] = struct.pack(order + "HII", 4, 1, value)
    return bytes(out)


def test_byte_limit_is_checked_first(photo, save) -> None:
    data = save(Image.fromarray(photo), "PNG")
    with pytest.raises(
        ImageTooLarge,
        match=f"image data of {len(data) / 1024:.1f} KiB is over --max-request-bytes 100 bytes",
    ):
        decode(data, max_bytes=100)
    with pytest.raises(ImageTooLarge, match="19 bytes is over --max-request-bytes 10 bytes"):
        decode(b"not an image at all", max_bytes=10)
    assert decode(data, max_bytes=len(data)).channels == 3


def test_zero_sized_header_is_refused(photo, save) -> None:
    with pytest.raises(ImageError, match="declares 0x5 pixels; both sides must be at least 1"):
        decode(png_declaring(0, 5, b""))


# --- raw ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_decode_raw_layouts(photo, channels: int) -> None:
    pixels = {1: photo[:, :, :1], 3: photo, 4: np.dstack([photo, photo[:, :, 0]])}[channels]
    decoded = decode_raw(pixels.tobytes(), 40, 56, channels, MAX_PIXELS, MAX_BYTES)
    assert decoded.channels == channels and decoded.source_format == "raw"
    assert decoded.rgb.shape == (40, 56, 3)
    if channels == 1:
        np.testing.assert_array_equal(decoded.rgb, np.repeat(pixels, 3, axis=2))
    else:
        np.testing.assert_array_equal(decoded.rgb, photo)
    if channels == 4:
        np.testing.assert_array_equal(decoded.alpha, photo[:, :, 0])
    else:
        assert decoded.alpha is None


@pytest.mark.parametrize(
    ("nbytes", "shape", "error", "message"),
    [
        (
            100,
            (10, 10, 3),
            ImageError,
            "raw image data is 100 bytes but shape 10x10x3 needs exactly 300 bytes",
        ),
        (0, (0, 10, 3), ImageError, "shape 0x10x3: height and width must be at least 1"),
        (40, (10, 2, 2), ImageError, "channels must be 1 (grey), 3 (RGB) or 4 (RGBA)"),
        (50, (10, 1, 5), ImageError, "channels must be 1 (grey), 3 (RGB) or 4 (RGBA)"),
        (
            3,
            (5000, 5000, 1),
            ImageTooLarge,
            "raw image 5000x5000 = 25.0 MP is over --max-pixels",
        ),
        (
            300,
            (10, 10, 3),
            ImageTooLarge,
            "raw image data of 300 bytes is over --max-request-bytes 200 bytes",
        ),
    ],
)
def test_decode_raw_refusals(nbytes: int, shape: tuple, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        decode_raw(bytes(nbytes), *shape, MAX_PIXELS, 200)
    assert type(info.value) is error
    assert message in str(info.value)


# --- planar helpers and output ------------------------------------------------------------------


def test_planar_round_trip_is_exact_and_rounds() -> None:
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values[::-1], values], axis=-1).reshape(16, 16, 3)
    planar = to_planar(rgb)
    assert planar.shape == (3, 16, 16) and planar.dtype == np.float32
    assert planar.min() == 0.0 and planar.max() == 1.0
    np.testing.assert_array_equal(from_planar(planar), rgb)
    nudged = np.array([0.49, 0.51, 254.6, -3.0, 300.0, 127.5], np.float32) / 255
    out = from_planar(np.broadcast_to(nudged[None, None, :], (3, 1, 6)))
    assert out.shape == (1, 6, 3) and out.flags.c_contiguous
    assert out[0, :, 0].tolist() == [0, 1, 255, 0, 255, 128]


def test_finish_output_checks_the_size(photo) -> None:
    decoded = decode_raw(photo.tobytes(), 40, 56, 3, MAX_PIXELS, MAX_BYTES)
    with pytest.raises(ValueError, match=r"expected \(80, 112, 3\)"):
        finish_output(photo, decoded, 2)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_encode_round_trips(photo, channels: int) -> None:
    image = {1: photo[:, :, :1], 3: photo, 4: np.dstack([photo, 255 - photo[:, :, 1]])}[channels]
    assert encode_image(image, "raw", 95) == image.tobytes()
    png = decode(encode_image(image, "png", 95))
    assert png.channels == channels
    np.testing.assert_array_equal(
        png.rgb,
        np.broadcast_to(image[:, :, :3], photo.shape) if channels != 1 else np.repeat(image, 3, 2),
    )
    webp = decode(encode_image(image, "webp", 90))
    assert webp.channels == (4 if channels == 4 else 3)
    assert np.abs(webp.rgb.astype(int) - png.rgb).mean() < 6
    if channels != 4:
        jpeg = decode(encode_image(image, "jpeg", 90))
        assert jpeg.channels == channels
        assert np.abs(jpeg.rgb.astype(int) - png.rgb).mean() < 6
    # Quality changes the lossy output size.
    assert len(encode_image(image, "jpeg" if channels != 4 else "webp", 10)) < len(
        encode_image(image, "jpeg" if channels != 4 else "webp", 100)
    )


def test_encode_accepts_two_dimensional_grey(photo) -> None:
    grey = np.ascontiguousarray(photo[:, :, 0])
    assert decode(encode_image(grey, "png", 95)).channels == 1
    assert encode_image(grey, "raw", 95) == grey.tobytes()


@pytest.mark.parametrize(
    ("image", "fmt", "quality", "message"),
    [
        (
            np.zeros((4, 4, 3), np.uint8),
            "bmp",
            95,
            "output format 'bmp' is not supported; choose one of",
        ),
        (np.zeros((4, 4, 3), np.uint8), "jpeg", 0, "jpeg quality 0 is out of range; choose 1..100"),
        (np.zeros((4, 4, 3), np.uint8), "webp", 101, "webp quality 101 is out of range"),
        (np.zeros((4, 4, 4), np.uint8), "jpeg", 95, "JPEG cannot carry the alpha channel"),
        (np.zeros((1, 16384, 3), np.uint8), "webp", 95, "webp output is limited to 16383x16383"),
        (np.zeros((4, 4, 2), np.uint8), "png", 95, "has 2 channels; expected 1, 3 or 4"),
        (np.zeros((4, 4, 3), np.float32), "png", 95, "expected H x W x C uint8"),
    ],
)
def test_encode_refusals(image: np.ndarray, fmt: str, quality: int, message: str) -> None:
    with pytest.raises(ImageError) as info:
        encode_image(image, fmt, quality)
    assert message in str(info.value)


def test_format_lists() -> None:
    assert INPUT_FORMATS == ("png", "jpeg", "webp", "bmp", "tiff")
    assert OUTPUT_FORMATS == ("png", "jpeg", "webp", "raw", "avif", "gif", "tiff")
    assert encode_image(np.zeros((2, 2, 3), np.uint8), "png", 0)  # quality unused for png


# --- corrupt data is refused, not filled in ---------------------------------------------------


def test_a_jpeg_whose_scan_is_cut_is_refused(photo: np.ndarray, save: Callable[..., bytes]) -> None:
    """libjpeg (behind OpenCV) only warns on a cut scan and fills the rest with grey."""
    for options in ({}, {"progressive": True}):
        data = save(Image.fromarray(photo), "JPEG", quality=90, **options)
        cut = data[: len(data) * 2 // 3] + b"\xff\xd9"
        assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is not None
        with pytest.raises(ImageError, match="JPEG data is corrupt or truncated"):
            decode(cut)


def test_a_compressed_tiff_with_damaged_data_is_refused(
    photo: np.ndarray, save: Callable[..., bytes]
) -> None:
    """libtiff (behind OpenCV) decodes a Deflate strip with a bad checksum without an error."""
    data = bytearray(save(Image.fromarray(photo), "TIFF", compression="tiff_adobe_deflate"))
    data[len(data) // 4] ^= 0x55  # inside the strip data (Pillow writes the IFD last)
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError, match="TIFF data is corrupt or truncated"):
        decode(bytes(data))


def test_a_tiff_whose_strips_run_past_the_end_is_refused(
    photo: np.ndarray, save: Callable[..., bytes]
) -> None:
    data = save(Image.fromarray(photo), "TIFF")  # uncompressed, IFD first, strips after
    with pytest.raises(ImageError, match=r"TIFF data is truncated .* its image data runs to"):
        decode(data[: len(data) - 100])


def one_tile_tiff(rgb: np.ndarray, tile: int) -> bytes:
    """An uncompressed RGB TIFF stored in one ``tile`` x ``tile`` tile (Pillow writes strips)."""
    height, width = rgb.shape[:2]
    padded = np.zeros((tile, tile, 3), np.uint8)
    padded[:height, :width] = rgb
    body = padded.tobytes()
    bits_at = 8 + len(body)
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits_at), (259, 3, 1, 1),
        (262, 3, 1, 2), (277, 3, 1, 3), (322, 4, 1, tile), (323, 4, 1, tile),
        (324, 4, 1, 8), (325, 4, 1, len(body)),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        packed = struct.pack("<I", value) if kind == 4 or n > 1 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, n) + packed
    head = b"II*\x00" + struct.pack("<I", bits_at + 6)
    return head + body + struct.pack("<3H", 8, 8, 8) + ifd + b"\0\0\0\0"


def test_tiff_tiles_larger_than_the_pixel_limit_are_refused_before_decoding(
    photo: np.ndarray,
) -> None:
    """libtiff sizes its buffer from the tile, not from the image."""
    data = one_tile_tiff(photo, 64)  # a 56x40 image in one 64x64 tile
    np.testing.assert_array_equal(decode(data, max_pixels=64 * 64).rgb, photo)
    with pytest.raises(ImageTooLarge, match="tiles or strips of 4096 pixels each"):
        decode(data, max_pixels=64 * 64 - 1)
