"""Image bytes <-> RGB arrays for the server: OpenCV decode/encode with limits checked first.

Decoding reads the image size from the file header (server/imaging/headers.py) and refuses an
image over the pixel limit before OpenCV allocates its pixels, so a small file that declares
100000x100000 pixels (a decompression bomb) costs nothing. What is accepted:

- formats: PNG, JPEG, WebP, BMP, TIFF (recognised by their first bytes, whatever the client
  calls them); GIF, animated WebP, BigTIFF and anything else are refused;
- greyscale comes back greyscale; RGBA, grey+alpha and palette-with-transparency PNG come back
  RGBA, the alpha upscaled by the model or bicubic (``ImageOptions.alpha``); BMP is RGB;
- 16-bit PNG and TIFF keep their 16 bits: the model is fed them at full precision and a PNG
  or TIFF answer is 16-bit (8-bit-only answers, JPEG, WebP, AVIF, GIF and raw, are rounded to
  8 bits and say so);
  float or 32-bit integer samples are refused;
- decoding work is bounded by the file: every PNG chunk must fit in the file (at most 65536
  chunks), a JPEG may have at most 256 scans (each scan is a pass over the whole image);
- decoding memory is bounded by the pixel limit: a TIFF tile or strip may hold at most
  ``max_pixels`` pixels of at most 4 samples of at most 16 bits (libtiff sizes its buffers from
  the tile, not from the image), so no format needs more than ``DECODE_BYTES_PER_PIXEL`` bytes
  per allowed pixel while it decodes (measured: tests/server/imaging/test_codec.py);
- corrupt and truncated data is refused, never filled in: the decoders' warnings are errors.
  libjpeg, behind OpenCV, fills a cut scan with grey and only warns, so every JPEG is first
  decoded by libjpeg-turbo (simplejpeg, strict, at 1/8 scale: about a fifth of a full decode);
  every TIFF strip or tile must lie inside the file, and a compressed TIFF is also decoded by
  Pillow, which fails on the damaged data that libtiff behind OpenCV passes over;
- the EXIF orientation is applied to the pixels (by OpenCV for JPEG and TIFF, here for PNG and
  WebP) and written as 1 in the answer; CMYK JPEG/TIFF are converted to RGB; a multi-page TIFF
  yields its first page;
- the ICC profile, EXIF and XMP are read (server/imaging/metadata.py) and carried into PNG,
  JPEG, WebP and TIFF (server/imaging/tiff.py) answers; an unparseable profile is refused;
  ``ImageOptions`` may convert the pixels to sRGB (server/imaging/profiles.py) or strip EXIF
  and XMP.

OpenCV decodes everything except 8-bit TIFF pages with an alpha channel, which Pillow reads:
libtiff's RGBA path in OpenCV premultiplies their colours and drops grey+alpha's alpha.

Errors: ``ImageError`` (gRPC INVALID_ARGUMENT) says what was wrong and what is accepted;
``ImageTooLarge`` (RESOURCE_EXHAUSTED) says which limit was exceeded. No cv2.error escapes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from server.imaging import modern
from server.imaging.headers import (
    ACCEPTED_TEXT,
    Header,
    ImageError,
    check_bytes,
    check_pixels,
    read_header,
)
from server.imaging.metadata import (
    NO_METADATA,
    FileMetadata,
    answer_exif,
    answer_xmp,
    orient,
    pillow_encode,
    png_with_metadata,
    read_metadata,
)
from server.imaging.options import DEFAULT_OPTIONS, ImageOptions
from server.imaging.profiles import (
    colour_space,
    describe_profile,
    fits_pixels,
    parse_profile,
    to_srgb,
)
from server.imaging.tiff import finish_tiff

OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw", *modern.PILLOW_OUTPUTS, "tiff")
DEEP_OUTPUTS = ("png", "tiff")  # output formats that hold 16 bits per sample
TIFF_LZW, TIFF_DEFLATE = 5, 8  # TIFF Compression tag values (8: Adobe Deflate)
RAW_CHANNELS = (1, 3, 4)
WEBP_MAX_SIDE = 16383  # pixels, a limit of the WebP bitstream
JPEG_MAX_SIDE = 65535  # pixels, a limit of the JPEG frame header


@dataclass(frozen=True)
class DecodedImage:
    """A decoded input, ready for the model, with what the output must look like."""

    rgb: np.ndarray  # H x W x 3 uint8 or uint16 (16-bit PNG/TIFF), what the model upscales
    alpha: np.ndarray | None  # H x W, rgb's dtype, or None
    channels: int  # 1, 3 or 4: what the output will have (grey in -> grey out)
    source_format: str  # "png", "jpeg", "webp", "bmp", "tiff", "raw"
    metadata: FileMetadata = NO_METADATA  # what the answer carries besides pixels


# --- decoding -----------------------------------------------------------------------------------


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 as is; uint16 rounded to 8 bits (x / 257)."""
    if pixels.dtype == np.uint8:
        return pixels
    # Rounds to nearest (x / 257 is never exactly k + 0.5) straight into uint8.
    return cv2.convertScaleAbs(pixels, alpha=1 / 257)


def _check_depth(pixels: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 and uint16 samples as they are; other sample types refused."""
    if pixels.dtype in (np.uint8, np.uint16):
        return pixels
    raise ImageError(
        f"{fmt.upper()} image has {pixels.dtype} samples, which are not accepted; send 8- or "
        "16-bit integer images"
    )


def _imdecode(data: bytes, flags: int, fmt: str) -> np.ndarray:
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageError(f"{fmt.upper()} data could not be decoded ({e.err}); corrupt?") from e
    if pixels is None or pixels.size == 0:
        raise ImageError(
            f"{fmt.upper()} data could not be decoded ({len(data)} bytes; truncated or corrupt?); "
            f"send {ACCEPTED_TEXT}"
        )
    return pixels


def _decode_tiff_alpha(data: bytes) -> np.ndarray:
    """An 8-bit TIFF page with alpha, via Pillow, as straight (not premultiplied) RGBA."""
    try:
        with Image.open(io.BytesIO(data), formats=["TIFF"]) as image:
            upright = ImageOps.exif_transpose(image)  # the Orientation tag, as OpenCV applies it
            return np.asarray(upright.convert("RGBA"))
    except Exception as e:  # Pillow's TIFF reader raises many types on corrupt files
        raise ImageError(
            f"TIFF data could not be decoded ({len(data)} bytes: {e}; truncated or corrupt?); "
            f"send {ACCEPTED_TEXT}"
        ) from e


def _check_decoded_size(pixels: np.ndarray, header: Header) -> None:
    height, width = pixels.shape[:2]
    if header.format in modern.PILLOW_INPUTS and modern.within_extents(pixels, header):
        return  # HEIF 'ispe' is the coded size; a 'clap' crop and 'irot' give less or turn it
    if {height, width} != {header.height, header.width}:  # orientation may swap them
        raise ImageError(
            f"{header.format.upper()} data is corrupt: the header says "
            f"{header.width}x{header.height} but {width}x{height} pixels were decoded"
        )


def verify_image(data: bytes, max_pixels: int, max_bytes: int) -> tuple[int, int]:
    """(width, height) as the file header declares them, after the checks that need no pixels
    kept: the limits, and the strict integrity decodes of JPEG and compressed TIFF (their
    output is dropped). The orientation tag may swap width and height in the decoded image."""
    header = read_header(data, max_pixels, max_bytes)
    _check_integrity(data, header)
    return header.width, header.height


def _check_integrity(data: bytes, header: Header) -> None:
    if header.format == "jpeg":
        _check_jpeg_data(data, header.jpeg_components)
    elif header.tiff_compressed and not header.tiff_alpha:  # the alpha path decodes with Pillow
        _check_tiff_data(data)


def _check_jpeg_data(data: bytes, components: int) -> None:
    """Decode the JPEG once with libjpeg-turbo in strict mode, at 1/8 scale (every Huffman code
    is still read), so a corrupt or cut scan is an error instead of a grey fill."""
    colorspace = {1: "GRAY", 4: "CMYK"}.get(components, "RGB")
    try:
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_height=1, min_width=1)
    except ValueError as e:
        raise ImageError(
            f"JPEG data is corrupt or truncated ({e}); send the complete, undamaged file"
        ) from e


def _check_tiff_data(data: bytes) -> None:
    """Decode a compressed TIFF page with Pillow too: its decoder fails on damaged compressed
    data (a bad checksum, a short LZW stream) that libtiff behind OpenCV fills in silently.
    A page Pillow cannot open at all is left to OpenCV."""
    try:
        image = Image.open(io.BytesIO(data), formats=["TIFF"])
    except Exception:  # unsupported by Pillow (not by OpenCV): nothing to compare
        return
    try:
        with image:
            image.load()
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError ...
        raise ImageError(
            f"TIFF data is corrupt or truncated ({e}); send the complete, undamaged file"
        ) from e


def decode_image(
    data: bytes,
    max_pixels: int,
    max_bytes: int,
    *,
    verified: bool = False,
    options: ImageOptions = DEFAULT_OPTIONS,
) -> DecodedImage:
    """Decode an encoded image file into RGB (+ alpha), refusing oversized ones before decoding,
    with its profile and metadata read and handled as ``options`` ask.

    ``verified``: ``verify_image`` already passed on ``data``; its integrity decodes are not
    repeated.
    """
    header = read_header(data, max_pixels, max_bytes)
    if not verified:
        _check_integrity(data, header)
    return _carry(_decode_pixels(data, header), data, options)


def _decode_pixels(data: bytes, header: Header) -> DecodedImage:
    fmt = header.format
    if header.tiff_alpha:
        rgba = _decode_tiff_alpha(data)
        _check_decoded_size(rgba, header)
        rgb = np.ascontiguousarray(rgba[:, :, :3])
        return DecodedImage(rgb, np.ascontiguousarray(rgba[:, :, 3]), 4, fmt)
    if fmt == "jpeg":
        # Not IMREAD_UNCHANGED: the other modes apply the EXIF orientation (and give 8 bits).
        flags = cv2.IMREAD_GRAYSCALE if header.jpeg_components == 1 else cv2.IMREAD_COLOR
    elif header.tiff_cmyk:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # CMYK -> BGR through libtiff
    else:
        flags = cv2.IMREAD_UNCHANGED  # keeps alpha and 16-bit samples
    if fmt in modern.PILLOW_INPUTS:  # HEIC, AVIF: Pillow / pillow-heif, in OpenCV's order
        pixels = modern.decode_pillow(data, fmt)
    else:
        pixels = _check_depth(_imdecode(data, flags, fmt), fmt)

    _check_decoded_size(pixels, header)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels == 1:
        grey = pixels.reshape(height, width)
        return DecodedImage(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), None, 1, fmt)
    if channels == 3:
        return DecodedImage(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), None, 3, fmt)
    if channels == 4:
        rgb = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
        return DecodedImage(rgb, np.ascontiguousarray(pixels[:, :, 3]), 4, fmt)
    raise ImageError(
        f"{fmt.upper()} image has {channels} channels; accepted: 1 (grey), 3 (RGB) or 4 (RGBA)"
    )


def _carry(decoded: DecodedImage, data: bytes, options: ImageOptions) -> DecodedImage:
    """``decoded`` with the file's profile, EXIF and XMP: pixels turned upright (PNG, WebP; the
    other decoders did it), converted to sRGB if asked, metadata stripped if asked."""
    fmt = decoded.source_format
    meta = read_metadata(data, fmt)
    rgb, alpha, icc, notes = decoded.rgb, decoded.alpha, meta.icc, list(meta.notes)
    description = ""
    if icc is not None:
        profile = parse_profile(icc, fmt)
        description = describe_profile(profile)
        if not fits_pixels(profile, decoded.channels):
            notes.append(
                f"the {colour_space(profile)} ICC profile is not carried: the pixels were "
                "decoded to RGB"
            )
            icc = None
        elif options.convert_to_srgb:
            rgb, icc = to_srgb(rgb, profile, grey=decoded.channels == 1), None
    if meta.orientation != 1 and fmt in ("png", "webp"):
        rgb = orient(rgb, meta.orientation)
        alpha = None if alpha is None else orient(alpha, meta.orientation)
    exif, xmp = (None, None) if options.strip_metadata else (meta.exif, meta.xmp)
    kept = FileMetadata(icc, exif, xmp, meta.orientation, tuple(notes), description)
    return DecodedImage(rgb, alpha, decoded.channels, fmt, kept)


def check_raw(
    size: int, height: int, width: int, channels: int, max_pixels: int, max_bytes: int
) -> None:
    """Raise unless ``size`` bytes of raw H x W x C uint8 pixels are a valid, allowed image."""
    shape = f"{height}x{width}x{channels}"
    if height < 1 or width < 1:
        raise ImageError(f"raw image shape {shape}: height and width must be at least 1")
    if channels not in RAW_CHANNELS:
        raise ImageError(f"raw image shape {shape}: channels must be 1 (grey), 3 (RGB) or 4 (RGBA)")
    check_pixels(width, height, max_pixels, "raw image")
    check_bytes(size, max_bytes, "raw image data")
    expected = height * width * channels
    if size != expected:
        raise ImageError(
            f"raw image data is {size} bytes but shape {shape} needs exactly {expected} "
            "bytes (uint8, row-major H x W x C)"
        )


def decode_raw(
    data: bytes, height: int, width: int, channels: int, max_pixels: int, max_bytes: int
) -> DecodedImage:
    """Read raw row-major uint8 H x W x C bytes (C in 1, 3, 4); 3 channels are used in place
    (a read-only view of ``data``), 1 and 4 are split into RGB (+ alpha)."""
    check_raw(len(data), height, width, channels, max_pixels, max_bytes)
    pixels = np.frombuffer(data, np.uint8).reshape(height, width, channels)
    if channels == 1:
        return DecodedImage(np.repeat(pixels, 3, axis=2), None, 1, "raw")
    if channels == 3:
        return DecodedImage(pixels, None, 3, "raw")
    return DecodedImage(np.ascontiguousarray(pixels[:, :, :3]), pixels[:, :, 3].copy(), 4, "raw")


# --- model input/output -------------------------------------------------------------------------


def finish_output(
    sr_rgb: np.ndarray, decoded: DecodedImage, scale: int, sr_alpha: np.ndarray | None = None
) -> np.ndarray:
    """Give the upscaled RGB the input's channel layout: grey -> 1 channel, RGBA -> the alpha
    re-attached: ``sr_alpha`` (the model's, sH x sW) when given, else the input's alpha
    upscaled by bicubic (clipped). Returns sH x sW x C of the input's sample type."""
    height, width = decoded.rgb.shape[:2]
    expected = (scale * height, scale * width, 3)
    if sr_rgb.shape != expected or sr_rgb.dtype != decoded.rgb.dtype:
        raise ValueError(
            f"upscaled image is {sr_rgb.shape} {sr_rgb.dtype}; expected {expected} "
            f"{decoded.rgb.dtype}"
        )
    if decoded.channels == 1:
        return cv2.cvtColor(sr_rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    if decoded.channels == 3:
        return sr_rgb
    if decoded.alpha is None:
        raise ValueError("a 4-channel image lost its alpha channel")
    if sr_alpha is None:
        # integer in, integer out: cv2.resize saturates the bicubic overshoot.
        sr_alpha = cv2.resize(
            decoded.alpha, (scale * width, scale * height), interpolation=cv2.INTER_CUBIC
        )
    return np.dstack([sr_rgb, sr_alpha])


def answer_notes(decoded: DecodedImage, fmt: str) -> tuple[str, ...]:
    """What an answer in ``fmt`` cannot keep of ``decoded`` (said in the response and logged):
    16 bits in an 8-bit-only format, metadata in raw pixels, plus the notes of decoding."""
    notes = list(decoded.metadata.notes)
    if decoded.rgb.dtype == np.uint16 and fmt not in DEEP_OUTPUTS:
        notes.append(
            f"16-bit image answered with 8 bits: {fmt} holds 8 bits (choose png or tiff for 16)"
        )
    meta = decoded.metadata
    if fmt == "raw" and (meta.icc or meta.exif or meta.xmp):
        notes.append(
            "raw pixels carry no ICC profile, EXIF or XMP (choose png, jpeg, webp or tiff)"
        )
    return tuple(notes)


# --- encoding -----------------------------------------------------------------------------------


def check_side(fmt: str, width: int, height: int) -> None:
    """Refuse an answer of ``width`` x ``height`` that ``fmt`` cannot hold (JPEG and WebP
    have a largest side); callers check before computing the image, not after."""
    limit = {"jpeg": JPEG_MAX_SIDE, "webp": WEBP_MAX_SIDE}.get(fmt)
    if limit is not None and max(height, width) > limit:
        raise ImageError(
            f"{fmt} output is limited to {limit}x{limit} pixels and the result would be "
            f"{width}x{height}; choose png or raw"
        )


def encode_image(
    image: np.ndarray,
    fmt: str,
    quality: int,
    *,
    side_checked: bool = False,
    metadata: FileMetadata | None = None,
) -> bytes:
    """Encode H x W x C uint8 or uint16 (C = 1, 3 RGB or 4 RGBA; H x W is grey) as ``fmt``.

    ``side_checked``: the caller ran ``check_side`` on this size before computing the image
    (the server does, before any tile), so it is not checked twice. ``metadata``: the profile,
    EXIF (orientation reset to 1, its size tags set to the image's) and XMP to write; PNG, JPEG,
    WebP and TIFF hold them, raw does not.

    ``fmt`` is one of OUTPUT_FORMATS; ``quality`` (1..100) is used by jpeg and webp only.
    "raw" returns the row-major bytes of the array. uint16 stays 16-bit in PNG and TIFF and is
    rounded to 8 bits for the others. JPEG cannot carry alpha and WebP has no grey mode (a grey
    image is written as RGB).
    """
    if fmt not in OUTPUT_FORMATS:
        raise ImageError(f"output format {fmt!r} is not supported; choose one of {OUTPUT_FORMATS}")
    if fmt in ("jpeg", "webp", "avif") and not 1 <= quality <= 100:
        raise ImageError(f"{fmt} quality {quality} is out of range; choose 1..100")
    if image.dtype not in (np.uint8, np.uint16) or image.ndim not in (2, 3):
        raise ImageError(
            f"image to encode is {image.shape} {image.dtype}; expected H x W x C uint8 or uint16"
        )
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in RAW_CHANNELS:
        raise ImageError(f"image to encode has {channels} channels; expected 1, 3 or 4")
    if fmt not in DEEP_OUTPUTS:
        image = to_8bit(image)
    if fmt == "raw":
        return np.ascontiguousarray(image).tobytes()
    height, width = image.shape[:2]
    if fmt == "jpeg" and channels == 4:
        raise ImageError("JPEG cannot carry the alpha channel of an RGBA image; choose png or webp")
    if not side_checked:
        check_side(fmt, width, height)
    if fmt in modern.PILLOW_OUTPUTS:  # AVIF, GIF: Pillow (8 bits; no metadata written)
        return modern.encode_pillow(image, fmt, quality)
    meta = metadata or NO_METADATA
    exif = answer_exif(meta.exif, width, height) if meta.exif else None
    xmp = answer_xmp(meta.xmp) if meta.xmp else None
    if fmt in ("jpeg", "webp") and (meta.icc or exif or xmp):
        return pillow_encode(image, fmt, quality, meta.icc, exif, xmp)
    encoded = _cv2_encode(image, fmt, quality, channels)
    if fmt == "tiff":  # also marks RGBA's alpha, which OpenCV leaves unmarked
        return finish_tiff(encoded, channels, meta.icc, exif, xmp)
    if fmt == "png" and (meta.icc or exif or xmp):
        return png_with_metadata(encoded, meta.icc, exif, xmp)
    return encoded


def _cv2_encode(image: np.ndarray, fmt: str, quality: int, channels: int) -> bytes:
    height, width = image.shape[:2]
    if channels == 1:
        bgr = image.reshape(height, width)
    elif channels == 3:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    params = {
        "png": [],
        "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
        "webp": [cv2.IMWRITE_WEBP_QUALITY, quality],
        # 1 MP photo: LZW 1.6 MB in 58 ms at 8 bits (Deflate 1.5 MB, 145 ms), but 6.3 MB at 16
        # bits, more than none (6.2 MB); Deflate 4.8 MB in 180 ms (OpenCV 5.1)
        "tiff": [
            cv2.IMWRITE_TIFF_COMPRESSION,
            TIFF_DEFLATE if image.dtype == np.uint16 else TIFF_LZW,
        ],
    }[fmt]
    try:
        ok, buffer = cv2.imencode("." + fmt, bgr, params)
    except cv2.error as e:
        raise ImageError(f"{fmt} encoding of a {width}x{height} image failed: {e.err}") from e
    if not ok:
        raise ImageError(f"{fmt} encoding of a {width}x{height} image failed; try png or raw")
    return buffer.tobytes()
