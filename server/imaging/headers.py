"""Image file headers, read without decoding a pixel: the format (by its first bytes), the
size and layout each format declares, and the limits checked before any decoder allocates.

A small file that declares 100000x100000 pixels (a decompression bomb) costs nothing here:
``read_header`` refuses it from the header. What is accepted and why is told in
``server/imaging/codec.py``, which decodes what passed these checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from server.imaging import isobmff
from server.imaging.limit_text import over_bytes, over_pixels, pixel_limit

# Still formats OpenCV decodes; HEIC and AVIF: server/imaging/modern.py; GIF, APNG and
# animated WebP: server/imaging/animation.py.
INPUT_FORMATS = ("png", "jpeg", "webp", "bmp", "tiff")
PNG_MAX_CHUNKS = 2**16  # a walk of ~50 ms; real files have a few hundred at most
JPEG_MAX_SCANS = 256  # nvImageCodec's default limit against the many-scans DoS (cure53 report)
TIFF_MAX_SAMPLES = 4  # samples per pixel: grey, grey+alpha, RGB, RGBA or CMYK
TIFF_MAX_BITS = 16  # bits per sample (float and 32-bit samples are refused after decoding)
DECODE_BYTES_PER_PIXEL = 24  # peak decode memory per pixel of the limit, any accepted format

ACCEPTED_TEXT = "a PNG, JPEG, WebP, BMP, TIFF, GIF, HEIC or AVIF file"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (C4 = DHT, C8 = JPG, CC = DAC are not frames).
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_KNOWN_OTHERS = {b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"%PDF": "PDF"}


class ImageError(ValueError):
    """The image bytes or parameters are invalid; the message says what is accepted."""


class NotAnImage(ImageError):
    """The bytes are no image format this server reads (its first bytes name none)."""


class ImageTooLarge(ImageError):
    """The image is over the pixel or byte limit."""


@dataclass(frozen=True)
class Header:
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
    if data.startswith(b"GIF8"):
        return "gif"  # an animation (server/imaging/animation.py), even of one frame
    heif = isobmff.brand_format(data)
    if heif is not None:
        return heif
    if data[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageError(f"BigTIFF files are not accepted; send {ACCEPTED_TEXT} (classic TIFF)")
    known = _KNOWN_OTHERS.get(bytes(data[:4]))
    if known:
        raise NotAnImage(
            f"image data is a {known} file, which is not accepted; send {ACCEPTED_TEXT} "
            f"(first bytes {_first_bytes(data)})"
        )
    raise NotAnImage(f"image data is not {ACCEPTED_TEXT} (first bytes {_first_bytes(data)})")


def _png_header(data: bytes) -> Header:
    if len(data) < 33:
        raise _truncated("png", f"{len(data)} bytes, the header alone takes 33")
    if data[12:16] != b"IHDR":
        raise ImageError("PNG data is corrupt: the first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    _check_png_chunks(data)
    return Header("png", width, height)


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


def _jpeg_header(data: bytes) -> Header:
    """Walk the JPEG markers up to the first scan; the frame header (SOFn) holds the size."""
    n, i = len(data), 2
    frame: Header | None = None
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
            frame = Header("jpeg", width, height, jpeg_components=data[i + 7])
            if height == 0:
                raise ImageError(
                    "JPEG frame header declares height 0 (set later by a DNL marker), which is "
                    "not supported; re-save the JPEG"
                )
        i += length


def _webp_header(data: bytes) -> Header:
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
            raise ImageError(
                f"animated WebP is not accepted; send a single image ({ACCEPTED_TEXT})"
            )
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        raise ImageError(f"WebP data is corrupt: unknown first chunk {chunk!r}")
    return Header("webp", width, height)


def _bmp_header(data: bytes) -> Header:
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
    return Header("bmp", width, height, min_bytes=end)


def _tiff_header(data: bytes) -> Header:
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
    return Header(
        "tiff",
        width,
        height,
        tiff_cmyk=first(262, 2) == 5,
        tiff_alpha=alpha,
        tiff_block_pixels=block,
        tiff_compressed=first(259, 1) != 1,
    )


def _isobmff_header(data: bytes) -> Header:
    """HEIC or AVIF: the size its 'ispe' property declares (a bounded walk of the boxes)."""
    fmt = isobmff.brand_format(data) or "heic"
    try:
        width, height = isobmff.image_size(data)
    except isobmff.BoxError as e:
        raise ImageError(f"{fmt.upper()} data is corrupt: {e}; send the complete file") from e
    return Header(fmt, width, height)


def _gif_header(data: bytes) -> Header:
    raise ImageError(
        "GIF files are read as animations (server/imaging/animation.py), not as still images"
    )


_HEADER_READERS = {
    "gif": _gif_header,
    "heic": _isobmff_header,
    "avif": _isobmff_header,
    "png": _png_header,
    "jpeg": _jpeg_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
    "tiff": _tiff_header,
}


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{what} declares {width}x{height} pixels; both sides must be at least 1")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{what} {over_pixels(width, height, max_pixels)}; send a smaller image"
        )


def check_bytes(size: int, max_bytes: int, what: str = "image data") -> None:
    if size > max_bytes:
        raise ImageTooLarge(f"{what} of {over_bytes(size, max_bytes)}; send a smaller file")


def read_header(data: bytes, max_pixels: int, max_bytes: int) -> Header:
    """Identify ``data`` and check its declared size against the limits, decoding no pixels."""
    if not data:
        raise ImageError(f"image data is empty; send {ACCEPTED_TEXT}")
    check_bytes(len(data), max_bytes)
    fmt = sniff_format(data)
    try:
        header = _HEADER_READERS[fmt](data)
    except struct.error as e:  # a field read past the end
        raise _truncated(fmt, f"header cut short: {e}") from e
    check_pixels(header.width, header.height, max_pixels, f"{fmt.upper()} image")
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
