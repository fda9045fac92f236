"""Fixed-shape tiling: cut an LR image into equal tiles with context, stitch the SR cores.

Every tile has the same shape ``[3, tile + 2*pad, tile + 2*pad]`` so tiles from any number of
requests can share one batch and one cuDNN algorithm / CUDA graph. The context margin (``pad``)
comes from the neighbouring pixels inside the image and from reflection outside it: at image
borders, past the last row/column of a size that is not a multiple of ``tile``, and all around an
image smaller than one tile. After inference each tile is cropped to its core and the cores are
laid side by side, so there is no blending and every output pixel comes from exactly one tile.

Tiling is exact for a pixel-wise model. RDN's receptive field is far larger than any practical
margin, but the influence of distant pixels decays fast: with the default pad of 8 the tiled
output is within 1/255 of whole-image inference (about 78 dB PSNR, small preset x2; measured by
tests/bench/tiling_accuracy.py). At image borders, reflected context replaces the model's zero
padding; against the ground truth that scores slightly higher than whole-image inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one LR image lie (all sizes in LR pixels)."""

    height: int  # LR image size
    width: int
    tile: int  # core size of every tile
    pad: int  # context margin on every side of every tile
    rows: int  # tiles down
    cols: int  # tiles across

    @property
    def count(self) -> int:
        """Number of tiles, row-major order."""
        return self.rows * self.cols

    @property
    def input_size(self) -> int:
        """Side of every tile fed to the model: ``[3, input_size, input_size]``."""
        return self.tile + 2 * self.pad


def plan_tiles(height: int, width: int, tile: int, pad: int) -> TilePlan:
    """Plan the tiles of an ``height`` x ``width`` LR image; ceil(H/tile) x ceil(W/tile) tiles."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width}: both sides must be at least 1 pixel")
    if tile < 1:
        raise ValueError(f"tile size {tile}: must be at least 1 pixel")
    if pad < 0:
        raise ValueError(f"tile pad {pad}: must be 0 or more pixels")
    rows = -(-height // tile)
    cols = -(-width // tile)
    return TilePlan(height=height, width=width, tile=tile, pad=pad, rows=rows, cols=cols)


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


def _reflect_index(size: int, before: int, after: int) -> np.ndarray:
    """Source index of every position of one axis padded as ``_reflect_pad`` pads it."""
    return _reflect_pad(np.arange(size), 0, before, after)


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
    """Tiles ``start .. stop`` (row-major) of ``image`` [3, H, W]: ``[stop-start, 3, in, in]``.

    Same tiles as ``split_tiles(image, plan)[start:stop]``, in the image's own dtype, without
    padding or copying the whole image: only the rows of the tile rows in the range are read.
    ``image`` may be a strided view (e.g. ``rgb.transpose(2, 0, 1)`` of an H x W x 3 array).
    """
    _check_image(image, plan)
    _check_range(plan, start, stop)
    tile, pad, size = plan.tile, plan.pad, plan.input_size
    rows = _reflect_index(plan.height, pad, plan.rows * tile - plan.height + pad)
    cols = _reflect_index(plan.width, pad, plan.cols * tile - plan.width + pad)
    tiles = np.empty((stop - start, 3, size, size), image.dtype)
    for row in range(start // plan.cols, -(-stop // plan.cols)):
        first = max(start, row * plan.cols) - row * plan.cols  # columns of this row in range
        last = min(stop, (row + 1) * plan.cols) - row * plan.cols
        band_cols = cols[first * tile : (last - 1) * tile + size]
        band = image[:, rows[row * tile : row * tile + size]][:, :, band_cols]
        out = row * plan.cols + first - start
        windows = np.lib.stride_tricks.sliding_window_view(band, size, axis=2)[:, :, ::tile]
        tiles[out : out + last - first] = windows.transpose(2, 0, 1, 3)
    return tiles


def split_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Cut ``image`` [3, H, W] into ``[plan.count, 3, input_size, input_size]`` tiles, row-major.

    Tile (r, c) covers LR rows ``r*tile - pad .. (r+1)*tile + pad`` (and the same for columns);
    whatever falls outside the image is reflected in from inside it.
    """
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

    ``outputs`` is ``[stop-start, 3, s*in, s*in]``; each tile's ``s*pad`` margin is dropped
    and the part of its core past the image's bottom/right edge is cut off. Values are cast
    to the canvas's dtype as numpy assignment does; ``canvas`` may be a strided view (e.g.
    ``sr.transpose(2, 0, 1)`` of an sH x sW x 3 array). Merging every range of a partition of
    ``[0, plan.count)`` gives ``merge_tiles``.
    """
    if scale < 1:
        raise ValueError(f"scale {scale}: must be at least 1")
    _check_range(plan, start, stop)
    side = scale * plan.input_size
    expected = (stop - start, 3, side, side)
    if outputs.shape != expected:
        raise ValueError(
            f"tile outputs have shape {outputs.shape}; expected {expected} for tiles "
            f"{start}..{stop} of {plan.input_size}x{plan.input_size} LR pixels at x{scale}"
        )
    height, width = scale * plan.height, scale * plan.width
    if canvas.shape != (3, height, width):
        raise ValueError(f"canvas shape {canvas.shape}: expected {(3, height, width)}")
    margin, core = scale * plan.pad, scale * plan.tile
    for index in range(start, stop):
        row, col = divmod(index, plan.cols)
        top, left = row * core, col * core
        rows, cols = min(core, height - top), min(core, width - left)
        piece = outputs[index - start, :, margin : margin + rows, margin : margin + cols]
        canvas[:, top : top + rows, left : left + cols] = piece


def merge_tiles(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Stitch SR tiles ``[count, 3, s*input_size, s*input_size]`` into ``[3, s*H, s*W]``.

    Each tile is cropped to its core (its ``s*pad`` margin dropped) and the cores are placed
    side by side; the part past the image's bottom/right edge is cut off.
    """
    if scale < 1:
        raise ValueError(f"scale {scale}: must be at least 1")
    canvas = np.empty((3, scale * plan.height, scale * plan.width), outputs.dtype)
    merge_tile_range_into(canvas, outputs, plan, scale, 0, plan.count)
    return canvas
