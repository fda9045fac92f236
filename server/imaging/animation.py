"""Animated images (GIF, APNG, animated WebP): their headers, limits, frames and encoding.

An animation is checked from its headers before any frame is decoded, as still images are
(server/imaging/headers.py):

- the frame count and each frame's rectangle come from a bounded walk of the file's blocks
  (GIF: image descriptors, at most ``GIF_MAX_BLOCKS`` blocks; APNG: acTL and fcTL chunks, at
  most ``PNG_MAX_CHUNKS``; WebP: ANMF chunks, at most ``WEBP_MAX_CHUNKS``);
- the limit: frames x canvas pixels <= ``max_pixels`` (every frame is decoded to the full
  canvas and upscaled), and at most ``MAX_FRAMES`` frames; the walk stops at the first frame
  over either, so a frame-count bomb (100000 frames of 1x1) costs a fraction of its bytes;
- a GIF frame may reach past the logical screen (Pillow then grows the canvas): the canvas is
  the union of the screen and every frame, so a 1x1 screen declaring a 60000x60000 frame is
  refused; APNG and WebP frames must lie inside their canvas, as their specifications say.

Frames are decoded with Pillow, each composited to the full canvas (disposal and blending
applied), and kept with their duration and disposal; the loop count is kept. Encoding writes
full frames with the same durations, disposals and loop count (APNG frames replace their
area: blend SOURCE; GIF frames get an adaptive palette of their own and a transparent index).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.imaging.codec import DecodedImage
from server.imaging.headers import (
    PNG_MAX_CHUNKS,
    ImageError,
    ImageTooLarge,
    check_bytes,
    check_pixels,
)
from server.imaging.limit_text import pixels_over
from server.imaging.modern import to_palette

ANIMATED_INPUTS = ("gif", "apng")  # and animated WebP (a "webp" input format)
MAX_FRAMES = 1000  # frames per animation: each is a pipeline image with its own tiles
GIF_MAX_BLOCKS = 2**19  # sub-blocks walked: 128 MiB of well-formed 255-byte blocks
WEBP_MAX_CHUNKS = 2**16
GIF_MAX_SIDE = 65535  # pixels, the largest side a GIF holds
WEBP_MAX_SIDE = 16383  # pixels, the largest side a WebP holds
PIL_FORMATS = {"gif": "GIF", "apng": "PNG", "webp": "WEBP"}
CONTAINERS = {"gif": "gif", "png": "apng", "webp": "webp"}  # output format -> animation kind
FORMAT_OF = {"gif": "gif", "apng": "png", "webp": "webp"}  # animation kind -> output format
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class AnimationHeader:
    """What an animation's blocks declare, read before any frame is decoded."""

    kind: str  # "gif", "apng" or "webp"
    width: int  # the canvas every frame is decoded to
    height: int
    frames: int


@dataclass(frozen=True)
class Animation:
    """What an animation keeps besides its pixels: per-frame timing and the loop count."""

    kind: str  # "gif", "apng" or "webp"
    durations: list[int]  # milliseconds, one per frame
    disposals: list[int]  # as the format numbers them (GIF 0-3, APNG 0-2); 0 for WebP
    loop: int | None  # 0 = forever; None: the file has no loop count (GIF: play once)
    alpha: bool  # some frame has a pixel that is not opaque


def _truncated(kind: str, what: str) -> ImageError:
    return ImageError(f"{kind.upper()} data is truncated ({what}); send the complete file")


def probe(data: bytes) -> str | None:
    """ "gif", "apng" or "webp" when ``data`` is an animation this module reads, else None.

    Every GIF counts (one frame or more); a PNG when an acTL chunk precedes its image data; a
    WebP when its VP8X header sets the animation flag."""
    if data.startswith(b"GIF8"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and len(data) > 20 and data[20] & 0x02:
        return "webp"
    if data.startswith(_PNG_MAGIC):
        i = len(_PNG_MAGIC)
        for _ in range(PNG_MAX_CHUNKS):
            if i + 8 > len(data):
                return None
            (length,) = struct.unpack(">I", data[i : i + 4])
            kind = data[i + 4 : i + 8]
            if kind == b"acTL":
                return "apng"
            if kind in (b"IDAT", b"IEND"):
                return None
            i += 12 + length
    return None


def _check_frames(kind: str, frames: int, width: int, height: int, max_pixels: int) -> None:
    """Refuse the animation once its frames so far are over a limit."""
    if frames > MAX_FRAMES:
        raise ImageTooLarge(
            f"{kind.upper()} animation has more than {MAX_FRAMES} frames; send at most "
            f"{MAX_FRAMES} (or fewer, larger ones)"
        )
    total = frames * width * height
    if total > max_pixels:
        raise ImageTooLarge(
            f"{kind.upper()} animation of {frames}+ frames of {width}x{height}: "
            f"{pixels_over(total, max_pixels)} (frames x pixels); send fewer or smaller frames"
        )


def _gif_header(data: bytes, max_pixels: int) -> AnimationHeader:
    n = len(data)
    if n < 13:
        raise _truncated("gif", f"{n} bytes, the header alone takes 13")
    screen_w, screen_h, packed = struct.unpack("<HHB", data[6:11])
    check_pixels(screen_w, screen_h, max_pixels, "GIF logical screen")
    width, height = screen_w, screen_h
    i = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    frames, budget = 0, GIF_MAX_BLOCKS

    def skip_sub_blocks(j: int) -> int:
        nonlocal budget
        while True:
            budget -= 1
            if budget < 0:
                raise ImageError(f"GIF data has more than {GIF_MAX_BLOCKS} blocks; re-save it")
            if j >= n:
                raise _truncated("gif", f"ends at byte {n} inside frame {frames + 1}'s data")
            size = data[j]
            j += 1 + size
            if size == 0:
                return j

    while i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            i = skip_sub_blocks(i + 2)
        elif block == 0x2C:  # image descriptor
            if i + 10 > n:
                raise _truncated("gif", f"ends at byte {n} inside frame {frames + 1}'s header")
            left, top, w, h, flags = struct.unpack("<HHHHB", data[i + 1 : i + 10])
            if w < 1 or h < 1:
                raise ImageError(f"GIF frame {frames + 1} declares {w}x{h} pixels")
            frames += 1
            width, height = max(width, left + w), max(height, top + h)  # as Pillow grows it
            _check_frames("gif", frames, width, height, max_pixels)
            i += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # + LZW code size
            i = skip_sub_blocks(i)
        else:
            raise ImageError(f"GIF data is corrupt: unknown block 0x{block:02x} at byte {i}")
    if frames == 0:
        raise ImageError("GIF data has no frames")
    return AnimationHeader("gif", width, height, frames)


def _apng_header(data: bytes, max_pixels: int) -> AnimationHeader:
    n, i = len(data), len(_PNG_MAGIC)
    if n < 33 or data[12:16] != b"IHDR":
        raise ImageError("PNG data is corrupt or truncated: no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    check_pixels(width, height, max_pixels, "APNG canvas")
    declared, frames = 0, 0
    for _ in range(PNG_MAX_CHUNKS):
        if i + 8 > n:
            raise _truncated("apng", f"no IEND chunk in {n} bytes")
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if i + 12 + length > n:
            raise _truncated("apng", f"chunk {kind!r} at byte {i} runs past byte {n}")
        body = data[i + 8 : i + 8 + length]
        if kind == b"acTL":
            if length < 8:
                raise ImageError(f"APNG acTL chunk of {length} bytes; it needs 8")
            declared = struct.unpack(">I", body[:4])[0]
            if declared < 1:
                raise ImageError("APNG acTL declares 0 frames")
            _check_frames("apng", declared, width, height, max_pixels)
        elif kind == b"fcTL":
            if length < 26:
                raise ImageError(f"APNG fcTL chunk of {length} bytes; it needs 26")
            w, h, x, y = struct.unpack(">IIII", body[4:20])
            frames += 1
            if w < 1 or h < 1 or x + w > width or y + h > height:
                raise ImageError(
                    f"APNG frame {frames} ({w}x{h} at {x},{y}) does not lie inside the "
                    f"{width}x{height} canvas"
                )
            _check_frames("apng", frames, width, height, max_pixels)
        elif kind == b"IEND":
            break
        i += 12 + length
    else:
        raise ImageError(f"PNG data has more than {PNG_MAX_CHUNKS} chunks; re-save the PNG")
    if frames != declared:
        raise _truncated("apng", f"acTL declares {declared} frames, {frames} are present")
    return AnimationHeader("apng", width, height, declared)


def _webp_header(data: bytes, max_pixels: int) -> AnimationHeader:
    n = len(data)
    if n < 30:
        raise _truncated("webp", f"{n} bytes, the header alone takes 30")
    (riff,) = struct.unpack("<I", data[4:8])
    if riff + 8 > n:
        raise _truncated("webp", f"{n} bytes, the RIFF header says {riff + 8}")
    width = int.from_bytes(data[24:27], "little") + 1
    height = int.from_bytes(data[27:30], "little") + 1
    check_pixels(width, height, max_pixels, "WebP canvas")
    i, end, frames = 30, riff + 8, 0
    for _ in range(WEBP_MAX_CHUNKS):
        if i >= end:
            break
        if i + 8 > end:
            raise _truncated("webp", f"a chunk header at byte {i} runs past byte {end}")
        kind, size = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])[0]
        if i + 8 + size > end:
            raise _truncated("webp", f"chunk {kind!r} at byte {i} runs past byte {end}")
        if kind == b"ANMF":
            if size < 16:
                raise ImageError(f"WebP ANMF chunk of {size} bytes; it needs 16")
            f = data[i + 8 : i + 24]
            x, y = 2 * int.from_bytes(f[0:3], "little"), 2 * int.from_bytes(f[3:6], "little")
            w, h = int.from_bytes(f[6:9], "little") + 1, int.from_bytes(f[9:12], "little") + 1
            frames += 1
            if x + w > width or y + h > height:
                raise ImageError(
                    f"WebP frame {frames} ({w}x{h} at {x},{y}) does not lie inside the "
                    f"{width}x{height} canvas"
                )
            _check_frames("webp", frames, width, height, max_pixels)
        i += 8 + size + (size & 1)  # chunks are padded to an even size
    else:
        raise ImageError(f"WebP data has more than {WEBP_MAX_CHUNKS} chunks; re-save it")
    if frames == 0:
        raise ImageError("animated WebP data has no frames (ANMF chunks)")
    return AnimationHeader("webp", width, height, frames)


_READERS = {"gif": _gif_header, "apng": _apng_header, "webp": _webp_header}


def read_animation_header(data: bytes, max_pixels: int, max_bytes: int) -> AnimationHeader:
    """The animation's canvas and frame count, checked against the limits (frames x canvas
    pixels <= ``max_pixels``, at most MAX_FRAMES frames), decoding no pixel."""
    check_bytes(len(data), max_bytes)
    kind = probe(data)
    if kind is None:
        raise ImageError("image data is not a GIF, APNG or animated WebP")
    try:
        return _READERS[kind](data, max_pixels)
    except struct.error as e:
        raise _truncated(kind, f"header cut short: {e}") from e


def decode_animation(data: bytes, header: AnimationHeader) -> tuple[Animation, list[DecodedImage]]:
    """Every frame of a checked animation, composited to the full canvas: RGB plus alpha (all
    frames keep an alpha channel when any frame has a pixel that is not opaque)."""
    frames: list[DecodedImage] = []
    durations: list[int] = []
    disposals: list[int] = []
    try:
        with Image.open(io.BytesIO(data), formats=[PIL_FORMATS[header.kind]]) as image:
            loop = image.info.get("loop")
            for index in range(header.frames):
                image.seek(index)
                image.load()
                rgba = np.asarray(image.convert("RGBA"))
                if rgba.shape[:2] != (header.height, header.width):
                    raise ImageError(
                        f"{header.kind.upper()} data is corrupt: the canvas is "
                        f"{header.width}x{header.height} but frame {index + 1} was decoded "
                        f"as {rgba.shape[1]}x{rgba.shape[0]}"
                    )
                rgb, alpha = np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3].copy()
                frames.append(DecodedImage(rgb, alpha, 4, FORMAT_OF[header.kind]))
                gif = header.kind == "gif"
                disposals.append(
                    getattr(image, "disposal_method", 0) if gif else image.info.get("disposal", 0)
                )
                durations.append(round(image.info.get("duration", 0) or 0))
    except ImageError:
        raise
    except Exception as e:  # Pillow raises OSError, EOFError, ValueError ... on bad frames
        raise ImageError(
            f"{header.kind.upper()} data could not be decoded at frame {len(frames) + 1} "
            f"({e}; truncated or corrupt?); send the complete file"
        ) from e
    alpha = any(bool((f.alpha < 255).any()) for f in frames if f.alpha is not None)
    if not alpha:
        frames = [DecodedImage(f.rgb, None, 3, f.source_format) for f in frames]
    return Animation(header.kind, durations, disposals, loop, alpha), frames


def container_of(output_format: str, kind: str, frames: int) -> str | None:
    """The animation kind an answer is written as: "auto" keeps the input's kind; png, gif
    and webp name APNG, GIF and animated WebP; None: a single frame written as a still image
    (any still format). Other formats cannot hold several frames: ImageError."""
    if output_format == "auto":
        return kind
    if output_format in CONTAINERS:
        return CONTAINERS[output_format]
    if frames == 1:
        return None
    raise ImageError(
        f"an animation of {frames} frames cannot be written as {output_format}; choose gif, "
        "png (APNG) or webp, or leave the format unset to keep the input's own"
    )


def check_animation_side(kind: str, width: int, height: int) -> None:
    """Refuse an animated answer larger than its format holds (before computing it)."""
    limit = {"gif": GIF_MAX_SIDE, "webp": WEBP_MAX_SIDE}.get(kind)
    if limit is not None and max(width, height) > limit:
        raise ImageError(
            f"{FORMAT_OF[kind]} output is limited to {limit}x{limit} pixels and the result "
            f"would be {width}x{height}; choose png (APNG)"
        )


def encode_animation(frames: list[np.ndarray], source: Animation, kind: str, quality: int) -> bytes:
    """Upscaled frames (H x W x C uint8, C = 3 or 4) written as ``kind`` with ``source``'s
    durations, disposals and loop count."""
    disposals = source.disposals
    options: dict[str, object] = {"save_all": True, "duration": source.durations}
    if source.loop is not None:
        options["loop"] = source.loop
    if kind == "gif":
        images = [to_palette(f) for f in frames]
        if source.kind == "apng":  # APNG 0 (none), 1 (background), 2 (previous) are GIF 1-3
            disposals = [{0: 1, 1: 2, 2: 3}[d] for d in disposals]
        options.update(disposal=disposals, optimize=False)
        if source.alpha:
            options["transparency"] = images[0].info.get("transparency", 255)
    else:
        images = [Image.fromarray(f) for f in frames]
        if kind == "apng":
            if source.kind == "gif":  # GIF 2 (background), 3 (previous) are APNG 1, 2
                disposals = [{2: 1, 3: 2}.get(d, 0) for d in disposals]
            options["disposal"] = disposals if source.kind != "webp" else 0
            options["blend"] = 0  # full frames replace what was there (APNG_BLEND_OP_SOURCE)
        else:
            options["quality"] = quality
    out = io.BytesIO()
    height, width = frames[0].shape[:2]
    try:
        images[0].save(
            out,
            PIL_FORMATS[kind],
            append_images=images[1:],
            **options,  # type: ignore[arg-type]
        )
    except (OSError, ValueError) as e:
        raise ImageError(
            f"{FORMAT_OF[kind]} encoding of {len(frames)} frames of {width}x{height} failed: {e}"
        ) from e
    return out.getvalue()
