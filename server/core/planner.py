"""How a request's images are cut into tiles, chosen per execution provider.

On a CPU, batching tiles gains nothing (a tile of 80x80 already keeps the cores busy; measured
by tests/bench/batching_gain.py) while fixed tiles cost their context and their padding past
the image: about 2x the image's pixels for a 240x160 photo. So the CPU cuts each image to fit
(``tiling.plan_fit``): one tile when the image is under the pixel cap, else the fewest
near-equal tiles, context only at internal seams. On a GPU a batch of tiles of one shape is
what fills the device, and few input shapes keep cuDNN's algorithm choices and the memory arena
fixed, so the GPU cuts each image into windows whose height and width are each one of a few
*bucket* sizes (``tiling.plan_buckets``; 80, 144 and 272 by default, so 9 shapes): on each axis
the size that computes the fewest pixels, windows inside the image, tiles of one shape batched
across requests. The fixed grid
(``tiling.plan_tiles``) remains as ``--tiling grid``.

Queue capacity is counted in *units* of one grid tile's pixels (``(tile + 2*pad)**2``, 6400
LR pixels by default), so ``--max-queue-tiles`` bounds the queued work and memory the same way
whatever the plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdn.constants import CUDA
from server.config import TilingConfig
from server.core.tiling import TilePlan, plan_buckets, plan_fit, plan_tiles

MODES = ("auto", "fit", "buckets", "grid")
# LR pixels of one CPU tile, 384x384. onnxruntime's CPU rate per pixel was flat within this VM's
# noise from 80x80 to 768x768 inputs (0.25-0.35 Mpix/s, shipped x2 model, interleaved runs), so
# the cap trades the context computed at seams (pad 8 on both sides of each seam) against the
# activations a tile holds: about 3 KiB per LR pixel for the small preset, kept by onnxruntime's
# arena. tests/bench/large_image, 4096x4096 at x2: 256x256 tiles computed 1.143x the image's
# pixels and peaked at 894 MiB RSS, 384x384 1.095x and 1153 MiB, 512x512 peaked at 1578 MiB
# (over the 1.5 GiB target); at 1024x1024, 384x384 took 7.2 s where 256x256 took 8.1 s.
CPU_MAX_TILE_PIXELS = 384 * 384


@dataclass(frozen=True)
class Planner:
    """Chooses the tile plan of an image; ``mode`` is "fit", "buckets" or "grid" (resolved)."""

    mode: str
    tile: int
    pad: int
    max_tile_pixels: int
    buckets: tuple[int, ...] = ()  # LR core sizes of the bucket windows

    def __post_init__(self) -> None:
        if self.mode not in MODES[1:]:
            raise ValueError(f"planner mode {self.mode!r}: expected one of {MODES[1:]}")
        if self.mode == "buckets" and (not self.buckets or min(self.buckets) < 1):
            raise ValueError(f"bucket plans need core sizes >= 1, got {self.buckets}")

    @property
    def windows(self) -> tuple[int, ...]:
        """Window sides the buckets allow (each axis of a tile takes one), or the grid's; empty
        for fitted plans, whose shapes follow each image."""
        if self.mode == "buckets":
            return tuple(sorted({core + 2 * self.pad for core in self.buckets}))
        return (self.tile + 2 * self.pad,) if self.mode == "grid" else ()

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """Every (height, width) of tile this planner can produce when it is not fitting
        tiles to each image: what warm-up runs on a GPU."""
        return tuple((h, w) for h in self.windows for w in self.windows)

    @property
    def unit_pixels(self) -> int:
        """Pixels of one queue unit: a grid tile's input."""
        return (self.tile + 2 * self.pad) ** 2

    def plan(self, height: int, width: int) -> TilePlan:
        if self.mode == "grid":
            return plan_tiles(height, width, self.tile, self.pad)
        if self.mode == "buckets":
            return plan_buckets(height, width, self.windows, self.pad)
        return plan_fit(height, width, self.pad, self.max_tile_pixels)

    def units_per_tile(self, plan: TilePlan) -> int:
        return self.units_per_tile_of(plan.input_shape)

    def units_per_tile_of(self, shape: tuple[int, int]) -> int:
        """Queue units of one tile of ``shape`` (height, width)."""
        return -(-shape[0] * shape[1] // self.unit_pixels)

    def units(self, plan: TilePlan) -> int:
        """Queue units of all the plan's tiles."""
        return plan.count * self.units_per_tile(plan)


def make_planner(config: TilingConfig, provider: str) -> Planner:
    """The planner for ``config`` on the active execution ``provider`` ("auto": fit on CPU,
    buckets on CUDA)."""
    if config.mode not in MODES:
        raise ValueError(f"tiling mode {config.mode!r}: choose one of {MODES}")
    mode = config.mode
    if mode == "auto":
        mode = "buckets" if provider == CUDA else "fit"
    cap = config.max_tile_pixels or CPU_MAX_TILE_PIXELS
    return Planner(mode, config.tile, config.pad, cap, tuple(config.buckets))
