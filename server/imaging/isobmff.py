"""HEIC and AVIF headers (ISO base media file format, HEIF), read without decoding a pixel.

A HEIF file is a list of boxes; the image size sits in the 'ispe' (image spatial extents)
property inside meta/iprp/ipco. Reading it first lets a tiny file that declares a huge image be
refused before libheif or libavif allocates anything, as the other formats' headers are
(server/imaging/headers.py). The walk is bounded: at most ``MAX_BOXES`` boxes are looked at,
every box must fit inside its parent, and a 64-bit size or a box that runs past the data is an
error, never a seek.

Pure functions on bytes; errors are ``BoxError`` (a ``ValueError``) and the caller turns them
into its own error type.
"""

from __future__ import annotations

import struct

MAX_BOXES = 4096  # boxes walked in all; real HEIC/AVIF files have a few dozen
# Brands (ftyp major or compatible) that say which decoder a file needs.
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_CONTAINERS = (b"meta", b"iprp", b"ipco")  # the path from the top level down to 'ispe'


class BoxError(ValueError):
    """The ISOBMFF box structure is corrupt, truncated or not a still HEIF image."""


def brand_format(data: bytes) -> str | None:
    """ "avif" or "heic" when ``data`` starts with an ftyp box naming such a brand, else None.

    AVIF is checked first: an AVIF file also names the generic HEIF brand mif1."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    (size,) = struct.unpack(">I", data[:4])
    end = min(max(size, 16), len(data), 4096)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & AVIF_BRANDS:
        return "avif"
    if brands & HEIC_BRANDS:
        return "heic"
    return None


def _boxes(data: bytes, start: int, end: int, budget: list[int]) -> list[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in ``data[start:end]``, checking each fits."""
    found = []
    i = start
    while i < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise BoxError(f"more than {MAX_BOXES} boxes; re-save the image")
        if i + 8 > end:
            raise BoxError(f"truncated: a box header at byte {i} runs past byte {end}")
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        header = 8
        if size == 1:  # 64-bit size: only plausible for media data, never for the meta boxes
            if i + 16 > end:
                raise BoxError(f"truncated: a 64-bit box size at byte {i} runs past byte {end}")
            (size,) = struct.unpack(">Q", data[i + 8 : i + 16])
            header = 16
        elif size == 0:  # the box runs to the end of its parent
            size = end - i
        if size < header or i + size > end:
            name = kind.decode("latin-1")
            raise BoxError(
                f"box {name!r} at byte {i} declares {size} bytes, only {end - i} remain "
                "(truncated or corrupt)"
            )
        found.append((kind, i + header, i + size))
        i += size
    return found


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the largest 'ispe' property of a HEIF file: the primary image or its
    grid, which is what the decoder allocates; BoxError when there is none."""
    budget = [MAX_BOXES]
    level = _boxes(data, 0, len(data), budget)
    for container in _CONTAINERS:
        box = next((b for b in level if b[0] == container), None)
        if box is None:
            raise BoxError(f"no {container.decode()!r} box: not a HEIF still image")
        _, start, end = box
        if container == b"meta":
            start += 4  # a full box: version and flags come first
        level = _boxes(data, start, end, budget)
    sizes = []
    for kind, start, end in level:
        if kind == b"ispe":
            if end - start < 12:
                raise BoxError(f"'ispe' property of {end - start} bytes; it needs 12")
            sizes.append(struct.unpack(">II", data[start + 4 : start + 12]))
    if not sizes:
        raise BoxError("no 'ispe' (image size) property: not a HEIF still image")
    return max(sizes, key=lambda wh: wh[0] * wh[1])
