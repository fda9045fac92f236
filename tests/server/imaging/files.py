"""Image files the colour/metadata/depth tests make: Pillow (tifffile for 16-bit TIFF) writes
the profile, EXIF and XMP as any camera or editor would; a non-sRGB profile is made from
lcms's sRGB by swapping its red and green colorants (a valid profile whose conversion visibly
moves the colours)."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import tifffile  # comes with scikit-image; a TIFF writer independent of the server's
from PIL import Image, ImageCms

MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="6" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>rdn test'
    b"</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>"
)
BAD_ICC = b"this is not an ICC profile at all" * 8
BAD_EXIF = b"Exif\x00\x00XXXX this is no TIFF structure" + bytes(64)


def swapped_profile() -> bytes:
    """lcms's sRGB profile with the rXYZ and gXYZ tags swapped: red pixels mean green."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    entries = {bytes(data[132 + 12 * k : 136 + 12 * k]): 132 + 12 * k for k in range(count)}
    red, green = entries[b"rXYZ"], entries[b"gXYZ"]
    data[red + 4 : red + 12], data[green + 4 : green + 12] = (
        data[green + 4 : green + 12],
        data[red + 4 : red + 12],
    )
    data[84:100] = bytes(16)  # no profile ID (the MD5 no longer matches)
    return bytes(data)


def exif_with(orientation: int = 1, make: str = "RDN Camera") -> bytes:
    exif = Image.Exif()
    exif[MAKE] = make
    exif[MODEL] = "Test 1"
    exif[ORIENTATION] = orientation
    exif[0x8825] = {2: (52.0, 31.0, 0.0)}  # GPS latitude: what strip_metadata is for
    return exif.tobytes()


def make_file(
    pixels: np.ndarray,
    fmt: str,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """``pixels`` (H x W x 3/4 uint8) as a ``fmt`` file with the given profile and metadata."""
    options: dict[str, object] = {}
    if icc is not None:
        options["icc_profile"] = icc
    if exif is not None:
        options["exif"] = exif
    if fmt == "JPEG":
        options["quality"] = 95
    if fmt == "WEBP":
        options["lossless"] = True
    if xmp is not None:
        if fmt == "PNG":
            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp.decode())
            options["pnginfo"] = info
        elif fmt == "TIFF":  # Pillow's TIFF writer takes XMP as tag 700
            tags = Image.Exif()
            if exif is not None:
                tags.load(exif)
            tags[700] = xmp
            options["exif"] = tags
        else:
            options["xmp"] = xmp
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def png16(rgb16: np.ndarray) -> bytes:
    """H x W x 3 uint16 RGB as a 16-bit PNG (OpenCV: Pillow has no 16-bit RGB mode)."""
    return cv2.imencode(".png", np.ascontiguousarray(rgb16[:, :, ::-1]))[1].tobytes()


def tiff_file(
    pixels: np.ndarray, icc: bytes | None = None, orientation: int = 1, xmp: bytes | None = None
) -> bytes:
    """``pixels`` (H x W x 3/4, uint8 or uint16) as an uncompressed TIFF with the profile,
    EXIF Make and Orientation, and XMP as a camera raw converter writes them."""
    tags = [(MAKE, "s", 0, "RDN Camera", True), (ORIENTATION, "H", 1, orientation, True)]
    if xmp is not None:
        tags.append((700, "B", len(xmp), xmp, True))
    out = io.BytesIO()
    extra = ("unassalpha",) if pixels.shape[2] == 4 else None
    tifffile.imwrite(
        out, pixels, photometric="rgb", iccprofile=icc, extratags=tags, extrasamples=extra
    )
    return out.getvalue()


def read_back(data: bytes) -> tuple[np.ndarray, dict[str, object], Image.Exif]:
    """An answer's pixels (RGB order, as stored), its Pillow info and EXIF."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(
            pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
        )
    with Image.open(io.BytesIO(data)) as image:
        info = dict(image.info)
        exif = image.getexif()
    return pixels, info, exif


def xmp_of(info: dict[str, object]) -> bytes:
    value = info.get("xmp") or info.get("XML:com.adobe.xmp") or b""
    return value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
