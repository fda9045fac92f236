"""Hostile animations and HEIF boxes, refused from their headers with the right error, fast
and in bounded memory; and the decode-memory bound measured on AVIF and HEIC."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from server.imaging.animation import MAX_FRAMES, decode_animation, read_animation_header
from server.imaging.codec import decode_image
from server.imaging.headers import DECODE_BYTES_PER_PIXEL, ImageError, ImageTooLarge

MAX_PIXELS = 4096 * 4096 + 1
MAX_BYTES = 64 * 2**20
SCRIPT = Path(__file__).parents[1] / "decode_memory_script.py"


def gif_with_frames(count: int, screen: tuple[int, int] = (1, 1), frame=(1, 1)) -> bytes:
    """A GIF of ``count`` frames of ``frame`` pixels on a ``screen``, written byte by byte."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)  # 2-colour table
    one = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00"
    return head + one * count + b"\x3b"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def apng_declaring(frames: int, fctl: tuple[int, int, int, int] = (1, 1, 0, 0)) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    actl = struct.pack(">II", frames, 0)
    w, h, x, y = fctl
    fc = struct.pack(">IIIIIHHBB", 0, w, h, x, y, 1, 10, 0, 0)
    idat = zlib.compress(b"\x00\x00\x00\x00")
    chunks = [(b"IHDR", ihdr), (b"acTL", actl), (b"fcTL", fc), (b"IDAT", idat), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, b) for k, b in chunks)


def webp_anim(frames: int, canvas=(1, 1), frame=(1, 1)) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0])
    vp8x += (canvas[0] - 1).to_bytes(3, "little") + (canvas[1] - 1).to_bytes(3, "little")
    anim = b"ANIM" + struct.pack("<I", 6) + bytes(6)
    body = bytes(6) + (frame[0] - 1).to_bytes(3, "little") + (frame[1] - 1).to_bytes(3, "little")
    anmf = b"ANMF" + struct.pack("<I", 16) + body + bytes(4)
    payload = b"WEBP" + vp8x + anim + anmf * frames
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def pillow_animation(fmt: str, **options: object) -> bytes:
    images = [Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)) for k in range(4)]
    out = io.BytesIO()
    images[0].save(out, fmt, save_all=True, append_images=images[1:], duration=50, **options)
    return out.getvalue()


def refused(data: bytes, error: type[Exception], fragment: str) -> None:
    """``data`` is refused from its headers: the error, within 1 s and 4 MiB of Python memory
    beyond the file itself, whatever it declares."""
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(error, match=fragment):
        header = read_animation_header(data, MAX_PIXELS, MAX_BYTES)
        decode_animation(data, header)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 4 * 2**20, (elapsed, peak)


@pytest.mark.parametrize(
    ("name", "make", "error", "fragment"),
    [
        ("GIF 100000 frames of 1x1", lambda: gif_with_frames(100_000), ImageTooLarge,
         f"more than {MAX_FRAMES} frames"),
        ("GIF 1x1 screen, a 60000x60000 frame", lambda: gif_with_frames(1, frame=(60000, 60000)),
         ImageTooLarge, "over --max-pixels"),
        ("GIF 500 frames of 200x200", lambda: gif_with_frames(500, (200, 200), (200, 200)),
         ImageTooLarge, r"frames x pixels"),
        ("GIF cut inside a frame", lambda: gif_with_frames(3)[:-4], ImageError, "truncated"),
        ("APNG acTL 1000000 frames", lambda: apng_declaring(1_000_000), ImageTooLarge,
         f"more than {MAX_FRAMES} frames"),
        ("APNG frame outside its canvas", lambda: apng_declaring(1, (5000, 5000, 0, 0)),
         ImageError, "does not lie inside"),
        ("APNG fewer frames than acTL", lambda: apng_declaring(3), ImageError,
         "acTL declares 3 frames, 1 are present"),
        ("APNG cut", lambda: pillow_animation("PNG")[:-40], ImageError, "truncated"),
        ("WebP 100000 ANMF of 1x1", lambda: webp_anim(100_000), ImageTooLarge,
         f"more than {MAX_FRAMES} frames"),
        ("WebP huge canvas", lambda: webp_anim(1, (16000, 16000), (1, 1)), ImageTooLarge,
         "over --max-pixels"),
        ("WebP frame outside its canvas", lambda: webp_anim(1, (2, 2), (300, 300)), ImageError,
         "does not lie inside"),
        ("WebP cut", lambda: pillow_animation("WEBP")[:-30], ImageError, "truncated"),
    ],
)  # fmt: skip
def test_hostile_animations_are_refused_from_their_headers(name, make, error, fragment) -> None:
    refused(make(), error, fragment)


def heic_file() -> bytes:
    out = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)
    pillow_heif.from_pillow(Image.fromarray(rgb)).save(out, quality=80)
    return out.getvalue()


def ftyp(data: bytes) -> bytes:
    return data[: struct.unpack(">I", data[:4])[0]]


def patch_ispe(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"ispe") + 8
    return data[:at] + struct.pack(">II", width, height) + data[at + 8 :]


def patch_box_size(data: bytes, kind: bytes, size: int) -> bytes:
    at = data.index(kind) - 4
    return data[:at] + struct.pack(">I", size) + data[at + 4 :]


@pytest.mark.parametrize(
    ("name", "make", "error", "fragment"),
    [
        ("ispe 60000x60000", lambda: patch_ispe(heic_file(), 60000, 60000), ImageTooLarge,
         "over --max-pixels"),
        ("ispe 0x0", lambda: patch_ispe(heic_file(), 0, 0), ImageError, "at least 1"),
        ("meta box runs past the file", lambda: patch_box_size(heic_file(), b"meta", 2**31),
         ImageError, "only .* remain"),
        ("ipco box smaller than its header", lambda: patch_box_size(heic_file(), b"ipco", 3),
         ImageError, "declares 3 bytes"),
        ("cut inside the boxes", lambda: heic_file()[:200], ImageError, "corrupt"),
        ("no ispe", lambda: heic_file().replace(b"ispe", b"ispX"), ImageError, "no 'ispe'"),
        ("10000 empty boxes", lambda: ftyp(heic_file()) + b"\x00\x00\x00\x08free" * 10000,
         ImageError, "more than 4096 boxes"),
        ("cut media data", lambda: heic_file()[:-100], ImageError, "corrupt|truncated|decoded"),
    ],
)  # fmt: skip
def test_hostile_heif_boxes_are_refused(name, make, error, fragment) -> None:
    data = make()
    tracemalloc.start()
    with pytest.raises(error, match=fragment):
        decode_image(data, MAX_PIXELS, MAX_BYTES)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20


SIDE = 2048  # 4 Mpix, as tests/server/imaging/test_decode_memory.py


def gradient() -> np.ndarray:
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    return np.stack([(x * (k + 1) + y) % 256 for k in range(3)], -1).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["avif", "heic"])
def test_heif_decoding_needs_at_most_the_stated_bytes_per_pixel(fmt: str, tmp_path: Path) -> None:
    out = io.BytesIO()
    if fmt == "heic":
        pillow_heif.from_pillow(Image.fromarray(gradient())).save(out, quality=90)
    else:
        Image.fromarray(gradient()).save(out, "AVIF", quality=90, speed=10)
    path = tmp_path / f"image.{fmt}"
    path.write_bytes(out.getvalue())
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    per_pixel = float(done.stdout)
    print(f"{fmt}: {per_pixel:.1f} bytes per pixel")
    assert 1.0 < per_pixel <= DECODE_BYTES_PER_PIXEL, f"{fmt}: {per_pixel:.1f} bytes per pixel"
