"""Property-based fuzzing of everything a client controls before the engine runs.

Targets: ``codec.decode_image`` (random bytes; valid files of every accepted format and layout
with bit flips, byte overwrites, truncations, insertions and header fields set to edge values),
``codec.decode_raw`` (random shapes and byte counts), ``doors.upscaler.output_spec``,
``access.check_request_id`` and the stream reassembly ``doors.upscaler.receive_stream``
(random chunk sequences, driven without a server).

Property: every input either gives a well-formed result (shapes, dtypes and limits consistent)
or raises the documented error (``ImageError`` / ``ImageTooLarge`` / ``RequestError``); nothing
else escapes and nothing hangs (Hypothesis deadline). CI runs a bounded, derandomized number of
examples; a long run is ``RDN_FUZZ_EXAMPLES=100000 pytest tests/server/doors/test_fuzz.py`` (random
seeds, every failing input shrunk and printed).
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.config import LimitsConfig, UploadConfig
from server.core.access import MAX_REQUEST_ID_CHARS, AccessRecord, check_request_id
from server.core.errors import RequestError
from server.core.uploads import UploadBudget
from server.doors.upscaler import output_spec, receive_stream
from server.imaging.codec import RAW_CHANNELS, DecodedImage, ImageError, decode_image, decode_raw
from server.imaging.headers import INPUT_FORMATS, JPEG_MAX_SCANS, sniff_format
from server.pb.rdn.v1 import upscale_pb2
from server.wire import DEFAULT_QUALITY, FORMATS

EXAMPLES = int(os.environ.get("RDN_FUZZ_EXAMPLES", "300"))
LONG_RUN = "RDN_FUZZ_EXAMPLES" in os.environ
DEADLINE_MS = int(os.environ.get("RDN_FUZZ_DEADLINE_MS", "2000"))  # per example; a hang fails
# A long run outlasts pytest-timeout's 300 s per test; the Hypothesis deadline still bounds
# every example.
pytestmark = [pytest.mark.timeout(0)] if LONG_RUN else []
MAX_PIXELS = 256 * 256  # small: random header sizes are mostly refused, decodes stay cheap
MAX_BYTES = 2**20

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(milliseconds=DEADLINE_MS),
    derandomize=not LONG_RUN,  # CI: the same examples every run; long runs: fresh ones
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


# ------------------------------------------------------------------------------ seed files


def _pixels(height: int, width: int, channels: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 29 + y * 13)[:, :, None] + np.arange(channels) * 70).astype(np.uint8)


def _pil(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _cv(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def seed_files() -> dict[str, bytes]:
    """Small valid files of every accepted format and layout (made here, never stored)."""
    rgb, grey = _pixels(9, 13, 3), _pixels(9, 13, 1)[:, :, 0]
    rgba, la = _pixels(9, 13, 4), _pixels(9, 13, 2)
    image, frames = Image.fromarray(rgb), [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    return {
        "png rgb": _pil(image, "PNG"),
        "png rgba": _pil(Image.fromarray(rgba), "PNG"),
        "png grey": _pil(Image.fromarray(grey), "PNG"),
        "png grey+alpha": _pil(Image.fromarray(la, "LA"), "PNG"),
        "png palette": _pil(image.convert("P"), "PNG", transparency=0),
        "png 16-bit": _cv(rgb.astype(np.uint16) * 257, ".png"),
        "jpeg": _pil(image, "JPEG", quality=90),
        "jpeg progressive": _pil(image, "JPEG", quality=90, progressive=True),
        "jpeg grey": _pil(Image.fromarray(grey), "JPEG"),
        "jpeg cmyk": _pil(image.convert("CMYK"), "JPEG"),
        "webp lossy": _pil(image, "WEBP", quality=80),
        "webp lossless": _pil(image, "WEBP", lossless=True),
        "webp alpha": _pil(Image.fromarray(rgba), "WEBP", lossless=True),
        "bmp 24": _pil(image, "BMP"),
        "bmp 8 palette": _pil(image.convert("P"), "BMP"),
        "bmp 32": _cv(rgba, ".bmp"),
        "tiff": _pil(image, "TIFF"),
        "tiff lzw": _pil(image, "TIFF", compression="tiff_lzw"),
        "tiff rgba": _pil(Image.fromarray(rgba), "TIFF"),
        "tiff grey+alpha": _pil(Image.fromarray(la, "LA"), "TIFF"),
        "tiff 16-bit": _cv(rgb.astype(np.uint16) * 257, ".tiff"),
        "tiff cmyk": _pil(image.convert("CMYK"), "TIFF"),
        "tiff multi-page": _pil(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
    }


SEEDS = seed_files()


def header_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the header fields decoders size things by."""
    fmt = sniff_format(data)
    fields: list[tuple[int, str]] = []
    if fmt == "png":
        fields += [(16, ">I"), (20, ">I"), (24, "B"), (25, "B"), (28, "B")]
        i = 8
        while i + 8 <= len(data):  # every chunk's length field
            fields.append((i, ">I"))
            i += 12 + struct.unpack(">I", data[i : i + 4])[0]
    elif fmt == "jpeg":
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
            fields.append((i + 2, ">H"))  # segment length
            if data[i + 1] in (0xC0, 0xC1, 0xC2):
                fields += [(i + 5, ">H"), (i + 7, ">H"), (i + 9, "B")]
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    elif fmt == "webp":
        fields += [(4, "<I"), (16, "<I"), (21, "<I"), (24, "<H"), (26, "<H"), (28, "<H")]
    elif fmt == "bmp":
        fields += [(2, "<I"), (10, "<I"), (14, "<I"), (18, "<i"), (22, "<i"), (28, "<H")]
        fields += [(30, "<I"), (34, "<I"), (46, "<I")]
    else:
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", data[4:8])[0]
        fields.append((4, order + "I"))
        count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
        for k in range(count):  # every entry's type, count and value
            entry = ifd + 2 + 12 * k
            fields += [(entry + 2, order + "H"), (entry + 4, order + "I"), (entry + 8, order + "I")]
    return [(offset, f) for offset, f in fields if offset + struct.calcsize(f) <= len(data)]


EDGE_VALUES = (0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               100_000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)  # fmt: skip


def set_field(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    bits = 8 * size
    value %= 2**bits
    if fmt[-1].islower() and value >= 2 ** (bits - 1):  # signed field
        value -= 2**bits
    data[offset : offset + size] = struct.pack(fmt, value)


MAGIC_BYTES = {"png": 8, "jpeg": 3, "webp": 12, "bmp": 2, "tiff": 4}  # how formats are sniffed


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A seed file with 1-6 mutations: bit flips, byte overwrites, header fields set to edge
    values, truncations, insertions, deletions, duplicated slices. The format's magic bytes
    are left alone 7 times in 8 (random bytes already test the sniffing)."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    fields = header_fields(bytes(data))
    low = 0 if draw(st.integers(0, 7)) == 0 else MAGIC_BYTES[sniff_format(bytes(data))]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("flip", "byte", "field", "cut", "insert", "delete", "repeat")))
        if len(data) <= low:
            break
        # Headers matter most: positions are biased to the first 64 bytes.
        head = st.integers(low, max(low, min(63, len(data) - 1)))
        where = draw(st.one_of(head, st.integers(low, len(data) - 1)))
        if op == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[where] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)))
        elif op == "field" and fields:
            offset, fmt = draw(st.sampled_from(fields))
            value = draw(st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, 2**32 - 1)))
            set_field(data, offset, fmt, value)
        elif op == "cut":
            del data[where:]
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[where : where + draw(st.integers(1, 16))]
        elif op == "repeat":
            data[where:where] = data[where : where + draw(st.integers(1, 64))]
    return bytes(data)


# ------------------------------------------------------------------------------ properties


def assert_well_formed(decoded: DecodedImage, channels: int | None = None) -> None:
    rgb = decoded.rgb
    assert rgb.dtype in (np.uint8, np.uint16) and rgb.ndim == 3 and rgb.shape[2] == 3
    height, width = rgb.shape[:2]
    assert height >= 1 and width >= 1 and height * width <= MAX_PIXELS
    assert decoded.channels in RAW_CHANNELS
    if channels is not None:
        assert decoded.channels == channels
    if decoded.channels == 4:
        assert decoded.alpha is not None
        assert decoded.alpha.shape == (height, width) and decoded.alpha.dtype == np.uint8
    else:
        assert decoded.alpha is None
    assert decoded.source_format in (*INPUT_FORMATS, "raw")


def decode_or_refuse(data: bytes) -> None:
    try:
        decoded = decode_image(data, MAX_PIXELS, MAX_BYTES)
    except ImageError as e:
        assert str(e), "an ImageError must say what was wrong"
        return
    assert_well_formed(decoded)
    assert decoded.source_format == sniff_format(data)


def tiff_rational_strip_offsets() -> bytes:
    """Found by this fuzzer: Pillow raised TypeError on a StripOffsets tag typed RATIONAL."""
    data = bytearray(SEEDS["tiff grey+alpha"])
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:
            data[entry + 2 : entry + 4] = struct.pack("<H", 5)
    return bytes(data)


def png_chunk_length(length: int) -> bytes:
    """Found by this fuzzer: a 4 GiB chunk length made OpenCV allocate 4 GiB for seconds."""
    data = bytearray(SEEDS["png rgb"])
    data[33:37] = struct.pack(">I", length)
    return bytes(data)


def jpeg_with_scans(extra: int) -> bytes:
    """Empty AC scans: each costs libjpeg a pass over the image, a few bytes each."""
    data = SEEDS["jpeg progressive"]
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00" * extra + data[eoi:]


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff\xd9")
@example(b"RIFF\0\0\0\0WEBPVP8 ")
@example(b"II*\0\xff\xff\xff\xff")
@example(b"BM" + bytes(60))
def test_random_bytes_decode_or_raise_image_error(data: bytes) -> None:
    decode_or_refuse(data)


@FUZZ
@given(mutated_files())
@example(tiff_rational_strip_offsets())
@example(png_chunk_length(0xFFFFFFF0))
@example(jpeg_with_scans(JPEG_MAX_SCANS))
def test_mutated_files_decode_or_raise_image_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_file_decodes(name: str) -> None:
    """The mutations start from files the decoder accepts (else the fuzzer tests less)."""
    decoded = decode_image(SEEDS[name], MAX_PIXELS, MAX_BYTES)
    assert_well_formed(decoded)
    assert decoded.rgb.shape[:2] == (9, 13)


REGRESSIONS = [
    (
        "tiff rational strip offsets",
        tiff_rational_strip_offsets,
        "TIFF data is corrupt: the first page's strip or tile table is missing",
    ),
    ("png 4 GiB chunk", lambda: png_chunk_length(0xFFFFFFF0), "declares 4294967280 bytes"),
    ("jpeg many scans", lambda: jpeg_with_scans(JPEG_MAX_SCANS), "at most 256 are accepted"),
]


@pytest.mark.parametrize("name,make,message", REGRESSIONS, ids=[r[0] for r in REGRESSIONS])
def test_fuzzer_findings_are_refused_with_their_cause(
    name: str, make: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(make(), MAX_PIXELS, MAX_BYTES)


small = st.integers(0, 40)
huge = st.sampled_from((2**16, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1, 3 * 2**30))


@FUZZ
@given(
    height=st.one_of(small, huge, st.integers(0, 2**32 - 1)),
    width=st.one_of(small, huge, st.integers(0, 2**32 - 1)),
    channels=st.one_of(st.integers(0, 6), st.sampled_from((2**32 - 1, 2**31))),
    size_delta=st.one_of(st.just(0), st.integers(-3, 3), st.integers(-(10**6), 10**6)),
)
def test_raw_shapes_decode_or_raise_image_error(
    height: int, width: int, channels: int, size_delta: int
) -> None:
    expected = height * width * channels
    size = min(max(0, expected + size_delta), 2 * 2**20)  # never allocate what a shape claims
    data = bytes(size)
    try:
        decoded = decode_raw(data, height, width, channels, MAX_PIXELS, MAX_BYTES)
    except ImageError as e:
        assert str(e)
        return
    assert size == expected  # accepted only with exactly H*W*C bytes
    assert_well_formed(decoded, channels)
    assert decoded.rgb.shape[:2] == (height, width)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
@example(0, 0)
@example(4, 100)
@example(2, 101)
def test_output_spec_accepts_known_formats_and_qualities_only(fmt: int, quality: int) -> None:
    try:
        spec = output_spec(fmt, quality)
    except RequestError as e:
        assert fmt not in FORMATS or quality > 100, e
        assert str(fmt if fmt not in FORMATS else quality) in str(e)
        return
    assert fmt in FORMATS and quality <= 100
    assert spec.name == FORMATS[fmt] and 1 <= spec.quality <= 100
    assert spec.quality == (quality or DEFAULT_QUALITY)


@FUZZ
@given(st.text(max_size=300))
def test_request_id_up_to_the_limit_is_echoed(request_id: str) -> None:
    try:
        assert check_request_id(request_id) == request_id
    except RequestError as e:
        assert len(request_id) > MAX_REQUEST_ID_CHARS and str(len(request_id)) in str(e)
    else:
        assert len(request_id) <= MAX_REQUEST_ID_CHARS


# ------------------------------------------------------------------------ stream reassembly

STREAM_LIMITS = LimitsConfig(max_pixels=MAX_PIXELS, max_request_bytes=4096)

headers = st.builds(
    lambda total, shape, fmt, quality, rid: upscale_pb2.UpscaleChunk(
        header=upscale_pb2.UpscaleStreamHeader(
            total_bytes=total, raw_shape=shape, output_format=fmt, quality=quality, request_id=rid
        )
    ),
    total=st.one_of(st.integers(0, 300), st.sampled_from((4096, 4097, 2**63, 2**64 - 1))),
    shape=st.one_of(
        st.none(),
        st.builds(
            upscale_pb2.ImageShape,
            height=st.integers(0, 2**32 - 1),
            width=st.integers(0, 2**32 - 1),
            channels=st.integers(0, 8),
        ),
    ),
    fmt=st.integers(0, 6),
    quality=st.integers(0, 120),
    rid=st.text(max_size=140),
)
datas = st.builds(
    lambda offset, data: upscale_pb2.UpscaleChunk(
        data=upscale_pb2.DataChunk(offset=offset, data=data)
    ),
    offset=st.integers(0, 400),
    data=st.binary(max_size=120),
)
others = st.sampled_from(
    (upscale_pb2.UpscaleChunk(), upscale_pb2.UpscaleChunk(result=upscale_pb2.UpscaleResponse()))
)


@st.composite
def chunk_sequences(draw: st.DrawFn) -> list[upscale_pb2.UpscaleChunk]:
    """Mostly well-formed uploads (header, then in-order chunks) with random damage."""
    if draw(st.booleans()):
        return draw(st.lists(st.one_of(headers, datas, others), max_size=8))
    header = draw(headers)
    payload = draw(st.binary(max_size=300))
    header.header.total_bytes = draw(st.sampled_from((len(payload), len(payload) + 1)))
    sizes = draw(st.lists(st.integers(0, 64), max_size=12))
    messages, offset = [header], 0
    for size in sizes:
        piece = payload[offset : offset + size]
        messages.append(
            upscale_pb2.UpscaleChunk(data=upscale_pb2.DataChunk(offset=offset, data=piece))
        )
        offset += len(piece)
    if offset < len(payload):
        messages.append(
            upscale_pb2.UpscaleChunk(
                data=upscale_pb2.DataChunk(offset=offset, data=payload[offset:])
            )
        )
    if draw(st.booleans()):  # damage: drop, duplicate or swap a message
        k = draw(st.integers(0, len(messages) - 1))
        action = draw(st.sampled_from(("drop", "duplicate", "swap")))
        if action == "drop":
            del messages[k]
        elif action == "duplicate":
            messages.insert(k, messages[k])
        elif k + 1 < len(messages):
            messages[k], messages[k + 1] = messages[k + 1], messages[k]
    return messages


async def _replay(
    messages: list[upscale_pb2.UpscaleChunk],
) -> AsyncIterator[upscale_pb2.UpscaleChunk]:
    for message in messages:
        yield message


@FUZZ
@given(chunk_sequences())
def test_stream_reassembly_returns_the_announced_bytes_or_raises_request_error(
    messages: list[upscale_pb2.UpscaleChunk],
) -> None:
    record = AccessRecord("UpscaleStream")
    try:
        budget = UploadBudget(UploadConfig())
        header, data, hold = asyncio.run(
            receive_stream(_replay(messages), STREAM_LIMITS, budget, record)
        )
        hold.release()
    except RequestError as e:
        assert str(e)
        return
    assert messages[0].WhichOneof("kind") == "header"
    assert len(data) == header.total_bytes and 1 <= len(data) <= STREAM_LIMITS.max_request_bytes
    pieces = [m.data for m in messages[1:]]
    assert all(m.WhichOneof("kind") == "data" for m in messages[1:])
    assert b"".join(p.data for p in pieces) == data
    assert [p.offset for p in pieces] == list(np.cumsum([0, *[len(p.data) for p in pieces]])[:-1])
    shape = header.raw_shape
    assert shape.height * shape.width <= STREAM_LIMITS.max_pixels
    assert len(header.request_id) <= MAX_REQUEST_ID_CHARS
    assert header.output_format in FORMATS and header.quality <= 100
