"""Paired LR/HR training patches from a folder of HR images, reproducible without sampler state.

Every image is decoded once, up front, in the main process: unreadable files and images
smaller than one HR patch are reported there, naming the file, instead of failing later
inside a DataLoader worker. The HR image is modcropped and its LR partner made with the
benchmark degradation (``rdn.imaging.downscale``); pairs are kept in memory while they fit
a byte budget, and the rest are decoded again for every sample.

Each sample is a pure function of the key ``(seed, step, rank, index in batch)``: the key
seeds a numpy generator that picks the image, the patch position, one of the 8 flip/rotate
transforms and (with ``channel_shuffle``) one of the 6 RGB channel orders, and a second generator
(the key plus a salt) that draws a non-bicubic degradation (``rdn.degradations``). Resuming at step
k therefore only needs k, and every DDP rank draws different patches because its rank is
part of the key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rdn.degradations import Degradation, degrade
from rdn.imaging import ImageReadError, downscale, list_images, modcrop, read_rgb

log = logging.getLogger(__name__)

N_TRANSFORMS = 8  # 4 rotations x optional horizontal flip (the dihedral group of the square)
# The 6 orders of the RGB channels. Bicubic downscaling acts on each channel alone, so
# permuting the channels of HR and LR alike keeps the pair exact.
CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
DEFAULT_CACHE_BYTES = 2 * 1024**3  # 2 GiB of decoded HR + LR pairs held in memory
BUILTIN_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle_left",
    "stereo_motorcycle_right",
)

SampleKey = tuple[int, int, int, int]  # (seed, step, rank, index in batch)
# LR pixels of context degraded around a patch, so blur and resampling see real neighbours
# instead of the patch border (a 21x21 HR blur at x2 reaches 5 LR pixels, bicubic 2 more).
DEGRADE_MARGIN = 8
DEGRADE_SALT = 0x44454752  # keeps the degradation's random stream apart from the patch plan's


class DataError(ValueError):
    """The training images cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ImageEntry:
    """One usable HR image: where it comes from and its LR size after modcrop."""

    name: str  # file path, or "skimage:<name>" for a built-in photograph
    path: Path | None  # None for built-ins, which are always held in memory
    lr_height: int
    lr_width: int


@dataclass(frozen=True)
class PatchPlan:
    """One sample: image index, LR top-left corner, flip/rotation, RGB channel order."""

    image: int
    y: int
    x: int
    transform: int  # index into the 8 flips/rotations (see ``augment``)
    channels: int  # index into CHANNEL_ORDERS; applied only with channel shuffling on


def make_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR modcropped to a multiple of ``scale``, its benchmark LR), both HxWx3 uint8."""
    hr = np.ascontiguousarray(modcrop(hr, scale))
    return hr, downscale(hr, scale)


def pair_bytes(lr_height: int, lr_width: int, scale: int) -> int:
    """Memory of one cached HR + LR pair of uint8 RGB."""
    return lr_height * lr_width * 3 * (1 + scale * scale)


def augment(image: np.ndarray, transform: int) -> np.ndarray:
    """Transform ``transform`` in 0..7 of the 8 flips/rotations, applied to an HxWxC array."""
    if not 0 <= transform < N_TRANSFORMS:
        raise ValueError(f"transform must be in 0..{N_TRANSFORMS - 1}, got {transform}")
    if transform >= 4:
        image = image[:, ::-1]
    return np.rot90(image, transform % 4)


def plan_patch(key: SampleKey, lr_sizes: Sequence[tuple[int, int]], patch_size: int) -> PatchPlan:
    """Pure: the image, LR position and augmentation that ``key`` selects among ``lr_sizes``."""
    rng = np.random.default_rng(list(key))
    image = int(rng.integers(len(lr_sizes)))
    height, width = lr_sizes[image]
    y = int(rng.integers(height - patch_size + 1))
    x = int(rng.integers(width - patch_size + 1))
    transform = int(rng.integers(N_TRANSFORMS))
    return PatchPlan(image, y, x, transform, int(rng.integers(len(CHANNEL_ORDERS))))


def cut_patches(
    hr: np.ndarray,
    lr: np.ndarray,
    plan: PatchPlan,
    scale: int,
    patch_size: int,
    channel_shuffle: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The aligned (LR, HR) patches of ``plan``, both transformed the same way."""
    p, y, x = patch_size, plan.y, plan.x
    lr_patch = lr[y : y + p, x : x + p]
    hr_patch = hr[y * scale : (y + p) * scale, x * scale : (x + p) * scale]
    if channel_shuffle:
        order = list(CHANNEL_ORDERS[plan.channels])
        lr_patch, hr_patch = lr_patch[..., order], hr_patch[..., order]
    return augment(lr_patch, plan.transform), augment(hr_patch, plan.transform)


def degradation_rng(key: SampleKey) -> np.random.Generator:
    """The generator of ``key``'s degradation draws (pure in the key)."""
    return np.random.default_rng([*key, DEGRADE_SALT])


def cut_degraded_patches(
    hr: np.ndarray,
    plan: PatchPlan,
    scale: int,
    patch_size: int,
    spec: Degradation,
    rng: np.random.Generator,
    channel_shuffle: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) patches of ``plan`` whose LR is ``spec`` applied to the HR around the patch.

    The HR region is the patch plus ``DEGRADE_MARGIN`` LR pixels on each side (where the image
    has them); its channels are permuted before degrading, so JPEG's colour handling sees the
    colours the LR will hold.
    """
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    p, m = patch_size, DEGRADE_MARGIN
    y0, x0 = max(0, plan.y - m), max(0, plan.x - m)
    y1, x1 = min(h, plan.y + p + m), min(w, plan.x + p + m)
    region = hr[y0 * scale : y1 * scale, x0 * scale : x1 * scale]
    if channel_shuffle:
        region = region[..., list(CHANNEL_ORDERS[plan.channels])]
    region = np.ascontiguousarray(region)
    lr_region = degrade(region, scale, spec, rng)
    dy, dx = plan.y - y0, plan.x - x0
    lr_patch = lr_region[dy : dy + p, dx : dx + p]
    hr_patch = region[dy * scale : (dy + p) * scale, dx * scale : (dx + p) * scale]
    return augment(lr_patch, plan.transform), augment(hr_patch, plan.transform)


def to_chw_float(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def builtin_images() -> list[tuple[str, np.ndarray]]:
    """The photographs scikit-image ships offline, so training runs on a fresh machine."""
    from skimage import data as skdata  # imported lazily: only the no-folder default needs it

    left, right = skdata.stereo_motorcycle()[:2]
    arrays = {
        "astronaut": skdata.astronaut(),
        "chelsea": skdata.chelsea(),
        "coffee": skdata.coffee(),
        "rocket": skdata.rocket(),
        "stereo_motorcycle_left": left,
        "stereo_motorcycle_right": right,
    }
    return [
        (f"skimage:{name}", np.ascontiguousarray(arrays[name][..., :3])) for name in BUILTIN_NAMES
    ]


class PatchDataset(Dataset):
    """Map-style dataset indexed by sample keys; returns (LR 3xPxP, HR 3xsPxsP) float tensors."""

    def __init__(
        self,
        entries: list[ImageEntry],
        cache: list[tuple[np.ndarray, np.ndarray] | None],
        scale: int,
        patch_size: int,
        skipped: list[str] | None = None,
        channel_shuffle: bool = False,
        degradation: Degradation | None = None,
    ) -> None:
        if not entries:
            raise DataError("no usable training images")
        if len(cache) != len(entries):
            raise ValueError("cache must hold one slot per entry")
        self.entries = entries
        self.cache = cache
        self.scale = scale
        self.patch_size = patch_size
        self.skipped = skipped or []
        self.channel_shuffle = channel_shuffle
        self.degradation = degradation if degradation and not degradation.is_bicubic else None
        self.lr_sizes = [(e.lr_height, e.lr_width) for e in entries]

    @property
    def cached_count(self) -> int:
        return sum(pair is not None for pair in self.cache)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(HR, LR) of image ``index``: from the cache, or decoded again when it did not fit."""
        cached = self.cache[index]
        if cached is not None:
            return cached
        entry = self.entries[index]
        assert entry.path is not None  # built-ins are always cached
        hr, lr = make_pair(read_rgb(entry.path), self.scale)
        if lr.shape[:2] != (entry.lr_height, entry.lr_width):
            raise DataError(
                f"image {entry.path}: changed on disk during training "
                f"(LR size {lr.shape[1]}x{lr.shape[0]}, was {entry.lr_width}x{entry.lr_height})"
            )
        return hr, lr

    def sample(self, key: SampleKey) -> tuple[np.ndarray, np.ndarray]:
        """The (LR, HR) uint8 patches of ``key``."""
        plan = plan_patch(key, self.lr_sizes, self.patch_size)
        hr, lr = self.pair(plan.image)
        if self.degradation is None:  # the cached benchmark LR
            return cut_patches(hr, lr, plan, self.scale, self.patch_size, self.channel_shuffle)
        return cut_degraded_patches(
            hr,
            plan,
            self.scale,
            self.patch_size,
            self.degradation,
            degradation_rng(key),
            self.channel_shuffle,
        )

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = self.sample(key)
        return to_chw_float(lr), to_chw_float(hr)

    def __len__(self) -> int:  # keys are unbounded; this is the number of images
        return len(self.entries)


class StepBatchSampler(Sampler[list[SampleKey]]):
    """Yields the keys of one batch per step, for steps ``start_step`` to ``total_steps - 1``."""

    def __init__(
        self, seed: int, rank: int, batch_size: int, start_step: int, total_steps: int
    ) -> None:
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start_step, self.total_steps):
            yield [(self.seed, step, self.rank, i) for i in range(self.batch_size)]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def _too_small(name: str, hr_shape: tuple[int, ...], scale: int, patch_size: int) -> str | None:
    need = patch_size * scale
    h, w = hr_shape[:2]
    if h - h % scale < need or w - w % scale < need:
        return (
            f"image {name}: {w}x{h} is smaller than one HR patch ({need}x{need} = patch size "
            f"{patch_size} x scale {scale}); remove it or lower --patch-size"
        )
    return None


def build_dataset(
    folder: Path | None,
    scale: int,
    patch_size: int,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    skip_bad: bool = False,
    channel_shuffle: bool = False,
    degradation: Degradation | None = None,
) -> PatchDataset:
    """Validate and decode every HR image of ``folder`` (built-ins when None) up front.

    Unreadable or too-small images raise ``DataError`` naming the file, or with ``skip_bad``
    are skipped with a warning and listed in ``dataset.skipped``. Pairs are cached in order
    until ``cache_bytes`` is used up; later images are decoded per sample. ``channel_shuffle``
    also permutes the RGB channels of each sample (one of 6 orders, drawn from its key);
    ``degradation`` (other than bicubic) makes each LR patch from its HR patch per sample.
    """
    entries: list[ImageEntry] = []
    cache: list[tuple[np.ndarray, np.ndarray] | None] = []
    skipped: list[str] = []
    used = 0

    def reject(message: str) -> None:
        if not skip_bad:
            raise DataError(message + " (or pass --skip-bad-images)")
        log.warning("skipping %s", message)
        skipped.append(message)

    if folder is None:
        for name, hr in builtin_images():
            if (problem := _too_small(name, hr.shape, scale, patch_size)) is not None:
                raise DataError(problem)
            pair = make_pair(hr, scale)
            entries.append(ImageEntry(name, None, *pair[1].shape[:2]))
            cache.append(pair)
            used += pair[0].nbytes + pair[1].nbytes
    else:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"data folder {folder}: no such directory")
        paths = list_images(folder)
        if not paths:
            raise DataError(
                f"data folder {folder}: no images (expected .png, .jpg, .bmp, .tif or .webp files)"
            )
        for path in paths:
            try:
                hr = read_rgb(path)
            except ImageReadError as e:
                reject(f"{e}; the file is unreadable or corrupt")
                continue
            if (problem := _too_small(str(path), hr.shape, scale, patch_size)) is not None:
                reject(problem)
                continue
            h, w = hr.shape[0] // scale, hr.shape[1] // scale
            size = pair_bytes(h, w, scale)
            if used + size <= cache_bytes:
                cache.append(make_pair(hr, scale))
                used += size
            else:
                cache.append(None)
            entries.append(ImageEntry(str(path), path, h, w))
        if not entries:
            raise DataError(f"data folder {folder}: none of its {len(paths)} images is usable")
    dataset = PatchDataset(entries, cache, scale, patch_size, skipped, channel_shuffle, degradation)
    log.info(
        "training images: %d (%d cached in memory, %.1f MiB; %d skipped)",
        len(entries),
        dataset.cached_count,
        used / 2**20,
        len(skipped),
    )
    return dataset
