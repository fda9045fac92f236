"""Named degradations that turn an HR image into the LR input a model is trained or scored on.

Specs (``parse_degradation``):

- ``bicubic``: the benchmark protocol (MATLAB-matching antialiased bicubic, ``rdn.imaging``).
- ``bd``: 7x7 Gaussian blur, sigma 1.6, replicate border, then bicubic (the RDN paper's BD,
  as its ``Prepare_TrainData_HR_LR_BD.m`` makes it).
- ``dn``: bicubic, then Gaussian noise of sigma 30 on the 0-255 scale (the paper's DN).
- ``jpeg:Q`` or ``jpeg:Q1-Q2``: bicubic, then a JPEG round trip at quality Q (drawn in Q1..Q2).
- ``noise:S`` or ``noise:S1-S2``: bicubic, then Gaussian noise of sigma S (drawn in S1..S2).
- ``photo``: a randomised chain in the order real photos suffer it (as Real-ESRGAN orders it):
  blur (isotropic or anisotropic Gaussian), downscale (bicubic, bilinear or area), Gaussian or
  Poisson noise (colour or grey), JPEG. Its ranges are a ``PhotoRanges``.

Every random choice comes from the ``numpy.random.Generator`` the caller passes, so training can
derive it from the sample key (resume stays bit-exact) and evaluation from a fixed seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from rdn.imaging import downscale

KINDS = ("bicubic", "bd", "dn", "jpeg", "noise", "photo")
BD_KERNEL, BD_SIGMA = 7, 1.6
DN_SIGMA = 30.0
RESIZE_METHODS = ("bicubic", "bilinear", "area")
MAX_BLUR_RADIUS = 10  # HR pixels; a kernel of 21x21 holds sigma 3.3 to 3 sigma
MAX_SIGMA_SCALE = 2.0  # blur sigmas are given at x2 and scaled by scale / 2 (x4: doubled)
_RANGE = re.compile(r"^(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?$")


class DegradationError(ValueError):
    """A degradation spec or range that cannot be used; the message says what is allowed."""


@dataclass(frozen=True)
class PhotoRanges:
    """The ranges the ``photo`` chain draws from (sigmas in HR pixels and 0-255 units)."""

    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.2, 1.2)  # at x2; scaled by scale / 2 for x3 and x4
    anisotropic_prob: float = 0.4
    resize_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)  # bicubic, bilinear, area
    noise_prob: float = 0.5
    gaussian_sigma: tuple[float, float] = (1.0, 15.0)
    poisson_prob: float = 0.3  # of the noisy samples, the share with Poisson (shot) noise
    poisson_scale: tuple[float, float] = (0.1, 1.0)  # 1.0: photon counts of 255 at white
    gray_noise_prob: float = 0.3
    jpeg_prob: float = 0.6
    jpeg_quality: tuple[int, int] = (30, 95)
    # True: a sample that drew neither noise nor JPEG gets the JPEG round trip anyway, so every
    # sample is degraded (for a model that ``model=auto`` only gives degraded inputs).
    always_degrade: bool = False

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if name.endswith("_prob"):
                _need_prob(name, getattr(self, name))
        for name in ("blur_sigma", "gaussian_sigma", "poisson_scale", "jpeg_quality"):
            low, high = _pair(name, getattr(self, name))
            if not 0 <= low <= high:
                raise DegradationError(f"photo range {name} must be 0 <= low <= high: {low, high}")
            object.__setattr__(self, name, (low, high))
        if self.blur_sigma[1] * MAX_SIGMA_SCALE * 3 > MAX_BLUR_RADIUS:  # x4 doubles the sigmas
            limit = MAX_BLUR_RADIUS / (3 * MAX_SIGMA_SCALE)
            raise DegradationError(f"photo range blur_sigma must stay <= {limit:.2f}")
        low_q, high_q = self.jpeg_quality
        if not (low_q >= 1 and high_q <= 100 and float(low_q).is_integer()):
            raise DegradationError(f"photo range jpeg_quality must be integers in 1..100: {low_q}")
        weights = tuple(float(w) for w in self.resize_weights)
        if len(weights) != len(RESIZE_METHODS) or min(weights) < 0 or sum(weights) <= 0:
            raise DegradationError(
                f"photo range resize_weights needs {len(RESIZE_METHODS)} weights >= 0 "
                f"({', '.join(RESIZE_METHODS)}), got {self.resize_weights!r}"
            )
        object.__setattr__(self, "resize_weights", weights)
        if not isinstance(self.always_degrade, bool):
            raise DegradationError(
                f"photo range always_degrade must be true or false: {self.always_degrade!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PhotoRanges:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            valid = sorted(cls.__dataclass_fields__)
            raise DegradationError(f"unknown photo range(s) {sorted(unknown)}; valid: {valid}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Degradation:
    """A parsed spec: ``kind`` and, for jpeg/noise, the range its parameter is drawn from."""

    kind: str = "bicubic"
    low: float = 0.0
    high: float = 0.0
    photo: PhotoRanges = field(default_factory=PhotoRanges)

    @property
    def spec(self) -> str:
        """The canonical text of this spec (what ``--json`` and checkpoints record)."""
        if self.kind not in ("jpeg", "noise"):
            return self.kind
        text = f"{self.kind}:{_number(self.low)}"
        return text if self.low == self.high else f"{text}-{_number(self.high)}"

    @property
    def is_bicubic(self) -> bool:
        return self.kind == "bicubic"


def parse_degradation(text: str, photo: PhotoRanges | None = None) -> Degradation:
    """``Degradation`` from a spec such as ``jpeg:50``, ``noise:5-15`` or ``photo``."""
    kind, _, arg = text.strip().lower().partition(":")
    allowed = "bicubic, bd, dn, jpeg:Q, jpeg:Q1-Q2, noise:S, noise:S1-S2 or photo"
    if kind not in KINDS:
        raise DegradationError(f"degradation {text!r}: unknown; allowed: {allowed}")
    if kind not in ("jpeg", "noise"):
        if arg:
            raise DegradationError(f"degradation {text!r}: {kind} takes no parameter")
        return Degradation(kind, photo=photo or PhotoRanges())
    match = _RANGE.match(arg)
    if match is None:
        raise DegradationError(f"degradation {text!r}: {kind} needs a number or a range A-B")
    low = float(match.group(1))
    high = float(match.group(2)) if match.group(2) else low
    if kind == "jpeg" and not (1 <= low <= high <= 100 and low.is_integer() and high.is_integer()):
        raise DegradationError(f"degradation {text!r}: JPEG quality must be integers 1..100, A<=B")
    if kind == "noise" and not (0 <= low <= high <= 255):
        raise DegradationError(f"degradation {text!r}: noise sigma must be in 0..255, A<=B")
    return Degradation(kind, low, high, photo or PhotoRanges())


def degrade(hr: np.ndarray, scale: int, spec: Degradation, rng: np.random.Generator) -> np.ndarray:
    """The LR image (uint8 HxWx3) of a modcropped HR image under ``spec``."""
    if spec.kind == "bicubic":
        return downscale(hr, scale)
    if spec.kind == "bd":
        blurred = cv2.GaussianBlur(
            hr, (BD_KERNEL, BD_KERNEL), BD_SIGMA, BD_SIGMA, borderType=cv2.BORDER_REPLICATE
        )
        return downscale(blurred, scale)
    if spec.kind == "dn":
        return add_gaussian_noise(downscale(hr, scale), DN_SIGMA, rng, gray=False)
    if spec.kind == "jpeg":
        return jpeg_round_trip(downscale(hr, scale), round(_draw(rng, spec.low, spec.high)))
    if spec.kind == "noise":
        return add_gaussian_noise(downscale(hr, scale), _draw(rng, spec.low, spec.high), rng)
    return photo_chain(hr, scale, spec.photo, rng)


def photo_chain(
    hr: np.ndarray, scale: int, ranges: PhotoRanges, rng: np.random.Generator
) -> np.ndarray:
    """Blur, downscale, noise and JPEG, each drawn from ``ranges`` (see the module docstring)."""
    image = hr
    if rng.random() < ranges.blur_prob:
        sigma_scale = scale / 2
        low, high = (s * sigma_scale for s in ranges.blur_sigma)
        sx = _draw(rng, low, high)
        if rng.random() < ranges.anisotropic_prob:
            sy, theta = _draw(rng, low, high), _draw(rng, 0.0, math.pi)
        else:
            sy, theta = sx, 0.0
        image = blur(image, gaussian_kernel(sx, sy, theta))
    weights = np.asarray(ranges.resize_weights) / sum(ranges.resize_weights)
    method = RESIZE_METHODS[int(rng.choice(len(RESIZE_METHODS), p=weights))]
    image = resize_down(image, scale, method)
    noisy = bool(rng.random() < ranges.noise_prob)
    if noisy:
        gray = bool(rng.random() < ranges.gray_noise_prob)
        if rng.random() < ranges.poisson_prob:
            image = add_poisson_noise(image, _draw(rng, *ranges.poisson_scale), rng, gray)
        else:
            image = add_gaussian_noise(image, _draw(rng, *ranges.gaussian_sigma), rng, gray)
    if rng.random() < ranges.jpeg_prob or (ranges.always_degrade and not noisy):
        image = jpeg_round_trip(image, round(_draw(rng, *ranges.jpeg_quality)))
    return image


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised 2-D Gaussian, axes ``sigma_x``/``sigma_y`` rotated by ``theta`` radians."""
    radius = min(MAX_BLUR_RADIUS, max(1, math.ceil(3 * max(sigma_x, sigma_y))))
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    xx, yy = np.meshgrid(grid, grid)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    sx, sy = max(sigma_x, 1e-3), max(sigma_y, 1e-3)
    kernel = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return (kernel / kernel.sum()).astype(np.float32)


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image`` (uint8) filtered with ``kernel``, reflected at the border, rounded."""
    out = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_down(hr: np.ndarray, scale: int, method: str) -> np.ndarray:
    """``hr`` divided by ``scale`` with ``method`` (bicubic and bilinear antialiased, as Pillow)."""
    h, w = hr.shape[:2]
    size = (w // scale, h // scale)
    if method == "area":
        return cv2.resize(hr, size, interpolation=cv2.INTER_AREA)
    if method == "bilinear":
        pil = Image.fromarray(hr).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(pil, dtype=np.uint8)
    return downscale(hr, scale)


def add_gaussian_noise(
    image: np.ndarray, sigma: float, rng: np.random.Generator, gray: bool = False
) -> np.ndarray:
    """``image`` plus N(0, sigma) on the 0-255 scale, rounded and clipped (MATLAB's uint8)."""
    shape = (*image.shape[:2], 1) if gray else image.shape
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(image.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def add_poisson_noise(
    image: np.ndarray, strength: float, rng: np.random.Generator, gray: bool = False
) -> np.ndarray:
    """Shot noise: photon counts with 255 at white, its deviation times ``strength``."""
    x = image.astype(np.float32)
    if gray:
        luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        noise = (rng.poisson(luma).astype(np.float32) - luma)[..., None]
    else:
        noise = rng.poisson(x).astype(np.float32) - x
    return np.clip(np.rint(x + noise * np.float32(strength)), 0, 255).astype(np.uint8)


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` (RGB) encoded as a baseline 4:2:0 JPEG at ``quality`` and decoded again."""
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DegradationError(f"JPEG encoding at quality {quality} failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(decoded[..., ::-1])


def _draw(rng: np.random.Generator, low: float, high: float) -> float:
    return float(low) if low == high else float(rng.uniform(low, high))


def _need_prob(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise DegradationError(f"photo range {name} must be a probability in 0..1, got {value!r}")


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise DegradationError(f"photo range {name} must be [low, high], got {value!r}") from e
    return low, high


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
