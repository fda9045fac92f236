"""What an image file carries besides its pixels, read at decode and written into the answer:
the ICC profile, EXIF and XMP (Pillow reads and parses them; nothing is decoded here).

EXIF orientation is applied to the pixels when decoding (server/imaging/codec.py) and the tag
is reset to 1 in the answer, for every format, so no viewer turns the image twice; the
ExifImageWidth/Height tags, where present, state the answer's size. EXIF that Pillow cannot
parse is dropped with a note (the pixels are good; refusing the whole image for a damaged
camera tag would be harsher than the damage), and the image is used as stored.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # EXIF tag 274
EXIF_IFD = 0x8769  # the Exif sub-IFD (camera settings, ExifImageWidth/Height)
GPS_IFD = 0x8825
EXIF_WIDTH, EXIF_HEIGHT = 0xA002, 0xA003
# TIFF tags that describe a TIFF file's own layout: not EXIF to carry into another file.
TIFF_LAYOUT = frozenset(
    {254, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325}
    | {338, 339, 340, 341, 530, 531, 532, 700, 33723, 34377, 34675}
)
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation(?:="|>))[1-8]')
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}


@dataclass(frozen=True)
class FileMetadata:
    """What an input file carries besides its pixels, as the answer will carry it."""

    icc: bytes | None = None  # the embedded ICC profile, as sent
    exif: bytes | None = None  # EXIF (a TIFF structure), orientation not yet reset
    xmp: bytes | None = None  # the XMP packet
    orientation: int = 1  # the EXIF orientation of the stored pixels (1..8)
    notes: tuple[str, ...] = ()  # what could not be kept, said in the answer
    # the input's ICC profile description (also when it was converted away or not carried)
    profile_name: str = ""


NO_METADATA = FileMetadata()


def read_metadata(data: bytes, fmt: str) -> FileMetadata:
    """The profile, EXIF and XMP of ``data`` (a ``fmt`` file whose header passed the limits).

    Pillow reads them from the file's headers; a PNG's eXIf chunk after the image data is not
    read (encoders write it before). BMP carries none of them here."""
    name = _PIL_FORMATS.get(fmt)
    if name is None:
        return FileMetadata()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[name]) as image:
                icc = image.info.get("icc_profile") or None
                xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or None
                if fmt == "tiff":  # its own first-page tags hold the EXIF; tag 700 the XMP
                    xmp = image.tag_v2.get(700) or None  # type: ignore[attr-defined]
                    exif, orientation, notes = _parse_exif(None, image.getexif())
                else:
                    exif, orientation, notes = _parse_exif(image.info.get("exif"), None)
    except Exception as e:  # the pixel decoders decide whether the file is good
        log.debug("metadata of a %s file not read: %s", fmt, e)
        return FileMetadata()
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return FileMetadata(icc, exif, xmp, orientation, notes)


def _parse_exif(
    raw: bytes | None, tiff_tags: Image.Exif | None
) -> tuple[bytes | None, int, tuple[str, ...]]:
    """(EXIF to carry, orientation, notes) from a file's EXIF block or a TIFF's own tags (read
    while the file is open: their sub-IFDs are read from it)."""
    if not raw and not tiff_tags:
        return None, 1, ()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tiff_tags is not None:
                exif = _exif_of_tiff(tiff_tags)
            else:
                exif = Image.Exif()
                exif.load(raw)
            for ifd in (EXIF_IFD, GPS_IFD):
                if ifd in exif and not isinstance(exif[ifd], dict):
                    exif.get_ifd(ifd)  # parsed now: a broken sub-IFD is found here
            orientation = int(exif.get(ORIENTATION, 1))
            carried = exif.tobytes() if len(exif) else None
    except Exception as e:  # Pillow raises SyntaxError, struct.error, ValueError ...
        note = f"EXIF dropped: it could not be parsed ({type(e).__name__}: {e})"
        log.info("%s", note)
        return None, 1, (note,)
    if orientation not in range(1, 9):
        note = f"EXIF orientation {orientation} is not 1..8; the pixels are used as stored"
        return carried, 1, (note,)
    return carried, orientation, ()


def _exif_of_tiff(tags: Image.Exif) -> Image.Exif:
    """A TIFF's first-page tags minus its layout (strips, samples, compression ...)."""
    exif = Image.Exif()
    for tag, value in tags.items():
        if tag in (EXIF_IFD, GPS_IFD):
            exif[tag] = tags.get_ifd(tag)
        elif tag not in TIFF_LAYOUT:
            exif[tag] = value
    return exif


def answer_exif(exif: bytes, width: int, height: int) -> bytes:
    """``exif`` for the answer: orientation 1 (the pixels are upright), ExifImageWidth and
    ExifImageHeight (where present) set to ``width`` x ``height``. Returns the TIFF structure
    with the "Exif\\0\\0" prefix, as Pillow writes it."""
    out = Image.Exif()
    out.load(exif)
    if ORIENTATION in out:
        out[ORIENTATION] = 1
    if EXIF_IFD in out:
        ifd = out.get_ifd(EXIF_IFD)
        if EXIF_WIDTH in ifd:
            ifd[EXIF_WIDTH] = width
        if EXIF_HEIGHT in ifd:
            ifd[EXIF_HEIGHT] = height
    return out.tobytes()


def answer_xmp(xmp: bytes) -> bytes:
    """``xmp`` with its tiff:Orientation (if any) set to 1, as the EXIF tag."""
    return _XMP_ORIENTATION.sub(rb"\g<1>1", xmp)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` (H x W or H x W x C) turned upright as EXIF ``orientation`` 1..8 says."""
    turned = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }[orientation](pixels)
    return np.ascontiguousarray(turned)


# --- writing ------------------------------------------------------------------------------------


def png_with_metadata(
    png: bytes, icc: bytes | None, exif: bytes | None, xmp: bytes | None
) -> bytes:
    """An encoded PNG with iCCP, eXIf and XMP iTXt chunks added after IHDR.

    Written here rather than by Pillow because Pillow has no 16-bit RGB(A) mode: the answer's
    pixels are encoded by OpenCV (8 or 16 bits) and these chunks, in the PNG specification's
    layout, are put in front of its image data."""
    chunks = []
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        chunks.append(_png_chunk(b"eXIf", exif.removeprefix(b"Exif\x00\x00")))
    if xmp:
        # keyword, null, compression flag 0, method 0, empty language tag and translated keyword
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp))
    ihdr_end = 8 + 12 + 13  # signature, then IHDR: length, type, 13 bytes of data, CRC
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pillow_encode(
    image: np.ndarray,
    fmt: str,
    quality: int,
    icc: bytes | None,
    exif: bytes | None,
    xmp: bytes | None,
) -> bytes:
    """H x W (x C) uint8 as a JPEG or WebP holding the profile, EXIF and XMP (Pillow writes
    JPEG APP1/APP2 and WebP ICCP/EXIF/XMP chunks)."""
    pixels = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    options: dict[str, object] = {"quality": quality}
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    if xmp:
        options["xmp"] = xmp
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, _PIL_FORMATS[fmt], **options)
    return out.getvalue()
