"""Tiling contract: split then merge is exact for pixel-wise models, tiles have one shape,
context comes from the right place, and a real model's tiled output matches whole-image inference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import TilingConfig
from server.core.tiling import (
    TilePlan,
    merge_tile_range_into,
    merge_tiles,
    plan_buckets,
    plan_fit,
    plan_tiles,
    split_tile_range,
    split_tiles,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "server" / "models" / "default_x2.onnx"


def nearest_upscale(batch: np.ndarray, scale: int) -> np.ndarray:
    """A pixel-wise 'model': nearest-neighbour upscale of [N, 3, h, w] (or [3, h, w])."""
    return batch.repeat(scale, axis=-2).repeat(scale, axis=-1)


def box_blur(batch: np.ndarray, radius: int) -> np.ndarray:
    """A 'model' with receptive-field radius ``radius``: box mean with zero padding, like a conv."""
    padded = np.pad(batch, [(0, 0)] * (batch.ndim - 2) + [(radius, radius)] * 2)
    out = np.zeros_like(batch)
    h, w = batch.shape[-2:]
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += padded[..., dy : dy + h, dx : dx + w]
    return out / (2 * radius + 1) ** 2


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, height, width), dtype=np.float32)


def roundtrip(image: np.ndarray, tile: int, pad: int, scale: int) -> tuple[np.ndarray, TilePlan]:
    plan = plan_tiles(image.shape[1], image.shape[2], tile, pad)
    tiles = split_tiles(image, plan)
    return merge_tiles(nearest_upscale(tiles, scale), plan, scale), plan


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (1, 7), (7, 1), (2, 2), (63, 65), (64, 64), (129, 1), (1, 129), (65, 64), (200, 3)],
)
@pytest.mark.parametrize(("tile", "pad"), [(16, 0), (16, 16), (32, 5), (64, 10), (64, 16)])
def test_split_merge_identity_is_exact(height: int, width: int, tile: int, pad: int) -> None:
    image = random_image(height, width)
    for scale in (2, 3, 4):
        merged, _ = roundtrip(image, tile, pad, scale)
        np.testing.assert_array_equal(merged, nearest_upscale(image, scale))


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 150),
    width=st.integers(1, 150),
    tile=st.sampled_from([16, 32, 64]),
    pad=st.integers(0, 16),
    scale=st.integers(2, 4),
)
def test_split_merge_identity_property(
    height: int, width: int, tile: int, pad: int, scale: int
) -> None:
    image = random_image(height, width, seed=height * 1000 + width)
    merged, plan = roundtrip(image, tile, pad, scale)
    np.testing.assert_array_equal(merged, nearest_upscale(image, scale))
    assert merged.shape == (3, scale * height, scale * width)
    assert plan.count == -(-height // tile) * -(-width // tile)


@pytest.mark.parametrize(
    ("height", "width", "tile", "rows", "cols"),
    [(1, 1, 64, 1, 1), (64, 64, 64, 1, 1), (65, 64, 64, 2, 1), (63, 129, 64, 1, 3),
     (256, 256, 64, 4, 4), (4096, 4096, 64, 64, 64), (100, 33, 16, 7, 3)],
)  # fmt: skip
def test_plan_counts(height: int, width: int, tile: int, rows: int, cols: int) -> None:
    plan = plan_tiles(height, width, tile, 10)
    assert (plan.rows.count, plan.cols.count, plan.count) == (rows, cols, rows * cols)
    assert plan.input_shape == (tile + 20, tile + 20)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (1, 300), (300, 1), (150, 97)])
def test_every_tile_has_one_shape(height: int, width: int) -> None:
    plan = plan_tiles(height, width, 32, 8)
    tiles = split_tiles(random_image(height, width), plan)
    assert tiles.shape == (plan.count, 3, 48, 48)
    assert tiles.dtype == np.float32 and tiles.flags.c_contiguous
    assert np.isfinite(tiles).all()


def test_tile_core_and_context_come_from_the_right_pixels() -> None:
    image = random_image(100, 70)
    plan = plan_tiles(100, 70, 32, 4)
    tiles = split_tiles(image, plan)
    # Tile (1, 1) is interior: its input window is rows 28..68, cols 28..68 of the image.
    np.testing.assert_array_equal(tiles[1 * plan.cols.count + 1], image[:, 28:68, 28:68])
    # Tile (0, 0): the top/left margin is the mirror image of rows/cols 1..4 (edge not repeated).
    first = tiles[0]
    np.testing.assert_array_equal(first[:, 4:, 4:], image[:, :36, :36])
    np.testing.assert_array_equal(first[:, 3, 4:], image[:, 1, :36])
    np.testing.assert_array_equal(first[:, 4:, 0], image[:, :36, 4])


@pytest.mark.parametrize("radius", [1, 3])
def test_context_margin_makes_local_models_exact(radius: int) -> None:
    """With pad >= the receptive-field radius, tiling equals whole-image inference on the
    image reflect-padded by ``pad``; with a smaller pad it does not (so the check can fail)."""
    image = random_image(70, 90, seed=3)
    for pad, exact in ((radius, True), (radius + 2, True), (radius - 1, False)):
        plan = plan_tiles(70, 90, 32, pad)
        tiled = merge_tiles(box_blur(split_tiles(image, plan), radius), plan, 1)
        reference = box_blur(
            np.pad(image, [(0, 0), (pad, pad), (pad, pad)], mode="reflect"), radius
        )
        reference = reference[:, pad : pad + 70, pad : pad + 90]
        assert np.allclose(tiled, reference, atol=1e-6) == exact, f"pad {pad}"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: plan_tiles(0, 5, 64, 10), "at least 1 pixel"),
        (lambda: plan_tiles(5, 5, 0, 10), "tile size 0"),
        (lambda: plan_tiles(5, 5, 64, -1), "tile pad -1"),
        (lambda: split_tiles(np.zeros((3, 5, 6), np.float32), plan_tiles(6, 5, 4, 1)), "plan is"),
        (lambda: split_tiles(np.zeros((5, 6), np.float32), plan_tiles(5, 6, 4, 1)), "[3, H, W]"),
        (
            lambda: merge_tiles(np.zeros((2, 3, 12, 12), np.float32), plan_tiles(5, 6, 4, 1), 2),
            "expected (4, 3, 12, 12)",
        ),
    ],
)
def test_bad_arguments_are_refused_with_the_cause(call, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value)


# --- a real model: tiled output vs whole-image inference --------------------------------------


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def to_u8(chw: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chw * 255.0), 0, 255).astype(np.uint8)


def tiled_vs_whole(model: Path, image: np.ndarray, tile: int, pad: int) -> tuple[float, int]:
    """(PSNR dB, max abs diff in 8-bit levels) of tiled vs whole-image inference.

    The whole image is reflect-padded by ``pad`` like the tiles are at image borders, so the
    difference measures the seams alone.
    """
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    h, w = image.shape[1:]
    plan = plan_tiles(h, w, tile, pad)
    tiles = split_tiles(image, plan)
    outputs = np.concatenate(
        [session.run(None, {name: tiles[i : i + 8]})[0] for i in range(0, len(tiles), 8)]
    )
    scale = outputs.shape[-1] // plan.input_shape[1]
    tiled = merge_tiles(outputs, plan, scale)
    padded = np.pad(image, [(0, 0), (pad, pad), (pad, pad)], mode="reflect")
    whole = session.run(None, {name: padded[None]})[0][0]
    whole = whole[:, scale * pad : scale * (pad + h), scale * pad : scale * (pad + w)]
    a, b = to_u8(tiled), to_u8(whole)
    return psnr_u8(a, b), int(np.abs(a.astype(int) - b.astype(int)).max())


def astronaut_lr() -> np.ndarray:
    """A real photo as LR input: skimage's astronaut, bicubic-downscaled to 256x256, [3, H, W]."""
    from PIL import Image
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0


def test_tiny_model_tiled_matches_whole_with_default_pad(tiny_onnx_x2: Path) -> None:
    image = astronaut_lr()
    tiling = TilingConfig()
    psnr, max_diff = tiled_vs_whole(tiny_onnx_x2, image, tiling.tile, tiling.pad)
    assert psnr >= 60.0 and max_diff <= 1, (psnr, max_diff)  # measured: >= 100 dB, 1 level
    # Without context the seams are plain to see: the check above can fail.
    psnr0, max_diff0 = tiled_vs_whole(tiny_onnx_x2, image, tiling.tile, 0)
    assert psnr0 < 45.0 and max_diff0 > 10, (psnr0, max_diff0)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not trained yet")
def test_default_model_tiled_matches_whole_with_default_pad() -> None:
    """The criterion the default pad was chosen by (tests/bench/tiling_accuracy.py): a small
    preset x2 model trained 300 steps measured 79 dB / max 1 level at pad 8 on this image."""
    tiling = TilingConfig()
    psnr, max_diff = tiled_vs_whole(DEFAULT_MODEL, astronaut_lr(), tiling.tile, tiling.pad)
    assert psnr >= 50.0 and max_diff <= 2, (psnr, max_diff)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    tile=st.integers(1, 12),
    pad=st.integers(0, 6),
    chunk=st.integers(1, 7),
)
def test_range_wise_split_and_merge_equal_the_whole_image_versions(
    height: int, width: int, tile: int, pad: int, chunk: int
) -> None:
    """Splitting and merging chunk by chunk, from a strided uint8 H x W x 3 view into a
    strided uint8 canvas, gives exactly the whole-image results (the server's chunked path)."""
    rng = np.random.default_rng(height * 1000 + width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    plan = plan_tiles(height, width, tile, pad)
    whole = split_tiles(rgb.transpose(2, 0, 1).astype(np.float32), plan)
    outputs = nearest_upscale(whole, 2)
    expected = merge_tiles(outputs, plan, 2)
    canvas = np.zeros((2 * height, 2 * width, 3), np.uint8)
    for start in range(0, plan.count, chunk):
        stop = min(start + chunk, plan.count)
        part = split_tile_range(rgb.transpose(2, 0, 1), plan, start, stop)
        assert part.dtype == np.uint8
        np.testing.assert_array_equal(part.astype(np.float32), whole[start:stop])
        merge_tile_range_into(
            canvas.transpose(2, 0, 1), nearest_upscale(part, 2), plan, 2, start, stop
        )
    np.testing.assert_array_equal(canvas.transpose(2, 0, 1), expected)
    np.testing.assert_array_equal(
        canvas.transpose(2, 0, 1), nearest_upscale(rgb.transpose(2, 0, 1), 2)
    )


def test_tile_ranges_outside_the_plan_are_refused() -> None:
    plan = plan_tiles(10, 10, 4, 1)  # 9 tiles
    image = random_image(10, 10)
    with pytest.raises(ValueError, match=r"tile range \[3, 10\) is not inside \[0, 9\)"):
        split_tile_range(image, plan, 3, 10)
    canvas = np.zeros((3, 20, 20), np.float32)
    outputs = np.zeros((2, 3, 12, 12), np.float32)
    with pytest.raises(ValueError, match=r"tile range \[5, 3\)"):
        merge_tile_range_into(canvas, outputs, plan, 2, 5, 3)
    with pytest.raises(ValueError, match=r"canvas shape \(3, 20, 21\)"):
        merge_tile_range_into(np.zeros((3, 20, 21), np.float32), outputs, plan, 2, 0, 2)


# --- fitted plans (the CPU's) --------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    height=st.integers(1, 700),
    width=st.integers(1, 700),
    pad=st.integers(0, 12),
    cap=st.integers(1, 200_000),
)
def test_fitted_plans_cover_the_image_once_with_windows_inside_it(
    height: int, width: int, pad: int, cap: int
) -> None:
    plan = plan_fit(height, width, pad, cap)
    padded = (plan.rows.before, plan.rows.after, plan.cols.before, plan.cols.after)
    if any(padded):  # no fitted plan under the cap: the documented grid fallback
        assert plan == plan_tiles(height, width, max(1, int(cap**0.5) - 2 * pad), pad)
        return
    assert plan.tile_pixels <= cap
    for axis in (plan.rows, plan.cols):
        assert (axis.before, axis.after) == (0, 0)
        assert [c for core in axis.cores for c in core][1:-1:2] == [
            c for core in axis.cores for c in core
        ][2::2]  # cores touch: each begins where the last ended
        assert axis.cores[0][0] == 0 and axis.cores[-1][1] == axis.length
        for start, (begin, end) in zip(axis.starts, axis.cores, strict=True):
            assert start >= 0 and start + axis.size <= axis.length  # window inside the image
            assert start <= begin and end <= start + axis.size  # the core inside its window
            # pad of context before and after each core, or the image's own edge there (where
            # the window sees what whole-image inference sees)
            assert start == 0 or begin - start >= pad
            assert start + axis.size == axis.length or start + axis.size - end >= pad
    if height * width <= cap:
        assert plan.count == 1 and plan.waste == 1.0  # the whole image, nothing added


@pytest.mark.parametrize(
    ("height", "width", "count", "waste"),
    [(160, 240, 1, 1.0), (384, 512, 1, 1.0), (768, 1024, 4, 1.06), (4096, 4096, 72, 1.07)],
)
def test_fitted_plans_of_photo_sizes_waste_little(
    height: int, width: int, count: int, waste: float
) -> None:
    """A 240x160 photo cost 2.0x its pixels in 64x64 grid tiles with 8 px of context."""
    plan = plan_fit(height, width, 8, 512 * 512)
    assert plan.count == count and plan.waste == pytest.approx(waste, abs=0.01)
    grid = plan_tiles(height, width, 64, 8)
    assert plan.waste < grid.waste


@pytest.mark.parametrize(("height", "width", "cap"), [(37, 53, 10**6), (70, 90, 30 * 30)])
def test_fitted_split_and_merge_return_the_image(height: int, width: int, cap: int) -> None:
    image = random_image(height, width, seed=4)
    plan = plan_fit(height, width, 3, cap)
    for scale in (1, 3):
        merged = merge_tiles(nearest_upscale(split_tiles(image, plan), scale), plan, scale)
        np.testing.assert_array_equal(merged, nearest_upscale(image, scale))


def test_fitted_context_makes_local_models_exact_against_the_plain_whole_image() -> None:
    """At image borders a fitted tile sees the image edge itself (the model's zero padding),
    so with pad >= the receptive field tiling equals plain whole-image inference."""
    image = random_image(70, 90, seed=3)
    for pad, exact in ((3, True), (2, False)):
        plan = plan_fit(70, 90, pad, 40 * 40)
        assert plan.count > 1
        tiled = merge_tiles(box_blur(split_tiles(image, plan), 3), plan, 1)
        assert np.allclose(tiled, box_blur(image, 3), atol=1e-6) == exact, f"pad {pad}"


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not trained yet")
def test_default_model_fitted_tiles_match_the_whole_image() -> None:
    """The shipped model, fitted tiles forced by a small cap, against plain whole-image
    inference: within 1/255 (measured 88.0 dB, max 1 level, 10 tiles at pad 8)."""
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = astronaut_lr()
    plan = plan_fit(256, 256, 8, 100 * 100)
    assert plan.count == 10
    outputs = np.concatenate(
        [session.run(None, {name: t[None]})[0] for t in split_tiles(image, plan)]
    )
    tiled = to_u8(merge_tiles(outputs, plan, 2))
    whole = to_u8(session.run(None, {name: image[None]})[0][0])
    assert int(np.abs(tiled.astype(int) - whole.astype(int)).max()) <= 1


def test_default_model_bucket_tiles_match_the_whole_image() -> None:
    """The shipped model on a bucket plan whose windows (80x80) lie inside the image, 8 px of
    context at each seam, run here on the CPU, against plain whole-image inference: within
    1/255, as the fitted plans. (An axis shorter than its window is reflected past its end,
    the grid's border handling.)"""
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = astronaut_lr()
    plan = plan_buckets(256, 256, (80,), 8)
    assert plan.input_shape == (80, 80) and plan.count == 16
    assert (plan.rows.after, plan.cols.after) == (0, 0)  # nothing reflected
    outputs = np.concatenate(
        [session.run(None, {name: t[None]})[0] for t in split_tiles(image, plan)]
    )
    tiled = to_u8(merge_tiles(outputs, plan, 2))
    whole = to_u8(session.run(None, {name: image[None]})[0][0])
    assert int(np.abs(tiled.astype(int) - whole.astype(int)).max()) <= 1
