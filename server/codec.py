"""Image bytes <-> RGB arrays for the server: OpenCV decode/encode with limits checked first.

Decoding reads the image size from the file header (a few bytes, parsed here) and refuses an
image over the pixel limit before OpenCV allocates its pixels, so a small file that declares
100000x100000 pixels (a decompression bomb) costs nothing. What is accepted:

- formats: PNG, JPEG, WebP, BMP, TIFF (recognised by their first bytes, whatever the client
  calls them); GIF, animated WebP, BigTIFF and anything else are refused;
- greyscale comes back greyscale; RGBA, grey+alpha and palette-with-transparency PNG come back
  RGBA, the alpha channel upscaled separately (bicubic); BMP is read as RGB (no alpha);
- 16-bit images are reduced to 8 bits (rounded); the model works in 8-bit RGB and the output is
  8-bit; float or 32-bit integer samples are refused;
- decoding work is bounded by the file: every PNG chunk must fit in the file (at most 65536
  chunks), a JPEG may have at most 256 scans (each scan is a pass over the whole image);
- decoding memory is bounded by the pixel limit: a TIFF tile or strip may hold at most
  ``max_pixels`` pixels of at most 4 samples of at most 16 bits (libtiff sizes its buffers from
  the tile, not from the image), so no format needs more than ``DECODE_BYTES_PER_PIXEL`` bytes
  per allowed pixel while it decodes (measured: tests/server/test_codec.py);
- corrupt and truncated data is refused, never filled in: the decoders' warnings are errors.
  libjpeg, behind OpenCV, fills a cut scan with grey and only warns, so every JPEG is first
  decoded by libjpeg-turbo (simplejpeg, strict, at 1/8 scale: about a fifth of a full decode);
  every TIFF strip or tile must lie inside the file, and a compressed TIFF is also decoded by
  Pillow, which fails on the damaged data that libtiff behind OpenCV passes over;
- JPEG EXIF orientation and the TIFF Orientation tag are applied; PNG and WebP pixels are used as
  stored; CMYK JPEG/TIFF are converted to RGB; a multi-page TIFF yields its first page.

OpenCV decodes everything except 8-bit TIFF pages with an alpha channel, which Pillow reads:
libtiff's RGBA path in OpenCV premultiplies their colours and drops grey+alpha's alpha.

Errors: ``ImageError`` (gRPC INVALID_ARGUMENT) says what was wrong and what is accepted;
``ImageTooLarge`` (RESOURCE_EXHAUSTED) says which limit was exceeded. No cv2.error escapes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from server.limit_text import over_bytes, over_pixels, pixel_limit

INPUT_FORMATS = ("png", "jpeg", "webp", "bmp", "tiff")
OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw")
RAW_CHANNELS = (1, 3, 4)
WEBP_MAX_SIDE = 16383  # pixels, a limit of the WebP bitstream
JPEG_MAX_SIDE = 65535  # pixels, a limit of the JPEG frame header
PNG_MAX_CHUNKS = 2**16  # a walk of ~50 ms; real files have a few hundred at most
JPEG_MAX_SCANS = 256  # nvImageCodec's default limit against the many-scans DoS (cure53 report)
TIFF_MAX_SAMPLES = 4  # samples per pixel: grey, grey+alpha, RGB, RGBA or CMYK
TIFF_MAX_BITS = 16  # bits per sample (float and 32-bit samples are refused after decoding)
DECODE_BYTES_PER_PIXEL = 24  # peak decode memory per pixel of the limit, any accepted format

_ACCEPTED = "a PNG, JPEG, WebP, BMP or TIFF file"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (C4 = DHT, C8 = JPG, CC = DAC are not frames).
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_KNOWN_OTHERS = {b"GIF8": "GIF", b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"%PDF": "PDF"}


class ImageError(ValueError):
    """The image bytes or parameters are invalid; the message says what is accepted."""


class NotAnImage(ImageError):
    """The bytes are no image format this server reads (its first bytes name none)."""


class ImageTooLarge(ImageError):
    """The image is over the pixel or byte limit."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded input, ready for the model, with what the output must look like."""

    rgb: np.ndarray  # H x W x 3 uint8, what the model upscales
    alpha: np.ndarray | None  # H x W uint8 or None
    channels: int  # 1, 3 or 4: what the output will have (grey in -> grey out)
    source_format: str  # "png", "jpeg", "webp", "bmp", "tiff", "raw"


@dataclass(frozen=True)
class _Header:
    """What the file header says, read before any pixel is decoded."""

    format: str
    width: int
    height: int
    jpeg_components: int = 3  # JPEG only: 1 grey, 3 YCbCr/RGB, 4 CMYK
    tiff_cmyk: bool = False  # TIFF only: PhotometricInterpretation = separated (CMYK)
    tiff_alpha: bool = False  # TIFF only: 8-bit with an alpha (ExtraSamples) channel
    tiff_block_pixels: int = 0  # TIFF only: pixels of one tile or strip (libtiff's buffer)
    tiff_compressed: bool = False  # TIFF only: Compression is not 1 (none)
    min_bytes: int = 0  # uncompressed BMP only: where its pixel rows end


# --- header parsing (pure functions on bytes) ---------------------------------------------------


def _first_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data[:4])


def _truncated(fmt: str, what: str) -> ImageError:
    return ImageError(f"{fmt.upper()} data is truncated ({what}); send the complete file")


def sniff_format(data: bytes) -> str:
    """The input format named by the first bytes of ``data``; ImageError if not accepted."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageError(f"BigTIFF files are not accepted; send {_ACCEPTED} (classic TIFF)")
    known = _KNOWN_OTHERS.get(bytes(data[:4]))
    if known:
        raise NotAnImage(
            f"image data is a {known} file, which is not accepted; send {_ACCEPTED} "
            f"(first bytes {_first_bytes(data)})"
        )
    raise NotAnImage(f"image data is not {_ACCEPTED} (first bytes {_first_bytes(data)})")


def _png_header(data: bytes) -> _Header:
    if len(data) < 33:
        raise _truncated("png", f"{len(data)} bytes, the header alone takes 33")
    if data[12:16] != b"IHDR":
        raise ImageError("PNG data is corrupt: the first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    _check_png_chunks(data)
    return _Header("png", width, height)


def _check_png_chunks(data: bytes) -> None:
    """Every chunk up to IEND must fit in ``data``: OpenCV allocates a chunk's declared length
    before reading it, so one corrupt length field (up to 4 GiB) would cost seconds and GiBs.
    The walk is bounded: encoders write chunks of 8 KiB or more, so PNG_MAX_CHUNKS of them
    hold 512 MiB and more."""
    n, i = len(data), len(_PNG_MAGIC)
    for _ in range(PNG_MAX_CHUNKS):
        if i >= n:
            raise _truncated("png", f"no IEND chunk in {n} bytes")
        if i + 8 > n:
            raise _truncated("png", f"ends at byte {n} inside a chunk header")
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        end = i + 12 + length  # length, type, data, CRC
        if end > n:
            raise _truncated(
                "png",
                f"chunk {kind.decode('latin-1')!r} at byte {i} declares {length} bytes, only "
                f"{max(0, n - i - 12)} follow; or its length field is corrupt",
            )
        if kind == b"IEND":
            return
        i = end
    raise ImageError(f"PNG data has more than {PNG_MAX_CHUNKS} chunks; re-save the PNG")


def _jpeg_header(data: bytes) -> _Header:
    """Walk the JPEG markers up to the first scan; the frame header (SOFn) holds the size."""
    n, i = len(data), 2
    frame: _Header | None = None
    while True:
        if i >= n:
            raise _truncated("jpeg", f"ends at byte {n} before the image data")
        if data[i] != 0xFF:
            raise ImageError(f"JPEG data is corrupt: marker expected at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            raise _truncated("jpeg", f"ends at byte {n} inside a marker")
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9 or (marker == 0xDA and frame is None):
            raise ImageError("JPEG data is corrupt: no frame header (SOF) before the image data")
        if i + 2 > n:
            raise _truncated("jpeg", f"ends at byte {n} inside a marker")
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise ImageError(f"JPEG data is corrupt: segment length {length} at byte {i}")
        if marker == 0xDA:  # start of scan: entropy-coded data follows, up to EOI
            # 0xFF in entropy-coded data is always followed by 0x00 or RSTn, so FF D9 after the
            # first scan can only be the end-of-image marker.
            if data.find(b"\xff\xd9", i) < 0:
                raise _truncated("jpeg", "no end-of-image marker after the image data")
            # Each scan costs a pass over the whole image: thousands of empty scans (a few
            # bytes each) would pin a decode thread for seconds to hours.
            scans = 1 + data.count(b"\xff\xda", i)
            if scans > JPEG_MAX_SCANS:
                raise ImageError(
                    f"JPEG data has {scans} scans; at most {JPEG_MAX_SCANS} are accepted "
                    "(progressive JPEGs have about 10); re-save the JPEG"
                )
            assert frame is not None
            return frame
        if marker in _JPEG_SOF:
            if i + 8 > n:
                raise _truncated("jpeg", f"ends at byte {n} inside the frame header")
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            frame = _Header("jpeg", width, height, jpeg_components=data[i + 7])
            if height == 0:
                raise ImageError(
                    "JPEG frame header declares height 0 (set later by a DNL marker), which is "
                    "not supported; re-save the JPEG"
                )
        i += length


def _webp_header(data: bytes) -> _Header:
    if len(data) < 30:
        raise _truncated("webp", f"{len(data)} bytes, the header alone takes 30")
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 > len(data):
        raise _truncated("webp", f"{len(data)} bytes, the RIFF header says {riff_size + 8}")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("WebP data is corrupt: no VP8 start code")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError("WebP data is corrupt: no VP8L signature")
        (bits,) = struct.unpack("<I", data[21:25])
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        if data[20] & 0x02:
            raise ImageError(f"animated WebP is not accepted; send a single image ({_ACCEPTED})")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        raise ImageError(f"WebP data is corrupt: unknown first chunk {chunk!r}")
    return _Header("webp", width, height)


def _bmp_header(data: bytes) -> _Header:
    if len(data) < 26:
        raise _truncated("bmp", f"{len(data)} bytes, the header alone takes 26")
    offset, dib_size = struct.unpack("<II", data[10:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bpp = struct.unpack("<HHHH", data[18:26])
        compression = 0
    elif dib_size >= 40:
        if len(data) < 34:
            raise _truncated("bmp", f"{len(data)} bytes, the header alone takes 34")
        width, height, _, bpp, compression = struct.unpack("<iiHHI", data[18:34])
        height = abs(height)  # negative: rows stored top-down
    else:
        raise ImageError(f"BMP data is corrupt: unknown info header size {dib_size}")
    if width < 0:
        raise ImageError(f"BMP data is corrupt: negative width {width}")
    end = 0
    if compression in (0, 3, 6) and bpp in (1, 4, 8, 16, 24, 32):
        end = offset + (width * bpp + 31) // 32 * 4 * height  # rows padded to 4 bytes
    return _Header("bmp", width, height, min_bytes=end)


def _tiff_header(data: bytes) -> _Header:
    """Read the first IFD (page): size, layout, and where its strips or tiles lie."""
    order = "<" if data[:2] == b"II" else ">"
    n = len(data)
    if n < 8:
        raise _truncated("tiff", f"{n} bytes, the header alone takes 8")
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > n:
        raise _truncated("tiff", f"{n} bytes, the first directory starts at byte {ifd}")
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    if ifd + 2 + 12 * count > n:
        raise _truncated("tiff", f"{n} bytes, the first directory ends at {ifd + 2 + 12 * count}")
    tags: dict[int, np.ndarray] = {}
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind, values = struct.unpack(order + "HHI", data[entry : entry + 8])
        if kind not in (3, 4) or values < 1:  # only SHORT and LONG tags matter here
            continue
        size = 2 if kind == 3 else 4
        # The values sit in the entry itself unless all of them take more than 4 bytes.
        where = (
            entry + 8
            if size * values <= 4
            else struct.unpack(order + "I", data[entry + 8 : entry + 12])[0]
        )
        if where + size * values > n:
            raise _truncated("tiff", f"{n} bytes, tag {tag} ends at {where + size * values}")
        dtype = np.dtype(order + ("u2" if kind == 3 else "u4"))
        tags[tag] = np.frombuffer(data, dtype, values, where).astype(np.int64)

    def first(tag: int, default: int) -> int:
        return int(tags[tag][0]) if tag in tags else default

    if 256 not in tags or 257 not in tags:
        raise ImageError("TIFF data is corrupt: the first page has no ImageWidth/ImageLength")
    width, height = first(256, 0), first(257, 0)
    samples, bits = first(277, 1), int(tags[258].max()) if 258 in tags else 1
    if bits > TIFF_MAX_BITS:
        kind = "float" if first(339, 1) == 3 else "integer"
        raise ImageError(
            f"TIFF image has {kind} samples of {bits} bits ({kind}{bits} samples), which are not "
            "accepted; send 8- or 16-bit integer images"
        )
    if samples > TIFF_MAX_SAMPLES:
        raise ImageError(
            f"TIFF image has {samples} samples per pixel; accepted: at most {TIFF_MAX_SAMPLES} "
            "(grey, grey+alpha, RGB, RGBA or CMYK)"
        )
    tiled = 322 in tags or 323 in tags
    if tiled:
        block = first(322, 0) * first(323, 0)
        offsets, counts = tags.get(324), tags.get(325)
    else:  # libtiff clamps RowsPerStrip to the image
        block = width * min(first(278, height), height)
        offsets, counts = tags.get(273), tags.get(279)
    if offsets is None or counts is None or len(offsets) != len(counts):
        raise ImageError("TIFF data is corrupt: the first page's strip or tile table is missing")
    ends = offsets + counts
    if len(ends) and int(ends.max()) > n:
        raise _truncated("tiff", f"{n} bytes, its image data runs to byte {int(ends.max())}")
    # libtiff's RGBA reader (used by OpenCV for 8-bit colour) premultiplies unassociated alpha,
    # and OpenCV drops the alpha of grey+alpha: such pages are read with Pillow instead.
    alpha = first(338, 0) in (1, 2) and bits == 8
    if samples == 2 and not alpha:
        raise ImageError(
            "TIFF grey+alpha with 16-bit or unmarked alpha samples is not supported; send it as "
            "PNG or as an 8-bit TIFF"
        )
    return _Header(
        "tiff",
        width,
        height,
        tiff_cmyk=first(262, 2) == 5,
        tiff_alpha=alpha,
        tiff_block_pixels=block,
        tiff_compressed=first(259, 1) != 1,
    )


_HEADER_READERS = {
    "png": _png_header,
    "jpeg": _jpeg_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
    "tiff": _tiff_header,
}


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{what} declares {width}x{height} pixels; both sides must be at least 1")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{what} {over_pixels(width, height, max_pixels)}; send a smaller image"
        )


def _check_bytes(size: int, max_bytes: int, what: str = "image data") -> None:
    if size > max_bytes:
        raise ImageTooLarge(f"{what} of {over_bytes(size, max_bytes)}; send a smaller file")


def read_header(data: bytes, max_pixels: int, max_bytes: int) -> _Header:
    """Identify ``data`` and check its declared size against the limits, decoding no pixels."""
    if not data:
        raise ImageError(f"image data is empty; send {_ACCEPTED}")
    _check_bytes(len(data), max_bytes)
    fmt = sniff_format(data)
    try:
        header = _HEADER_READERS[fmt](data)
    except struct.error as e:  # a field read past the end
        raise _truncated(fmt, f"header cut short: {e}") from e
    _check_pixels(header.width, header.height, max_pixels, f"{fmt.upper()} image")
    if header.tiff_block_pixels > max_pixels:
        raise ImageTooLarge(
            f"TIFF image is {header.width}x{header.height} but stored in tiles or strips of "
            f"{header.tiff_block_pixels} pixels each, over --max-pixels "
            f"{pixel_limit(max_pixels)} (the decoder allocates a whole tile); re-save it with "
            "smaller tiles or strips"
        )
    if len(data) < header.min_bytes:
        raise _truncated(fmt, f"{len(data)} bytes, the pixel rows end at byte {header.min_bytes}")
    return header


# --- decoding -----------------------------------------------------------------------------------


def _to_8bit(pixels: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 as is; uint16 rounded to 8 bits (x / 257); other sample types refused."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        # Rounds to nearest (x / 257 is never exactly k + 0.5) straight into uint8.
        return cv2.convertScaleAbs(pixels, alpha=1 / 257)
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
            f"send {_ACCEPTED}"
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
            f"send {_ACCEPTED}"
        ) from e


def _check_decoded_size(pixels: np.ndarray, header: _Header) -> None:
    height, width = pixels.shape[:2]
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


def _check_integrity(data: bytes, header: _Header) -> None:
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
    data: bytes, max_pixels: int, max_bytes: int, *, verified: bool = False
) -> DecodedImage:
    """Decode an encoded image file into RGB (+ alpha), refusing oversized ones before decoding.

    ``verified``: ``verify_image`` already passed on ``data``; its integrity decodes are not
    repeated.
    """
    header = read_header(data, max_pixels, max_bytes)
    fmt = header.format
    if not verified:
        _check_integrity(data, header)
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
    pixels = _to_8bit(_imdecode(data, flags, fmt), fmt)

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


def check_raw(
    size: int, height: int, width: int, channels: int, max_pixels: int, max_bytes: int
) -> None:
    """Raise unless ``size`` bytes of raw H x W x C uint8 pixels are a valid, allowed image."""
    shape = f"{height}x{width}x{channels}"
    if height < 1 or width < 1:
        raise ImageError(f"raw image shape {shape}: height and width must be at least 1")
    if channels not in RAW_CHANNELS:
        raise ImageError(f"raw image shape {shape}: channels must be 1 (grey), 3 (RGB) or 4 (RGBA)")
    _check_pixels(width, height, max_pixels, "raw image")
    _check_bytes(size, max_bytes, "raw image data")
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


def finish_output(sr_rgb: np.ndarray, decoded: DecodedImage, scale: int) -> np.ndarray:
    """Give the upscaled RGB the input's channel layout: grey -> 1 channel, RGBA -> alpha
    upscaled separately (bicubic, clipped) and re-attached. Returns sH x sW x C uint8."""
    height, width = decoded.rgb.shape[:2]
    expected = (scale * height, scale * width, 3)
    if sr_rgb.shape != expected or sr_rgb.dtype != np.uint8:
        raise ValueError(f"upscaled image is {sr_rgb.shape} {sr_rgb.dtype}; expected {expected}")
    if decoded.channels == 1:
        return cv2.cvtColor(sr_rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    if decoded.channels == 3:
        return sr_rgb
    if decoded.alpha is None:
        raise ValueError("a 4-channel image lost its alpha channel")
    # uint8 in, uint8 out: cv2.resize saturates the bicubic overshoot to 0..255.
    alpha = cv2.resize(
        decoded.alpha, (scale * width, scale * height), interpolation=cv2.INTER_CUBIC
    )
    return np.dstack([sr_rgb, alpha])


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


def encode_image(image: np.ndarray, fmt: str, quality: int, *, side_checked: bool = False) -> bytes:
    """Encode H x W x C uint8 (C = 1, 3 RGB or 4 RGBA; H x W is grey) as ``fmt``.

    ``side_checked``: the caller ran ``check_side`` on this size before computing the image
    (the server does, before any tile), so it is not checked twice.

    ``fmt`` is one of OUTPUT_FORMATS; ``quality`` (1..100) is used by jpeg and webp only.
    "raw" returns the row-major bytes of the array. JPEG cannot carry alpha and WebP has no grey
    mode (a grey image is written as RGB).
    """
    if fmt not in OUTPUT_FORMATS:
        raise ImageError(f"output format {fmt!r} is not supported; choose one of {OUTPUT_FORMATS}")
    if fmt in ("jpeg", "webp") and not 1 <= quality <= 100:
        raise ImageError(f"{fmt} quality {quality} is out of range; choose 1..100")
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ImageError(
            f"image to encode is {image.shape} {image.dtype}; expected H x W x C uint8"
        )
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in RAW_CHANNELS:
        raise ImageError(f"image to encode has {channels} channels; expected 1, 3 or 4")
    if fmt == "raw":
        return np.ascontiguousarray(image).tobytes()
    height, width = image.shape[:2]
    if fmt == "jpeg" and channels == 4:
        raise ImageError("JPEG cannot carry the alpha channel of an RGBA image; choose png or webp")
    if not side_checked:
        check_side(fmt, width, height)
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
    }[fmt]
    try:
        ok, buffer = cv2.imencode("." + fmt, bgr, params)
    except cv2.error as e:
        raise ImageError(f"{fmt} encoding of a {width}x{height} image failed: {e.err}") from e
    if not ok:
        raise ImageError(f"{fmt} encoding of a {width}x{height} image failed; try png or raw")
    return buffer.tobytes()
