"""How a request's images are cut into tiles, chosen per execution provider.

On a CPU, batching tiles gains nothing (a tile of 80x80 already keeps the cores busy; measured
by tests/bench/batching_gain.py) while fixed tiles cost their context and their padding past
the image: about 2x the image's pixels for a 240x160 photo. So the CPU cuts each image to fit
(``tiling.plan_fit``): one tile when the image is under the pixel cap, else the fewest
near-equal tiles, context only at internal seams. On a GPU a batch of small tiles is what fills
the device, and one input shape keeps cuDNN's choice and the memory arena fixed, so the GPU
keeps the fixed grid (``tiling.plan_tiles``).

Queue capacity is counted in *units* of one grid tile's pixels (``(tile + 2*pad)**2``, 6400
LR pixels by default), so ``--max-queue-tiles`` bounds the queued work and memory the same way
whatever the plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import TilingConfig
from server.tiling import TilePlan, plan_fit, plan_tiles

CUDA = "CUDAExecutionProvider"
MODES = ("auto", "fit", "grid")
# LR pixels of one CPU tile, 256x256. onnxruntime's CPU rate per pixel was flat within this VM's
# noise from 80x80 to 768x768 inputs (0.25-0.35 Mpix/s, shipped x2 model, interleaved runs), so
# a tile need only be large enough to make seams rare. Its activations are what bound it: about
# 3 KiB per LR pixel for the small preset, kept by onnxruntime's arena. tests/bench/large_image
# (4096x4096 at x2): 512x512 tiles peaked at 1578 MiB RSS, 256x256 at 894 MiB.
CPU_MAX_TILE_PIXELS = 256 * 256


@dataclass(frozen=True)
class Planner:
    """Chooses the tile plan of an image; ``mode`` is "fit" or "grid" (resolved)."""

    mode: str
    tile: int
    pad: int
    max_tile_pixels: int

    def __post_init__(self) -> None:
        if self.mode not in ("fit", "grid"):
            raise ValueError(f"planner mode {self.mode!r}: expected 'fit' or 'grid'")

    @property
    def unit_pixels(self) -> int:
        """Pixels of one queue unit: a grid tile's input."""
        return (self.tile + 2 * self.pad) ** 2

    def plan(self, height: int, width: int) -> TilePlan:
        if self.mode == "grid":
            return plan_tiles(height, width, self.tile, self.pad)
        return plan_fit(height, width, self.pad, self.max_tile_pixels)

    def units_per_tile(self, plan: TilePlan) -> int:
        return -(-plan.tile_pixels // self.unit_pixels)

    def units(self, plan: TilePlan) -> int:
        """Queue units of all the plan's tiles."""
        return plan.count * self.units_per_tile(plan)


def make_planner(config: TilingConfig, provider: str) -> Planner:
    """The planner for ``config`` on the active execution ``provider`` ("auto": fit on CPU,
    grid on CUDA)."""
    if config.mode not in MODES:
        raise ValueError(f"tiling mode {config.mode!r}: choose one of {MODES}")
    mode = config.mode
    if mode == "auto":
        mode = "grid" if provider == CUDA else "fit"
    cap = config.max_tile_pixels or CPU_MAX_TILE_PIXELS
    return Planner(mode, config.tile, config.pad, cap)
