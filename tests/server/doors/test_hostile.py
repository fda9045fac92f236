"""Hostile input against a real server: every kind of bad request gets its documented status
code and a message naming the problem, the server keeps serving, and 2000 hostile requests leave
the memory of a real ``rdn-serve`` process flat.

Every input is generated here (nothing stored as binaries). The server runs with small limits
(512x512 pixels, 1 MiB requests, 2 MiB messages, 512 queued tiles) so "just over" cases are cheap.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from PIL import Image

from server.config import BatcherConfig, EngineConfig, LimitsConfig, ServerConfig, TilingConfig
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer

MAX_PIXELS = 512 * 512
MAX_REQUEST_BYTES = 2**20
MAX_MESSAGE_BYTES = 2 * 2**20
MAX_QUEUE_TILES = 512
TILE, PAD = 32, 4
CALL_TIMEOUT = 30.0  # seconds: a broken server fails the test instead of hanging it
HOSTILE_REQUESTS = int(os.environ.get("RDN_HOSTILE_REQUESTS", "2000"))  # memory check volume
RSS_GROWTH_LIMIT = 50 * 2**20  # bytes
UPSCALE = "/rdn.v1.Upscaler/Upscale"
UPSCALE_STREAM = "/rdn.v1.Upscaler/UpscaleStream"

OK = "OK"
INVALID = "INVALID_ARGUMENT"
EXHAUSTED = "RESOURCE_EXHAUSTED"


# ------------------------------------------------------------------------------- images


def pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise (compresses like a photo, not like random bytes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 7 + y * 3)[:, :, None] + np.arange(channels) * 50
    noise = rng.integers(0, 24, (height, width, channels))
    return ((base + noise) % 256).astype(np.uint8)


def cv_encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok, f"OpenCV cannot write {ext}"
    return buffer.tobytes()


def pil_encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(height: int = 20, width: int = 24, channels: int = 3) -> bytes:
    return cv_encode(pixels(height, width, channels), ".png")


def jpeg(height: int = 20, width: int = 24) -> bytes:
    return cv_encode(pixels(height, width), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90)


def webp(height: int = 20, width: int = 24) -> bytes:
    return cv_encode(pixels(height, width), ".webp", cv2.IMWRITE_WEBP_QUALITY, 90)


def bmp(height: int = 20, width: int = 24) -> bytes:
    return cv_encode(pixels(height, width), ".bmp")


def tiff(height: int = 20, width: int = 24) -> bytes:
    return cv_encode(pixels(height, width), ".tiff")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` RGB 8-bit, with the given IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    """100000 x 100000 declared, a few kB of zeros compressed: a decompression bomb."""
    return png_declaring(100_000, 100_000, zlib.compress(bytes(400_000), 9))


def jpeg_declaring(width: int, height: int) -> bytes:
    data = jpeg()
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def png_bad_crc() -> bytes:
    """A valid PNG whose IDAT checksum is wrong (libpng refuses critical chunks with a bad CRC)."""
    data = bytearray(png())
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    data[idat + 4 + length] ^= 0xFF  # first byte of the CRC
    return bytes(data)


def png_chunk_length(length: int) -> bytes:
    """A valid PNG whose IDAT length field says ``length`` (OpenCV would allocate that much)."""
    data = png()
    idat = data.index(b"IDAT") - 4
    return data[:idat] + struct.pack(">I", length) + data[idat + 4 :]


def png_many_chunks(count: int) -> bytes:
    data = png()
    idat = data.index(b"IDAT") - 4
    return data[:idat] + png_chunk(b"IDAT", b"") * count + data[idat:]


def png_text_bomb() -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to 64 MiB (decoders skip text)."""
    data = png()
    idat = data.index(b"IDAT") - 4
    bomb = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(64 * 2**20), 9))
    return data[:idat] + bomb + data[idat:]


def jpeg_many_scans(extra: int) -> bytes:
    """A progressive JPEG followed by ``extra`` empty AC scans (each a pass over the image)."""
    data = pil_encode(Image.fromarray(pixels(64, 64)), "JPEG", progressive=True, quality=80)
    empty = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00"  # component 1, AC 1..63
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + empty * extra + data[eoi:]


def png_ihdr_not_first() -> bytes:
    data = png()
    return data[:8] + png_chunk(b"tEXt", b"k\0v") + data[8:]


def bmp_top_down() -> bytes:
    """A valid top-down BMP: negative height, rows stored first to last."""
    image = pixels(20, 24)
    data = bytearray(cv_encode(image, ".bmp"))
    (offset,) = struct.unpack("<I", data[10:14])
    stride = (24 * 3 + 3) // 4 * 4
    rows = [data[offset + r * stride : offset + (r + 1) * stride] for r in range(20)]
    data[offset : offset + 20 * stride] = b"".join(reversed(rows))  # bottom-up -> top-down
    data[22:26] = struct.pack("<i", -20)
    return bytes(data)


def bmp_with(width: int, height: int) -> bytes:
    data = bmp()
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def tiff_huge_strip_count() -> bytes:
    """A hand-made 16x16 RGB TIFF whose StripOffsets/StripByteCounts claim 2**30 strips."""
    width = height = 16
    body = pixels(height, width).tobytes()
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 2**30, 8),  # StripOffsets: 2**30 LONGs "at" offset 8
        (277, 3, 1, 3),
        (278, 4, 1, 1),  # RowsPerStrip 1 would need 16 strips, not 2**30
        (279, 4, 2**30, 8),  # StripByteCounts
    ]
    ifd_offset = 8 + len(body)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", ifd_offset) + body + ifd + b"\0\0\0\0"


def tiff_rational_offsets() -> bytes:
    """Pillow (which reads 8-bit TIFF with alpha) raised TypeError on this: a fuzzer find."""
    data = bytearray(pil_encode(Image.fromarray(pixels(20, 24, 2), "LA"), "TIFF"))
    (ifd,) = struct.unpack("<I", data[4:8])
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2 : entry + 4] = struct.pack("<H", 5)  # type RATIONAL
    return bytes(data)


def tiff_tile_bomb() -> bytes:
    """A 16x16 RGB TIFF stored as one 16384x16368 tile: libtiff sizes its buffer from the tile
    (about 1 GiB decoded), not from the image (the review's case)."""
    width = height = 16
    body = zlib.compress(bytes(16))  # a token of tile data: the buffer comes first
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 8),  # Deflate
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (322, 4, 1, 16384),  # TileWidth
        (323, 4, 1, 16368),  # TileLength
        (324, 4, 1, 8),  # TileOffsets
        (325, 4, 1, len(body)),  # TileByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8 + len(body)) + body + ifd + b"\0\0\0\0"


def jpeg_cut_scan() -> bytes:
    """A baseline JPEG whose entropy-coded scan is cut after a few bytes, with the end-of-image
    marker appended: libjpeg only warns and fills the rest grey."""
    data = cv_encode(pixels(256, 256), ".jpg")
    scan = data.index(b"\xff\xda")
    return data[: scan + 64] + b"\xff\xd9"


def big_tiff() -> bytes:
    return b"II+\x00\x08\x00\x00\x00" + bytes(32)


def webp_riff_size(delta: int) -> bytes:
    data = webp()
    (size,) = struct.unpack("<I", data[4:8])
    return data[:4] + struct.pack("<I", size + delta) + data[8:]


def sixteen_bit_png() -> bytes:
    return cv_encode(pixels(20, 24).astype(np.uint16) * 257, ".png")


def cmyk_jpeg() -> bytes:
    return pil_encode(Image.fromarray(pixels(20, 24)).convert("CMYK"), "JPEG", quality=90)


def palette_png() -> bytes:
    return pil_encode(Image.fromarray(pixels(20, 24)).convert("P"), "PNG")


def grey_alpha_png() -> bytes:
    return pil_encode(Image.fromarray(pixels(20, 24, 2), "LA"), "PNG")


def animated_gif() -> bytes:
    frames = [Image.fromarray(pixels(20, 24, seed=s)).convert("P") for s in range(3)]
    return pil_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)


def multi_page_tiff() -> bytes:
    pages = [Image.fromarray(pixels(20, 24, seed=s)) for s in range(3)]
    return pil_encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def float_tiff() -> bytes:
    return pil_encode(Image.fromarray(pixels(20, 24, 1)[:, :, 0].astype(np.float32)), "TIFF")


def animated_webp() -> bytes:
    frames = [Image.fromarray(pixels(20, 24, seed=s)) for s in range(2)]
    return pil_encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=40)


def jpeg_dnl_height() -> bytes:
    return jpeg_declaring(24, 0)


def random_bytes(n: int = 4096) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()


def over_request_bytes() -> bytes:
    """A valid 20x24 PNG padded by an ancillary chunk to just over the request byte limit."""
    data = png()
    pad = MAX_REQUEST_BYTES + 1 - len(data) - 12
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + png_chunk(b"rdNx", bytes(pad)) + data[iend:]


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Call:
    """One hostile call: a unary request, a list of stream messages, or raw wire bytes."""

    unary: upscale_pb2.UpscaleRequest | None = None
    stream: tuple[upscale_pb2.UpscaleChunk, ...] | None = None
    wire: bytes | None = None  # serialized by hand: what a protobuf library would not produce
    wire_stream: tuple[bytes, ...] | None = None


def encoded(data: bytes, **fields: object) -> Call:
    return Call(unary=upscale_pb2.UpscaleRequest(encoded=data, **fields))


def raw(height: int, width: int, channels: int, data: bytes) -> Call:
    shape = upscale_pb2.ImageShape(height=height, width=width, channels=channels)
    return Call(unary=upscale_pb2.UpscaleRequest(raw=upscale_pb2.RawImage(shape=shape, data=data)))


def header(total: int, **fields: object) -> upscale_pb2.UpscaleChunk:
    return upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(total_bytes=total, **fields)
    )


def chunk(offset: int, data: bytes) -> upscale_pb2.UpscaleChunk:
    return upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=data))


def stream(*messages: upscale_pb2.UpscaleChunk) -> Call:
    return Call(stream=tuple(messages))


def streamed(data: bytes, piece: int = 100) -> list[upscale_pb2.UpscaleChunk]:
    return [chunk(i, data[i : i + piece]) for i in range(0, len(data), piece)]


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: key varint then a length-delimited payload (wire type 2 only here)."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    assert wire_type == 2
    return varint(number << 3 | wire_type) + varint(len(payload)) + payload


@dataclass(frozen=True)
class Case:
    kind: str
    build: Callable[[], Call]
    code: str  # status code name, or OK
    fragment: str  # in the error message; for OK: "WxHxC" of the answer


def truncations(name: str, make: Callable[[], bytes], cuts: Sequence[float]) -> list[Case]:
    """``make()`` cut at fractions of its length (values >= 1 are absolute byte counts)."""
    cases = []
    for cut in cuts:

        def build(cut: float = cut) -> Call:
            data = make()
            return encoded(data[: int(cut if cut >= 1 else len(data) * cut)])

        label = f"{cut:g}B" if cut >= 1 else f"{int(cut * 100)}%"
        cases.append(Case(f"{name} truncated at {label}", build, INVALID, "truncated"))
    return cases


CORPUS: list[Case] = [
    Case("empty bytes", lambda: encoded(b""), INVALID, "image data is empty"),
    Case("no image set", lambda: Call(unary=upscale_pb2.UpscaleRequest()), INVALID, "no image"),
    Case("random bytes", lambda: encoded(random_bytes()), INVALID, "is not a PNG, JPEG"),
    Case("ICO file", lambda: encoded(b"\0\0\1\0" + bytes(40)), INVALID, "ICO file"),
    Case("PDF file", lambda: encoded(b"%PDF-1.7\n" + bytes(40)), INVALID, "PDF file"),
    *truncations("PNG", png, (8, 20, 40, 0.5, 0.9)),
    *truncations("JPEG", jpeg, (3, 20, 0.5, 0.9)),
    *truncations("WebP", webp, (12, 29, 0.5, 0.9)),
    *truncations("BMP", bmp, (20, 30, 0.5, 0.9)),
    *truncations("TIFF", tiff, (6, 0.5, 0.9)),
    Case("PNG declaring 100000x100000", lambda: encoded(png_bomb()), EXHAUSTED,
         "100000x100000 = 10000.0 MP is over --max-pixels 512x512 = 0.3 MP"),
    # A JPEG frame header holds 16-bit sides: 65535 x 65535 is the largest it can declare.
    Case("JPEG declaring 65535x65535", lambda: encoded(jpeg_declaring(65535, 65535)), EXHAUSTED,
         "65535x65535 = 4294.8 MP is over --max-pixels"),
    Case("BMP declaring 100000x100000", lambda: encoded(bmp_with(100_000, 100_000)), EXHAUSTED,
         "100000x100000 = 10000.0 MP"),
    Case("BMP height -2**31", lambda: encoded(bmp_with(24, -(2**31))), EXHAUSTED,
         "24x2147483648"),
    Case("PNG 0x0", lambda: encoded(png_declaring(0, 0)), INVALID,
         "declares 0x0 pixels; both sides must be at least 1"),
    Case("PNG 1x1", lambda: encoded(png(1, 1)), OK, "2x2x3"),
    Case("PNG 1x100000 strip", lambda: encoded(png(1, 100_000)), EXHAUSTED,
         "needs 3125 tiles of 32x32, more than the queue holds (512"),
    Case("PNG 1x2000 strip", lambda: encoded(png(1, 2000)), OK, "4000x2x3"),
    Case("PNG just over max pixels", lambda: encoded(png(513, 512)), EXHAUSTED,
         "512x513 = 262656 pixels is over --max-pixels 512x512 = 262144 pixels"),
    Case("PNG at max pixels", lambda: encoded(png(8, MAX_PIXELS // 8)), EXHAUSTED,
         "more than the queue holds"),
    Case("PNG 16-bit", lambda: encoded(sixteen_bit_png()), OK, "48x40x3"),
    Case("PNG palette", lambda: encoded(palette_png()), OK, "48x40x3"),
    Case("PNG RGBA", lambda: encoded(png(channels=4)), OK, "48x40x4"),
    Case("PNG grey", lambda: encoded(png(channels=1)), OK, "48x40x1"),
    Case("PNG grey+alpha", lambda: encoded(grey_alpha_png()), OK, "48x40x4"),
    Case("PNG bad IDAT CRC", lambda: encoded(png_bad_crc()), INVALID,
         "PNG data could not be decoded"),
    Case("PNG chunk length 4 GiB", lambda: encoded(png_chunk_length(2**32 - 1)), INVALID,
         "chunk 'IDAT' at byte 33 declares 4294967295 bytes"),
    Case("PNG with 70000 chunks", lambda: encoded(png_many_chunks(70_000)), INVALID,
         "more than 65536 chunks"),
    Case("PNG zTXt inflating to 64 MiB", lambda: encoded(png_text_bomb()), OK, "48x40x3"),
    Case("JPEG with 1000 empty scans", lambda: encoded(jpeg_many_scans(1000)), INVALID,
         "at most 256 are accepted"),
    Case("PNG IHDR not first", lambda: encoded(png_ihdr_not_first()), INVALID,
         "first chunk is not IHDR"),
    Case("JPEG CMYK", lambda: encoded(cmyk_jpeg()), OK, "48x40x3"),
    Case("JPEG only SOI+EOI", lambda: encoded(b"\xff\xd8\xff\xd9"), INVALID,
         "no frame header (SOF)"),
    Case("JPEG height 0 (DNL)", lambda: encoded(jpeg_dnl_height()), INVALID, "height 0"),
    Case("GIF animated (palette)", lambda: encoded(animated_gif()), OK, "48x40x3"),
    Case("WebP animated", lambda: encoded(animated_webp()), OK, "48x40x3"),
    Case("WebP RIFF size too large", lambda: encoded(webp_riff_size(+1000)), INVALID,
         "the RIFF header says"),
    Case("TIFF multi-page", lambda: encoded(multi_page_tiff()), OK, "48x40x3"),
    Case("TIFF float samples", lambda: encoded(float_tiff()), INVALID, "float32 samples"),
    Case("TIFF grey+alpha, StripOffsets typed RATIONAL", lambda: encoded(tiff_rational_offsets()),
         INVALID, "strip or tile table is missing"),
    Case("TIFF 2**30 strips", lambda: encoded(tiff_huge_strip_count()), INVALID,
         "TIFF data is truncated"),
    Case("TIFF 16x16 in one 16384x16368 tile", lambda: encoded(tiff_tile_bomb()), EXHAUSTED,
         "stored in tiles or strips of 268173312 pixels"),
    Case("JPEG whose scan is cut (EOI appended)", lambda: encoded(jpeg_cut_scan()), INVALID,
         "JPEG data is corrupt or truncated"),
    Case("BigTIFF", lambda: encoded(big_tiff()), INVALID, "BigTIFF files are not accepted"),
    Case("BMP top-down (negative height)", lambda: encoded(bmp_top_down()), OK, "48x40x3"),
    Case("BMP negative width", lambda: encoded(bmp_with(-24, 20)), INVALID, "negative width -24"),
    Case("encoded just over request bytes", lambda: encoded(over_request_bytes()), EXHAUSTED,
         f"bytes is over --max-request-bytes {MAX_REQUEST_BYTES} bytes"),
    Case("message just over message limit", lambda: encoded(bytes(MAX_MESSAGE_BYTES)), EXHAUSTED,
         f"vs. {MAX_MESSAGE_BYTES}"),
    Case("raw bytes do not match shape", lambda: raw(4, 4, 3, bytes(47)), INVALID,
         "47 bytes but shape 4x4x3 needs exactly 48 bytes"),
    Case("raw zero height", lambda: raw(0, 4, 3, b""), INVALID,
         "height and width must be at least 1"),
    Case("raw 5 channels", lambda: raw(4, 4, 5, bytes(80)), INVALID,
         "channels must be 1 (grey), 3 (RGB) or 4 (RGBA)"),
    Case("raw 2**16 x 2**16 (32-bit overflow)", lambda: raw(2**16, 2**16, 3, bytes(12)), EXHAUSTED,
         "65536x65536 = 4295.0 MP"),
    Case("raw 2**32-1 x 2**32-1", lambda: raw(2**32 - 1, 2**32 - 1, 4, b""), EXHAUSTED,
         "is over --max-pixels 512x512 = 0.3 MP"),
    Case("raw 3x100001", lambda: raw(3, 100_001, 1, bytes(300_003)), EXHAUSTED,
         "100001x3 = 300003 pixels is over --max-pixels 512x512 = 262144 pixels"),
    Case("raw 3x1001 grey", lambda: raw(3, 1001, 1, bytes(3003)), OK, "2002x6x1"),
    Case("raw 1x1 RGBA", lambda: raw(1, 1, 4, bytes(4)), OK, "2x2x4"),
    Case("unknown output format", lambda: encoded(png(), output_format=9), INVALID,
         "output_format 9 is not a known OutputFormat"),
    Case("JPEG quality 101", lambda: encoded(png(), output_format=2, quality=101), INVALID,
         "quality 101 is out of range; use 1..100"),
    Case("JPEG quality 2**32-1", lambda: encoded(png(), output_format=2, quality=2**32 - 1),
         INVALID, "quality 4294967295 is out of range"),
    Case("JPEG output of an RGBA image", lambda: encoded(png(channels=4), output_format=2),
         INVALID, "JPEG cannot carry the alpha channel"),
    Case("request id of 1 MiB", lambda: encoded(png(), request_id="r" * 2**20), INVALID,
         f"request_id is {2**20} characters; at most 128 allowed"),
    Case("request id of invalid UTF-8",
         lambda: Call(wire=field(1, 2, png()) + field(5, 2, b"\xff\xfe")), INVALID,
         "cannot be parsed (String field had bad UTF-8)"),
    Case("not a protobuf message", lambda: Call(wire=b"\xff\xff\xff\xff\x0f"), INVALID,
         "cannot be parsed (Wire format was corrupt)"),
    Case("stream: a message that is not protobuf", lambda: Call(wire_stream=(
        header(10).SerializeToString(), b"\x0a\xff\xff\xff\xff\x0f")), INVALID,
         "cannot be parsed (Wire format was corrupt)"),
    Case("stream: no messages", lambda: stream(), INVALID, "ended before its header"),
    Case("stream: missing header", lambda: stream(*streamed(png())), INVALID,
         "began with a data chunk"),
    Case("stream: chunks out of order",
         lambda: stream(header(len(png())), *reversed(streamed(png()))), INVALID,
         "is out of order"),
    Case("stream: stops half-way",
         lambda: stream(header(len(png())), *streamed(png())[:3]), INVALID,
         f"ended after 300 of header.total_bytes={len(png())}"),
    Case("stream: second header", lambda: stream(header(10), chunk(0, b"ab"), header(10)), INVALID,
         "second header"),
    Case("stream: more bytes than announced", lambda: stream(header(3), chunk(0, b"abcd")), INVALID,
         "more than header.total_bytes=3"),
    Case("stream: total_bytes 2**64-1", lambda: stream(header(2**64 - 1)), EXHAUSTED,
         "MiB is over --max-request-bytes"),
    Case("stream: raw shape 100000x100000", lambda: stream(
        header(30, raw_shape=upscale_pb2.ImageShape(height=100_000, width=100_000, channels=3))),
         EXHAUSTED, "100000x100000 = 10000.0 MP is over --max-pixels"),
    Case("stream: raw shape 1x1x3 announcing 300 bytes", lambda: stream(
        header(300, raw_shape=upscale_pb2.ImageShape(height=1, width=1, channels=3))),
         INVALID, "needs exactly 3 bytes"),
    Case("stream: a result message from the client", lambda: stream(
        header(10), upscale_pb2.UpscaleChunk(result=upscale_pb2.UpscaleResponse())), INVALID,
         "unexpected result message"),
    Case("stream: request id of 1 MiB", lambda: stream(header(10, request_id="r" * 2**20)), INVALID,
         "at most 128 allowed"),
    Case("stream: a valid PNG", lambda: stream(header(len(png())), *streamed(png())), OK,
         "48x40x3"),
]  # fmt: skip


# ------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class Outcome:
    code: str
    message: str  # error details, or "WxHxC" of the answer


def send(channel: grpc.Channel, call: Call, timeout: float = CALL_TIMEOUT) -> Outcome:
    stub = upscale_pb2_grpc.UpscalerStub(channel)
    try:
        if call.unary is not None:
            r = stub.Upscale(call.unary, timeout=timeout)
        elif call.stream is not None:
            answers = list(stub.UpscaleStream(iter(call.stream), timeout=timeout))
            r = answers[0].result
        elif call.wire is not None:
            method = channel.unary_unary(UPSCALE)  # bytes in, bytes out
            r = upscale_pb2.UpscaleResponse.FromString(method(call.wire, timeout=timeout))
        else:
            assert call.wire_stream is not None
            method = channel.stream_stream(UPSCALE_STREAM)
            answers = list(method(iter(call.wire_stream), timeout=timeout))
            r = upscale_pb2.UpscaleChunk.FromString(answers[0]).result
    except grpc.RpcError as e:
        return Outcome(e.code().name, e.details() or "")
    return Outcome(OK, f"{r.width}x{r.height}x{r.channels}")


def open_channel(port: int) -> grpc.Channel:
    """The client may send more than the server accepts: the server's limit is under test."""
    big = 4 * MAX_MESSAGE_BYTES
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)],
    )


def assert_outcome(case: Case, outcome: Outcome) -> None:
    assert (outcome.code, case.fragment in outcome.message) == (case.code, True), (
        f"{case.kind}: got {outcome.code} {outcome.message!r}; expected {case.code} with "
        f"{case.fragment!r}"
    )


@pytest.fixture(scope="module")
def server(tiny_onnx_x2: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(
        model=tiny_onnx_x2,
        host="127.0.0.1",
        port=0,
        grace_s=1.0,
        engine=EngineConfig(providers=("CPUExecutionProvider",)),
        tiling=TilingConfig(mode="grid", tile=TILE, pad=PAD),
        batcher=BatcherConfig(max_batch=8, max_delay_ms=1.0, max_queue_tiles=MAX_QUEUE_TILES),
        limits=LimitsConfig(
            max_pixels=MAX_PIXELS,
            max_request_bytes=MAX_REQUEST_BYTES,
            max_message_bytes=MAX_MESSAGE_BYTES,
        ),
    )
    with BackgroundServer(config) as bg:
        yield bg


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with open_channel(server.port) as ch:
        yield ch


VALID = encoded(png(16, 16))


def test_corpus_is_large_and_distinct() -> None:
    kinds = [case.kind for case in CORPUS]
    assert len(set(kinds)) == len(kinds) >= 30
    assert sum(case.code != OK for case in CORPUS) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=[c.kind for c in CORPUS])
def test_hostile_input_gets_its_status_and_the_server_keeps_serving(
    channel: grpc.Channel, server: BackgroundServer, case: Case
) -> None:
    assert_outcome(case, send(channel, case.build()))
    assert send(channel, VALID) == Outcome(OK, "32x32x3")
    batcher = server.running.batcher
    assert batcher.queued_tiles == 0 and batcher.pending_requests == 0


# ---------------------------------------------------------------- memory under hostile load

RDN_SERVE = Path(sys.executable).with_name("rdn-serve")
START_TIMEOUT = 60.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture
def serve_process(
    tiny_onnx_x2: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real ``rdn-serve`` with the corpus limits, logging to a file; yields (process, port)."""
    command = [str(RDN_SERVE)] if RDN_SERVE.exists() else [sys.executable, "-m", "server.main"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *command, "--model", str(tiny_onnx_x2), "--host", "127.0.0.1", "--port", "0",
                "--providers", "CPUExecutionProvider", "--tile", str(TILE), "--tile-pad", str(PAD),
                "--max-batch", "8", "--tiling", "grid", "--max-queue-tiles", str(MAX_QUEUE_TILES),
                "--max-pixels", str(MAX_PIXELS), "--max-request-bytes", str(MAX_REQUEST_BYTES),
                "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--grace", "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )  # fmt: skip
    try:
        yield process, wait_for_port(process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    """The port of the server's "listening on 127.0.0.1:PORT" start-up line."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        assert process.poll() is None, text
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"rdn-serve did not start within {START_TIMEOUT} s")


@pytest.mark.slow
def test_hostile_requests_leave_server_memory_flat(
    serve_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = serve_process
    calls = [case.build() for case in CORPUS]  # built once: the client's cost is not under test
    expected = [case for case in CORPUS]
    with open_channel(port) as channel, ThreadPoolExecutor(4) as pool:

        def one(i: int) -> tuple[int, Outcome]:
            return i, send(channel, calls[i % len(calls)])

        list(pool.map(one, range(len(calls))))  # warm-up: every kind once
        before = rss_bytes(process.pid)
        mismatches = []
        for i, outcome in pool.map(one, range(HOSTILE_REQUESTS)):
            case = expected[i % len(calls)]
            if outcome.code != case.code or case.fragment not in outcome.message:
                mismatches.append((case.kind, outcome))
        after = rss_bytes(process.pid)
        assert send(channel, VALID) == Outcome(OK, "32x32x3")
    assert mismatches == []
    assert process.poll() is None
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew {(after - before) / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "method",
    [
        "/rdn.v1.Upscaler/GetModelInfo",
        "/grpc.health.v1.Health/Check",
        "/inference.GRPCInferenceService/ModelInfer",
    ],
)
def test_malformed_unary_message_to_any_method_is_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(method)(b"\x0a\xff\xff\xff\xff\x0f", timeout=CALL_TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request message of {method} cannot be parsed" in (error.value.details() or "")


def test_malformed_message_is_access_logged(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="rdn.access"):
        assert send(channel, Call(wire=b"\xff\xff\xff\xff\x0f")).code == INVALID
        deadline = time.monotonic() + CALL_TIMEOUT
        while not [r for r in caplog.records if r.name == "rdn.access"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    (record,) = [r for r in caplog.records if r.name == "rdn.access"]
    assert record.fields["method"] == "Upscale"  # type: ignore[attr-defined]
    assert record.fields["status"] == INVALID  # type: ignore[attr-defined]
