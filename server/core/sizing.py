"""What a request asks for: which model, and what output size. Pure functions.

A request may name a ``model`` or a ``scale`` and at most one sizing option: ``target_width``
and/or ``target_height`` (one given: the other follows the aspect ratio) or ``outscale``. The
factor each axis needs must lie in [1, largest model scale]; the model run is the named one, else
the given scale's default, else the default of the smallest scale that reaches the factor.
Its output is then resized to the exact size with the area filter (it averages, no aliasing):
the model chosen always reaches the size on both axes, so the resize only ever shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from rdn.constants import SCALES
from server.core.errors import RequestError

# A factor within this of a model scale counts as that scale (W * 2 / W is exact, but a
# target computed by a client through floats may be a pixel's rounding off).
FACTOR_SLACK = 1e-6


@dataclass(frozen=True)
class SizeOptions:
    """The model and sizing options of one request, as sent (0 / "" = not set)."""

    model: str = ""
    scale: int = 0
    target_width: int = 0
    target_height: int = 0
    outscale: float = 0.0

    @property
    def sized(self) -> bool:
        """A sizing option is set: the output may be resized."""
        return bool(self.target_width or self.target_height or self.outscale)


def check_options(options: SizeOptions) -> None:
    """Refuse (``RequestError``) options that contradict each other, whatever the image."""
    if options.scale and options.scale not in SCALES:
        raise RequestError(
            f"scale {options.scale} is not supported; use 2, 3 or 4, or 0 to let the server choose"
        )
    if options.outscale and (options.target_width or options.target_height):
        raise RequestError(
            "set at most one sizing option: outscale, or target_width and/or target_height"
        )
    if options.outscale and not (math.isfinite(options.outscale) and options.outscale > 0):
        raise RequestError(f"outscale {options.outscale} must be a finite number above 0")
    largest = max(SCALES)
    if options.outscale > largest + FACTOR_SLACK:  # refused before the size could overflow
        raise RequestError(
            f"outscale {options.outscale:g} is over x{largest}, the largest scale a model has; "
            f"each axis must lie in [1, {largest}]"
        )


def output_size(options: SizeOptions, width: int, height: int) -> tuple[int, int] | None:
    """The (width, height) asked for an input of ``width`` x ``height``; None: no sizing
    option (the model's own factor)."""
    if options.outscale:
        return _at_least_one(width * options.outscale), _at_least_one(height * options.outscale)
    if options.target_width and options.target_height:
        return options.target_width, options.target_height
    if options.target_width:
        ratio = options.target_width / width
        return options.target_width, _at_least_one(height * ratio)
    if options.target_height:
        ratio = options.target_height / height
        return _at_least_one(width * ratio), options.target_height
    return None


def _at_least_one(value: float) -> int:
    return max(1, round(value))


def needed_factor(
    width: int,
    height: int,
    size: tuple[int, int],
    largest: int,
    reach: str = "the largest served model scale",
) -> float:
    """The larger axis factor from ``width`` x ``height`` to ``size``; ``RequestError`` naming
    the allowed range when an axis needs less than 1 or more than ``largest`` (``reach``
    says whose scale that is)."""
    factors = (size[0] / width, size[1] / height)
    low, high = min(factors), max(factors)
    if low < 1 - FACTOR_SLACK or high > largest + FACTOR_SLACK:
        raise RequestError(
            f"a {width}x{height} image cannot become {size[0]}x{size[1]}: that is a factor of "
            f"{factors[0]:.4g} x {factors[1]:.4g}, and each axis must lie in [1, {largest}] "
            f"(1 up to {reach}, x{largest})"
        )
    return high


def smallest_scale(factor: float, scales: Iterable[int]) -> int:
    """The smallest of ``scales`` that reaches ``factor`` (``ValueError`` when none does)."""
    reaching = [s for s in scales if s >= factor - FACTOR_SLACK]
    if not reaching:
        raise ValueError(f"no scale among {sorted(scales)} reaches x{factor:.4g}")
    return min(reaching)


def resize_filter(model_size: tuple[int, int], size: tuple[int, int]) -> int | None:
    """OpenCV interpolation from the model's output size to ``size``: None when equal, else
    area (``needed_factor`` keeps every axis within the model's reach, so nothing grows)."""
    if model_size == size:
        return None
    if size[0] > model_size[0] or size[1] > model_size[1]:
        raise ValueError(f"{size} is larger than the model's output {model_size} on an axis")
    return cv2.INTER_AREA


def resize_output(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H x W or H x W x C uint8) at ``size`` (width, height), filtered as
    ``resize_filter`` chooses; the array itself when nothing changes."""
    height, width = image.shape[:2]
    interpolation = resize_filter((width, height), size)
    if interpolation is None:
        return image
    return cv2.resize(image, size, interpolation=interpolation)
