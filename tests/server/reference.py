"""Reference paths tests and benchmarks compare the server against: the value conversions of
whole-image inference (``to_planar`` / ``from_planar``), and the tiling path the servers used
before chunked inference (every tile cut up front, one submission, one stitch)."""

from __future__ import annotations

import numpy as np

from rdn.ensemble import N_TRANSFORMS, inverse_transform, transform
from server.core.tiling import TilePlan, merge_tiles, plan_tiles, split_tiles


def to_planar(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> float32 [3, H, W] in [0, 1] (the model's input layout)."""
    planar = np.empty((3, *rgb.shape[:2]), np.float32)
    np.multiply(rgb.transpose(2, 0, 1), np.float32(1 / 255), out=planar, dtype=np.float32)
    return planar


def from_planar(chw: np.ndarray) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> H x W x 3 uint8, rounded to nearest and clipped."""
    scaled = np.multiply(chw, np.float32(255), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 255.5, out=scaled)  # then truncation == round half up
    return scaled.transpose(1, 2, 0).astype(np.uint8, order="C")


def tile_image(
    rgb: np.ndarray, tile: int, pad: int, ensemble: bool
) -> tuple[list[TilePlan], np.ndarray]:
    """Plans and tiles of an H x W x 3 uint8 image; with ``ensemble`` of its 8 dihedral views."""
    planar = to_planar(rgb)
    views = [transform(planar[None], i)[0] for i in range(N_TRANSFORMS)] if ensemble else [planar]
    plans = [plan_tiles(v.shape[1], v.shape[2], tile, pad) for v in views]
    tiles = [split_tiles(v, p) for v, p in zip(views, plans, strict=True)]
    return plans, tiles[0] if len(tiles) == 1 else np.concatenate(tiles)


def stitch(outputs: np.ndarray, plans: list[TilePlan], scale: int) -> np.ndarray:
    """[3, sH, sW] float32 from tile outputs; several plans = ensemble views, averaged."""
    if len(plans) == 1:
        return merge_tiles(outputs, plans[0], scale)
    total: np.ndarray | None = None
    start = 0
    for index, plan in enumerate(plans):
        view = merge_tiles(outputs[start : start + plan.count], plan, scale)
        start += plan.count
        back = inverse_transform(view[None], index)[0].astype(np.float64)
        total = back if total is None else total + back
    assert total is not None
    return (total / len(plans)).astype(np.float32)
