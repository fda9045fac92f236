"""TIFF answers: OpenCV writes the pixels (8 bits LZW, 16 bits Deflate), this module adds
what OpenCV cannot write: the ICC profile (tag 34675), XMP (tag 700), EXIF (its first-IFD tags
and the Exif and GPS sub-IFDs, as a TIFF stores them) and, for RGBA, the ExtraSamples tag that
marks the fourth sample as unassociated alpha (OpenCV leaves it out, so readers would take the
alpha for an unknown extra channel).

Pillow cannot hold 16-bit RGB pixels, so it cannot write the whole file; it serialises the
added tags instead (its IFD writer knows every EXIF type and lays out sub-IFDs). The finished
file is OpenCV's, followed by Pillow's serialised tags and one new first directory holding
OpenCV's layout entries (strips, samples, compression) and the added entries, sorted by tag
as TIFF requires; the header points at the new directory. OpenCV's own directory stays in
the file, unreferenced (a few hundred bytes).
"""

from __future__ import annotations

import struct
import warnings

from PIL import Image, TiffImagePlugin

from server.imaging.metadata import EXIF_IFD, GPS_IFD, TIFF_LAYOUT

ICC_TAG = 34675  # InterColorProfile
XMP_TAG = 700  # XMLPacket
EXTRA_SAMPLES = 338
UNASSOCIATED_ALPHA = 2  # ExtraSamples value: straight (not premultiplied) alpha
ENTRY_BYTES = 12  # one IFD entry: tag, type, count, value or offset


def finish_tiff(
    tiff: bytes, channels: int, icc: bytes | None, exif: bytes | None, xmp: bytes | None
) -> bytes:
    """OpenCV's single-page ``tiff`` of ``channels`` (1, 3 or 4) samples per pixel with the
    profile, EXIF (a TIFF structure, "Exif\\0\\0" prefix allowed: its layout tags are left
    out) and XMP added, and RGBA's alpha marked as such. Unchanged when nothing is to add."""
    extra = _added_tags(tiff[:4], channels, icc, exif, xmp)
    if not extra:
        return tiff
    order = "<" if tiff[:2] == b"II" else ">"
    (first,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[first : first + 2])
    entries = _entries(tiff, first + 2, count, order)

    added_at = _even(len(tiff))
    added = extra.tobytes(added_at)  # its offsets count from the start of the file
    (added_count,) = struct.unpack(order + "H", added[:2])
    for tag, entry in _entries(added, 2, added_count, order).items():
        entries.setdefault(tag, entry)  # OpenCV's layout entries win

    table_at = _even(added_at + len(added))
    table = struct.pack(order + "H", len(entries))
    table += b"".join(entries[tag] for tag in sorted(entries)) + struct.pack(order + "I", 0)
    out = bytearray(tiff)
    out += bytes(added_at - len(tiff)) + added
    out += bytes(table_at - len(out)) + table
    out[4:8] = struct.pack(order + "I", table_at)
    return bytes(out)


def _added_tags(
    head: bytes, channels: int, icc: bytes | None, exif: bytes | None, xmp: bytes | None
) -> TiffImagePlugin.ImageFileDirectory_v2:
    """The tags to add, in a Pillow directory of the file's byte order."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=head + b"\x08\x00\x00\x00")
    if exif:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tags = Image.Exif()
            tags.load(exif)  # parsed once already, at decode (server/imaging/metadata.py)
            for tag, value in tags.items():
                if tag in (EXIF_IFD, GPS_IFD):
                    ifd[tag] = dict(tags.get_ifd(tag))
                elif tag not in TIFF_LAYOUT:
                    ifd[tag] = value
    if icc:
        ifd[ICC_TAG] = icc
    if xmp:
        ifd[XMP_TAG] = xmp
    if channels == 4:
        ifd[EXTRA_SAMPLES] = (UNASSOCIATED_ALPHA,)
    return ifd


def _entries(data: bytes, start: int, count: int, order: str) -> dict[int, bytes]:
    """The raw 12-byte entries of the directory whose entries begin at ``start``, by tag."""
    entries = {}
    for k in range(count):
        raw = data[start + ENTRY_BYTES * k : start + ENTRY_BYTES * (k + 1)]
        (tag,) = struct.unpack(order + "H", raw[:2])
        entries[tag] = raw
    return entries


def _even(offset: int) -> int:
    """TIFF offsets are word aligned (even)."""
    return offset + (offset & 1)
