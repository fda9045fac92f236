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


def split_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Cut ``image`` [3, H, W] into ``[plan.count, 3, input_size, input_size]`` tiles, row-major.

    Tile (r, c) covers LR rows ``r*tile - pad .. (r+1)*tile + pad`` (and the same for columns);
    whatever falls outside the image is reflected in from inside it.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image shape {image.shape}: expected [3, H, W]")
    if image.shape[1:] != (plan.height, plan.width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[2]} but the plan is for "
            f"{plan.height}x{plan.width}"
        )
    tile, pad, size = plan.tile, plan.pad, plan.input_size
    padded = _reflect_pad(image, 1, pad, plan.rows * tile - plan.height + pad)
    padded = _reflect_pad(padded, 2, pad, plan.cols * tile - plan.width + pad)
    # [3, rows, cols, size, size] view of every tile-sized window at the tile origins.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    windows = windows[:, ::tile, ::tile]
    tiles = windows.transpose(1, 2, 0, 3, 4).reshape(plan.count, 3, size, size)
    return np.ascontiguousarray(tiles, dtype=np.float32)


def merge_tiles(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """Stitch SR tiles ``[count, 3, s*input_size, s*input_size]`` into ``[3, s*H, s*W]``.

    Each tile is cropped to its core (its ``s*pad`` margin dropped) and the cores are placed
    side by side; the part past the image's bottom/right edge is cut off.
    """
    if scale < 1:
        raise ValueError(f"scale {scale}: must be at least 1")
    side = scale * plan.input_size
    expected = (plan.count, 3, side, side)
    if outputs.shape != expected:
        raise ValueError(
            f"tile outputs have shape {outputs.shape}; expected {expected} for "
            f"{plan.count} tiles of {plan.input_size}x{plan.input_size} LR pixels at x{scale}"
        )
    margin, core = scale * plan.pad, scale * plan.tile
    cores = outputs[:, :, margin : margin + core, margin : margin + core]
    # [rows, cols, 3, core, core] -> [3, rows, core, cols, core] -> [3, rows*core, cols*core]
    grid = cores.reshape(plan.rows, plan.cols, 3, core, core).transpose(2, 0, 3, 1, 4)
    stitched = grid.reshape(3, plan.rows * core, plan.cols * core)
    return np.ascontiguousarray(stitched[:, : scale * plan.height, : scale * plan.width])
