"""Tile plans: cut an LR image into tiles with context, stitch the SR cores.

A plan cuts each axis into near-equal *cores* that partition the image; each core is computed
inside a *window* (the tile fed to the model) that adds context around it. All tiles of one
plan have one input shape, so tiles of one request (and of requests with the same plan) share
a batch. After inference each tile is cropped to its core and the cores are laid side by side:
no blending, and every output pixel comes from exactly one tile.

Three kinds of plan (``server/core/planner.py`` chooses per provider):

- ``plan_fit`` (CPU): the fewest near-equal tiles under a pixel cap, each window inside the
  image. Context is added only at internal seams; at the image's own borders the model sees the
  image edge exactly as whole-image inference does. An image under the cap is one tile: the
  whole image, nothing added, so the service computes what the whole-image loop computes.
- ``plan_buckets`` (GPU): window heights and widths from a few fixed sizes, the cheapest per
  axis, windows inside the image (``sized_axis``), reflected past the end only when an axis is
  shorter than its window. Few input shapes let requests share batches and keep cuDNN's
  algorithm choices and the memory arena to those shapes.
- ``plan_tiles`` (``--tiling grid``): a grid of fixed ``tile``-sized cores with ``pad`` context
  on every side, reflected in from inside the image where the window passes its border or its
  last full tile: one input shape for every image.

Tiling is exact for a pixel-wise model. RDN's receptive field is far larger than any practical
margin, but the influence of distant pixels decays fast: with a pad of 8 the seams are within
1/255 of whole-image inference (tests/bench/tiling_accuracy.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np

MAX_FIT_TILES = 256  # per axis: a plan search beyond this falls back to the grid


@dataclass(frozen=True)
class Axis:
    """One axis of a plan: where each tile's window starts and which core it contributes."""

    length: int  # of the image
    size: int  # window length, every tile
    before: int  # reflected padding added before the image (windows index the padded axis)
    after: int  # reflected padding added after it
    starts: tuple[int, ...]  # window start of each tile, in padded coordinates
    cores: tuple[tuple[int, int], ...]  # core [begin, end) of each tile, in image coordinates

    @property
    def count(self) -> int:
        return len(self.starts)

    def core_offset(self, index: int) -> int:
        """Where tile ``index``'s core begins inside its window."""
        return self.cores[index][0] + self.before - self.starts[index]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one LR image lie (all sizes in LR pixels), row-major."""

    rows: Axis
    cols: Axis

    @property
    def height(self) -> int:
        return self.rows.length

    @property
    def width(self) -> int:
        return self.cols.length

    @property
    def count(self) -> int:
        """Number of tiles, row-major order."""
        return self.rows.count * self.cols.count

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of every tile fed to the model."""
        return self.rows.size, self.cols.size

    @property
    def tile_pixels(self) -> int:
        return self.rows.size * self.cols.size

    @property
    def computed_pixels(self) -> int:
        """LR pixels the model computes for this plan (its tiles' inputs)."""
        return self.count * self.tile_pixels

    @property
    def waste(self) -> float:
        """Computed pixels per image pixel: 1.0 for whole-image inference."""
        return self.computed_pixels / (self.height * self.width)


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}: both sides must be at least 1 pixel")


def grid_axis(length: int, tile: int, pad: int) -> Axis:
    """ceil(length/tile) cores of ``tile``; windows of ``tile + 2*pad``, reflected padding."""
    count = -(-length // tile)
    return Axis(
        length=length,
        size=tile + 2 * pad,
        before=pad,
        after=count * tile - length + pad,
        starts=tuple(k * tile for k in range(count)),
        cores=tuple((k * tile, min((k + 1) * tile, length)) for k in range(count)),
    )


def plan_tiles(height: int, width: int, tile: int, pad: int) -> TilePlan:
    """The fixed-shape grid plan: ceil(H/tile) x ceil(W/tile) tiles of ``tile + 2*pad``."""
    _check_size(height, width)
    if tile < 1:
        raise ValueError(f"tile size {tile}: must be at least 1 pixel")
    if pad < 0:
        raise ValueError(f"tile pad {pad}: must be 0 or more pixels")
    return TilePlan(grid_axis(height, tile, pad), grid_axis(width, tile, pad))


def fit_axis(length: int, count: int, pad: int) -> Axis | None:
    """``count`` near-equal cores, each window inside the image with ``pad`` of context at
    every internal seam; None when such windows would not fit inside the image."""
    bounds = [k * length // count for k in range(count + 1)]
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    size = length if count == 1 else longest + 2 * pad
    if size > length or longest < 1:
        return None
    starts = tuple(min(max(bounds[k] - pad, 0), length - size) for k in range(count))
    cores = tuple((bounds[k], bounds[k + 1]) for k in range(count))
    return Axis(length, size, 0, 0, starts, cores)


def _fewest_fitting(length: int, pad: int, max_size: int) -> Axis | None:
    """The fitted axis with the fewest tiles whose windows are at most ``max_size`` long."""
    if length <= max_size:
        return fit_axis(length, 1, pad)
    if max_size <= 2 * pad:
        return None
    first = -(-length // (max_size - 2 * pad))  # cores of at most max_size - 2*pad
    for count in range(max(2, first - 1), min(length, MAX_FIT_TILES) + 1):
        axis = fit_axis(length, count, pad)
        if axis is not None and axis.size <= max_size:
            return axis
    return None


def plan_fit(height: int, width: int, pad: int, max_tile_pixels: int) -> TilePlan:
    """The plan that computes the fewest pixels with tiles of at most ``max_tile_pixels``.

    Windows lie inside the image; an image of at most ``max_tile_pixels`` is one tile, the
    whole image. Falls back to the square grid that fits the cap when no fitted plan of at
    most MAX_FIT_TILES tiles per axis does (a cap too small for the image).
    """
    _check_size(height, width)
    if pad < 0:
        raise ValueError(f"tile pad {pad}: must be 0 or more pixels")
    if max_tile_pixels < 1:
        raise ValueError(f"max_tile_pixels {max_tile_pixels}: must be at least 1")
    best: TilePlan | None = None
    for rows in range(1, min(height, MAX_FIT_TILES) + 1):
        row_axis = fit_axis(height, rows, pad)
        if row_axis is None:
            continue
        if best is not None and rows * row_axis.size * width > best.computed_pixels:
            break  # more rows only add seams: nothing better follows
        col_axis = _fewest_fitting(width, pad, max_tile_pixels // row_axis.size)
        if col_axis is None:
            continue
        plan = TilePlan(row_axis, col_axis)
        if best is None or plan.computed_pixels < best.computed_pixels:
            best = plan
    if best is not None:
        return best
    side = max(1, int(max_tile_pixels**0.5) - 2 * pad)
    return plan_tiles(height, width, side, pad)


def sized_axis(length: int, size: int, pad: int) -> Axis:
    """Windows of exactly ``size`` (a GPU shape bucket): one window reflected past the end of a
    shorter axis, else the fewest near-equal cores whose windows (inside the axis, ``pad`` of
    context at every internal seam) fit in ``size``, each window widened to ``size``."""
    if size <= 2 * pad:
        raise ValueError(f"bucket window {size} must be larger than twice the pad {pad}")
    if length <= size:
        return Axis(length, size, 0, size - length, (0,), ((0, length),))
    count = max(2, -(-(length - 2 * pad) // (size - 2 * pad)))
    while True:
        fitted = fit_axis(length, count, pad)
        if fitted is not None and fitted.size <= size:
            break
        count += 1
    starts = tuple(
        min(max((a + b - size) // 2, 0), length - size) for a, b in fitted.cores
    )  # each window centred on its core, moved inside the axis
    return Axis(length, size, 0, 0, starts, fitted.cores)


def plan_buckets(height: int, width: int, sizes: tuple[int, ...], pad: int) -> TilePlan:
    """The cheapest plan whose window height and width are each one of ``sizes`` (GPU buckets).

    Computed pixels are (rows x window height) x (cols x window width), so each axis takes the
    size with the least ``count * size`` on its own (a tie goes to the larger window: fewer
    tiles). All tiles of a plan share one shape, so they batch with other requests' tiles of
    that shape, and the engine only ever sees ``len(sizes)**2`` input shapes.
    """
    _check_size(height, width)
    if not sizes:
        raise ValueError("plan_buckets needs at least one window size")

    def cheapest(length: int) -> Axis:
        axes = [sized_axis(length, size, pad) for size in sizes]
        return min(axes, key=lambda a: (a.count * a.size, -a.size))

    return TilePlan(cheapest(height), cheapest(width))


def _reflect_pad(image: np.ndarray, axis: int, before: int, after: int) -> np.ndarray:
    """Pad one axis by mirror reflection (edge pixel not repeated); a 1-pixel axis is repeated.

    Reflection longer than the axis folds back and forth (numpy does this for any length >= 2).
    """
    if before == 0 and after == 0:
        return image
    widths = [(0, 0)] * image.ndim
    widths[axis] = (before, after)
    mode = "reflect" if image.shape[axis] > 1 else "edge"
    return np.pad(image, widths, mode=mode)


def _reflect_index(axis: Axis) -> np.ndarray:
    """Source index of every position of the padded axis."""
    return _reflect_pad(np.arange(axis.length), 0, axis.before, axis.after)


def _check_image(image: np.ndarray, plan: TilePlan) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image shape {image.shape}: expected [3, H, W]")
    if image.shape[1:] != (plan.height, plan.width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[2]} but the plan is for "
            f"{plan.height}x{plan.width}"
        )


def _check_range(plan: TilePlan, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= plan.count:
        raise ValueError(f"tile range [{start}, {stop}) is not inside [0, {plan.count})")


def split_tile_range(image: np.ndarray, plan: TilePlan, start: int, stop: int) -> np.ndarray:
    """Tiles ``start .. stop`` (row-major) of ``image`` [3, H, W]: ``[stop-start, 3, h, w]``.

    Same tiles as ``split_tiles(image, plan)[start:stop]``, in the image's own dtype, without
    padding or copying the whole image: only the rows of the tile rows in the range are read.
    ``image`` may be a strided view (e.g. ``rgb.transpose(2, 0, 1)`` of an H x W x 3 array).
    """
    _check_image(image, plan)
    _check_range(plan, start, stop)
    rows, cols = plan.rows, plan.cols
    row_index, col_index = _reflect_index(rows), _reflect_index(cols)
    tiles = np.empty((stop - start, 3, rows.size, cols.size), image.dtype)
    for row in range(start // cols.count, -(-stop // cols.count)):
        first = max(start, row * cols.count) - row * cols.count  # columns of this row in range
        last = min(stop, (row + 1) * cols.count) - row * cols.count
        top = rows.starts[row]
        left, right = cols.starts[first], cols.starts[last - 1] + cols.size
        band = image[:, row_index[top : top + rows.size]][:, :, col_index[left:right]]
        for col in range(first, last):
            offset = cols.starts[col] - left
            tiles[row * cols.count + col - start] = band[:, :, offset : offset + cols.size]
    return tiles


def split_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Cut ``image`` [3, H, W] into ``[plan.count, 3, h, w]`` float32 tiles, row-major."""
    tiles = split_tile_range(image, plan, 0, plan.count)
    return tiles.astype(np.float32, copy=False)


def merge_tile_range_into(
    canvas: np.ndarray,
    outputs: np.ndarray,
    plan: TilePlan,
    scale: int,
    start: int,
    stop: int,
) -> None:
    """Write the cores of SR tiles ``start .. stop`` into ``canvas`` [3, s*H, s*W] in place.

    ``outputs`` is ``[stop-start, 3, s*h, s*w]``; each tile is cropped to its core. Values are
    cast to the canvas's dtype as numpy assignment does; ``canvas`` may be a strided view (e.g.
    ``sr.transpose(2, 0, 1)`` of an sH x sW x 3 array). Merging every range of a partition of
    ``[0, plan.count)`` gives ``merge_tiles``.
    """
    if scale < 1:
        raise ValueError(f"scale {scale}: must be at least 1")
    _check_range(plan, start, stop)
    rows, cols = plan.rows, plan.cols
    expected = (stop - start, 3, scale * rows.size, scale * cols.size)
    if outputs.shape != expected:
        raise ValueError(
            f"tile outputs have shape {outputs.shape}; expected {expected} for tiles "
            f"{start}..{stop} of {rows.size}x{cols.size} LR pixels at x{scale}"
        )
    if canvas.shape != (3, scale * plan.height, scale * plan.width):
        raise ValueError(
            f"canvas shape {canvas.shape}: expected {(3, scale * plan.height, scale * plan.width)}"
        )
    # A canvas that is the channel-first view of a C-contiguous H x W x 3 uint8 image gets each
    # piece interleaved by OpenCV (cv2.merge), about 20x faster than numpy's strided writes.
    hwc = canvas.transpose(1, 2, 0)
    interleave = hwc.flags.c_contiguous and canvas.dtype == outputs.dtype == np.uint8
    for index in range(start, stop):
        row, col = divmod(index, cols.count)
        (top, bottom), (left, right) = rows.cores[row], cols.cores[col]
        y, x = scale * rows.core_offset(row), scale * cols.core_offset(col)
        h, w = scale * (bottom - top), scale * (right - left)
        piece = outputs[index - start, :, y : y + h, x : x + w]
        region = (slice(scale * top, scale * bottom), slice(scale * left, scale * right))
        if interleave:
            hwc[region] = cv2.merge(tuple(piece))
        else:
            canvas[:, region[0], region[1]] = piece


def merge_tiles(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Stitch SR tiles ``[count, 3, s*h, s*w]`` into ``[3, s*H, s*W]``: each tile cropped to
    its core, the cores side by side."""
    if scale < 1:
        raise ValueError(f"scale {scale}: must be at least 1")
    canvas = np.empty((3, scale * plan.height, scale * plan.width), outputs.dtype)
    merge_tile_range_into(canvas, outputs, plan, scale, 0, plan.count)
    return canvas
