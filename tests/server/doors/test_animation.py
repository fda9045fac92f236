"""Animations (GIF, APNG, animated WebP) and HEIC/AVIF through a real server on loopback: the
rdn.v1 gRPC door (UpscaleClient), the HTTP door, and the local API, on files made here.

Each frame's expected pixels come from the same server upscaling that frame as a still PNG,
so decoding, per-frame compositing, batching, stitching and encoding are all checked."""

from __future__ import annotations

import io
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pillow_heif
import pytest
from PIL import Image

from server.client import UpscaleClient, UpscaleError
from server.config import ServerConfig, TilingConfig
from server.imaging.codec import decode_image
from server.imaging.options import ImageOptions
from server.local import LocalUpscaler
from tests.background import BackgroundServer
from tests.server.imaging.test_animation_hostile import (
    apng_declaring,
    gif_with_frames,
    heic_file,
    patch_ispe,
)
from tests.server.loopback import MAX_BATCH, NO_RETRY, PAD, TILE, loopback_config

FRAMES, SIDE = 8, 24  # 8 frames of 24x24: one 32x32 tile each, MAX_BATCH (4) per engine call
DURATIONS = [40, 50, 60, 70, 80, 90, 100, 110]


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    return loopback_config(tiny_onnx_x2, http_port=0)


def frames(alpha: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth RGB(A) frames (a moving gradient; a transparent corner with alpha)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for k in range(FRAMES):
        rgb = np.stack([(x * 9 + k * 20) % 256, (y * 7 + seed) % 256, (x + y) * 4 % 256], -1)
        if alpha:
            a = np.full((SIDE, SIDE), 255)
            a[: 6 + k, :6] = 0
            rgb = np.dstack([rgb, a])
        out.append(rgb.astype(np.uint8))
    return out


def animation(fmt: str, pixels: list[np.ndarray], **options: object) -> bytes:
    images = [Image.fromarray(p) for p in pixels]
    out = io.BytesIO()
    images[0].save(
        out, fmt, save_all=True, append_images=images[1:], duration=DURATIONS, loop=3, **options
    )
    return out.getvalue()


def read_frames(data: bytes) -> tuple[Image.Image, list[np.ndarray], list[int], list[int]]:
    """(image, RGBA frames, durations, disposals) as Pillow reads them."""
    image = Image.open(io.BytesIO(data))
    pixels, durations, disposals = [], [], []
    for k in range(image.n_frames):
        image.seek(k)
        image.load()
        pixels.append(np.asarray(image.convert("RGBA")).copy())
        durations.append(round(image.info.get("duration", 0)))
        disposals.append(
            getattr(image, "disposal_method", 0)
            if image.format == "GIF"
            else image.info.get("disposal", 0)
        )
    return image, pixels, durations, disposals


def still(client: UpscaleClient, rgba: np.ndarray) -> np.ndarray:
    """The server's answer for one frame sent as a still RGBA PNG, its alpha by bicubic as an
    animation's is (docs/serving.md)."""
    png = io.BytesIO()
    Image.fromarray(rgba).save(png, "PNG")
    answer = client.upscale(png.getvalue(), image=ImageOptions(alpha="bicubic")).image
    return np.asarray(Image.open(io.BytesIO(answer)).convert("RGBA"))


CASES = {
    "gif": ("GIF", {"disposal": [1, 2, 1, 2, 1, 1, 2, 1]}, "image/gif"),
    "apng": ("PNG", {"disposal": [0, 1, 2, 0, 1, 0, 0, 1], "blend": 0}, "image/png"),
    "webp": ("WEBP", {"lossless": True}, "image/webp"),
}


@pytest.mark.parametrize("kind", CASES)
def test_animation_comes_back_in_its_own_format_with_its_timing(
    client: UpscaleClient, kind: str
) -> None:
    fmt, options, _ = CASES[kind]
    sent = animation(fmt, frames(alpha=True), **options)
    _, inputs, _, in_disposals = read_frames(sent)
    result = client.upscale(sent, "auto")
    assert (result.frames, result.width, result.height) == (FRAMES, 2 * SIDE, 2 * SIDE)
    image, outputs, durations, disposals = read_frames(result.image)
    assert image.format == fmt and image.n_frames == FRAMES
    assert image.info.get("loop") == 3
    assert durations == DURATIONS
    if kind != "webp":  # Pillow exposes no per-frame disposal of WebP (its reader composites)
        assert disposals == in_disposals == options["disposal"]
    for k, (source, answer) in enumerate(zip(inputs, outputs, strict=True)):
        expected = still(client, source)
        opaque = expected[:, :, 3] >= 128
        assert ((answer[:, :, 3] >= 128) == opaque).mean() > 0.97, f"frame {k}: alpha"
        error = np.abs(answer[:, :, :3].astype(int) - expected[:, :, :3])[opaque]
        if kind == "apng":  # lossless all the way: the same pixels as the still
            np.testing.assert_array_equal(answer, expected)
        else:  # GIF: a 255-colour median-cut palette per frame; WebP: lossy at quality 95
            bound = 10  # the tiny test model's output is noisy: hard on palettes and codecs
            assert error.mean() < bound, f"frame {k}: mean error {error.mean():.1f}"


def test_explicit_formats_convert_animations_and_jpeg_is_refused(client: UpscaleClient) -> None:
    gif = animation("GIF", frames())
    as_png = client.upscale(gif, "png")
    assert Image.open(io.BytesIO(as_png.image)).n_frames == FRAMES  # an APNG
    as_webp = client.upscale(gif, "webp")
    assert Image.open(io.BytesIO(as_webp.image)).n_frames == FRAMES
    with pytest.raises(UpscaleError) as info:
        client.upscale(gif, "jpeg")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be written as jpeg; choose gif, png (APNG) or webp" in str(info.value)


def test_one_animations_frames_share_engine_batches(
    server: BackgroundServer, client: UpscaleClient
) -> None:
    """8 one-tile frames in one request: at most ceil(8 / MAX_BATCH) + 1 engine calls (the
    first tile goes at once to an idle engine), one of them a full batch; two chunks in
    flight (a still image's rule) would have needed at least 4."""
    assert server.running is not None
    batcher = server.running.batcher
    calls, sizes = batcher.engine_calls, dict(batcher.batch_sizes)
    client.upscale(animation("PNG", frames(seed=7)), "auto")
    new_calls = batcher.engine_calls - calls
    grown = {s: n - sizes.get(s, 0) for s, n in batcher.batch_sizes.items() if n > sizes.get(s, 0)}
    assert sum(size * n for size, n in grown.items()) == FRAMES
    assert new_calls <= math.ceil(FRAMES / MAX_BATCH) + 1, grown
    assert max(grown) == MAX_BATCH, grown


def test_http_door_keeps_the_animation(server: BackgroundServer) -> None:
    assert server.running is not None and server.running.http is not None
    sent = animation("GIF", frames(alpha=True))
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.running.http.port}/v1/upscale", data=sent, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.headers["Content-Type"] == "image/gif"
        assert answer.headers["X-Frames"] == str(FRAMES)
        body = answer.read()
    assert Image.open(io.BytesIO(body)).n_frames == FRAMES


def test_local_api_upscales_an_animation_like_the_server(
    client: UpscaleClient, tiny_onnx_x2: Path
) -> None:
    sent = animation("PNG", frames(), disposal=0, blend=0)
    tiling = TilingConfig(mode="grid", tile=TILE, pad=PAD)  # the server's
    local = LocalUpscaler(tiny_onnx_x2, tiling=tiling).upscale_bytes(sent)
    assert (local.format, local.frames) == ("png", FRAMES)
    remote = client.upscale(sent, "auto")
    for mine, theirs in zip(read_frames(local.image)[1], read_frames(remote.image)[1], strict=True):
        np.testing.assert_array_equal(mine, theirs)


def heif(fmt: str, rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    if fmt == "heic":
        pillow_heif.from_pillow(Image.fromarray(rgb)).save(out, quality=90)
    else:
        Image.fromarray(rgb).save(out, "AVIF", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_heic_and_avif_in_give_the_upscale_of_their_pixels(client: UpscaleClient, fmt: str) -> None:
    rgb = frames()[3][:20, :22, :3]
    data = heif(fmt, rgb)
    decoded = decode_image(data, 10**6, 10**8)
    assert decoded.source_format == fmt and decoded.rgb.shape == (20, 22, 3)
    answer = client.upscale(data)  # no format: PNG
    assert answer.format == "png" and (answer.width, answer.height) == (44, 40)
    reference = client.upscale(decoded.rgb, "png")  # the decoded pixels, sent raw
    assert answer.image == reference.image


def test_avif_out_decodes_to_the_upscaled_image(client: UpscaleClient) -> None:
    rgb = frames()[0][:, :, :3]
    png = client.upscale(rgb, "png")
    avif = client.upscale(rgb, "avif", quality=95)
    assert avif.format == "avif"
    image = Image.open(io.BytesIO(avif.image))
    assert image.format == "AVIF" and image.size == (2 * SIDE, 2 * SIDE)
    expected = np.asarray(Image.open(io.BytesIO(png.image)).convert("RGB")).astype(int)
    assert np.abs(np.asarray(image.convert("RGB")) - expected).mean() < 10  # lossy, noisy image


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[UpscaleClient]:
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c:
        yield c


@pytest.mark.parametrize(
    ("make", "code", "fragment"),
    [
        (lambda: gif_with_frames(100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "frames"),
        (lambda: gif_with_frames(3)[:-4], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (lambda: apng_declaring(1_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "frames"),
        (lambda: patch_ispe(heic_file(), 60000, 60000), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "over --max-pixels"),
    ],
)  # fmt: skip
def test_hostile_files_get_their_status_through_the_door(
    client: UpscaleClient, make, code: grpc.StatusCode, fragment: str
) -> None:
    with pytest.raises(UpscaleError) as info:
        client.upscale(make())
    assert info.value.code == code and fragment in str(info.value)
