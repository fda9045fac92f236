"""Paired patch sampling: determinism from keys, augmentation, alignment, caching, bad input."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rdn.data import (
    CHANNEL_ORDERS,
    N_TRANSFORMS,
    DataError,
    PatchDataset,
    StepBatchSampler,
    augment,
    build_dataset,
    plan_patch,
)
from rdn.imaging import downscale, modcrop, read_rgb, resize_bicubic

PATCH = 16


@pytest.fixture(scope="module")
def set5_dataset(set5_dir: Path) -> PatchDataset:
    return build_dataset(set5_dir, scale=2, patch_size=PATCH)


def test_same_key_gives_same_patches_across_independent_datasets(
    set5_dir: Path, set5_dataset: PatchDataset
) -> None:
    other = build_dataset(set5_dir, scale=2, patch_size=PATCH)
    for key in [(0, 0, 0, 0), (7, 123, 1, 3)]:
        lr_a, hr_a = set5_dataset[key]
        lr_b, hr_b = other[key]
        assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)


def test_every_key_component_changes_the_sample(set5_dataset: PatchDataset) -> None:
    base = (3, 10, 0, 0)
    ref = set5_dataset[base][0]
    for changed in [(4, 10, 0, 0), (3, 11, 0, 0), (3, 10, 1, 0), (3, 10, 0, 1)]:
        assert not torch.equal(set5_dataset[changed][0], ref), changed


def test_patches_have_patch_and_scaled_patch_shapes_in_unit_range(
    set5_dataset: PatchDataset,
) -> None:
    lr, hr = set5_dataset[(0, 5, 0, 2)]
    assert lr.shape == (3, PATCH, PATCH) and hr.shape == (3, 2 * PATCH, 2 * PATCH)
    assert lr.dtype == hr.dtype == torch.float32
    assert float(lr.min()) >= 0.0 and float(hr.max()) <= 1.0


def test_plans_stay_inside_images_and_cover_all_images_and_transforms() -> None:
    sizes = [(20, 30), (16, 16), (40, 17)]
    plans = [plan_patch((1, step, 0, i), sizes, 16) for step in range(100) for i in range(4)]
    for plan in plans:
        h, w = sizes[plan.image]
        assert 0 <= plan.y <= h - 16 and 0 <= plan.x <= w - 16
    assert {p.image for p in plans} == {0, 1, 2}
    assert {p.transform for p in plans} == set(range(N_TRANSFORMS))


def test_augment_gives_the_eight_distinct_dihedral_transforms() -> None:
    image = np.arange(4 * 4 * 3).reshape(4, 4, 3)
    results = [augment(image, t) for t in range(N_TRANSFORMS)]
    assert len({r.tobytes() for r in results}) == 8
    expected = [np.rot90(image, k) for k in range(4)] + [
        np.rot90(image[:, ::-1], k) for k in range(4)
    ]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="transform"):
        augment(image, 8)


def test_lr_and_hr_patches_come_from_the_benchmark_pair_at_aligned_coordinates(
    set5_dir: Path, set5_dataset: PatchDataset
) -> None:
    for key in [(0, s, 0, 0) for s in range(6)]:
        plan = plan_patch(key, set5_dataset.lr_sizes, PATCH)
        path = Path(set5_dataset.entries[plan.image].name)
        hr_image = modcrop(read_rgb(path), 2)
        lr_image = downscale(hr_image, 2)
        y, x, p = plan.y, plan.x, PATCH
        lr, hr = set5_dataset.sample(key)
        np.testing.assert_array_equal(lr, augment(lr_image[y : y + p, x : x + p], plan.transform))
        hr_region = hr_image[2 * y : 2 * (y + p), 2 * x : 2 * (x + p)]
        np.testing.assert_array_equal(hr, augment(hr_region, plan.transform))


def test_lr_patch_is_the_downscale_of_its_hr_patch(set5_dataset: PatchDataset) -> None:
    """Geometry check independent of the cutting code: aligned beats shifted by a pixel."""
    for step in range(4):
        lr, hr = set5_dataset.sample((1, step, 0, 0))
        own = downscale(np.ascontiguousarray(hr), 2).astype(np.float64)
        interior = (slice(2, -2), slice(2, -2))
        aligned = np.abs(own[interior] - lr[interior]).mean()
        shifted = np.abs(own[3:-1, 2:-2] - lr[interior]).mean()
        assert aligned < 1.5 and aligned < shifted, (aligned, shifted)


def test_uncached_images_give_the_same_samples_as_cached(set5_dir: Path) -> None:
    cached = build_dataset(set5_dir, scale=3, patch_size=PATCH)
    uncached = build_dataset(set5_dir, scale=3, patch_size=PATCH, cache_bytes=0)
    assert cached.cached_count == 5 and uncached.cached_count == 0
    for key in [(0, s, 0, 1) for s in range(5)]:
        for a, b in zip(cached[key], uncached[key], strict=True):
            assert torch.equal(a, b)


def test_cache_budget_caches_a_prefix_of_the_images(set5_dir: Path) -> None:
    full = build_dataset(set5_dir, scale=2, patch_size=PATCH)
    first = full.cache[0]
    assert first is not None
    one = first[0].nbytes + first[1].nbytes
    partial = build_dataset(set5_dir, scale=2, patch_size=PATCH, cache_bytes=one)
    assert [pair is not None for pair in partial.cache] == [True, False, False, False, False]


def test_batch_sampler_yields_keys_for_remaining_steps_only() -> None:
    sampler = StepBatchSampler(seed=5, rank=1, batch_size=3, start_step=7, total_steps=10)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 3
    assert batches[0] == [(5, 7, 1, 0), (5, 7, 1, 1), (5, 7, 1, 2)]
    assert batches[-1][0] == (5, 9, 1, 0)


def test_dataloader_workers_do_not_change_batches(set5_dir: Path) -> None:
    dataset = build_dataset(set5_dir, scale=2, patch_size=PATCH, cache_bytes=0)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = StepBatchSampler(seed=1, rank=0, batch_size=2, start_step=0, total_steps=3)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        return [lr for lr, _ in loader]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_builtin_images_are_used_without_a_folder() -> None:
    dataset = build_dataset(None, scale=4, patch_size=PATCH)
    assert [e.name for e in dataset.entries] == [
        "skimage:astronaut",
        "skimage:chelsea",
        "skimage:coffee",
        "skimage:rocket",
        "skimage:stereo_motorcycle_left",
        "skimage:stereo_motorcycle_right",
    ]
    assert dataset.cached_count == 6
    lr, hr = dataset[(0, 0, 0, 0)]
    assert lr.shape == (3, PATCH, PATCH) and hr.shape == (3, 4 * PATCH, 4 * PATCH)


def test_greyscale_rgba_and_other_formats_become_rgb(tmp_path: Path, set5_dir: Path) -> None:
    rgb = read_rgb(set5_dir / "head.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgb).save(tmp_path / "photo.JPG", quality=95)
    Image.fromarray(rgb).save(tmp_path / "bitmap.bmp")
    Image.fromarray(rgb).save(tmp_path / "scan.tiff")
    Image.fromarray(rgb).save(tmp_path / "web.webp")
    dataset = build_dataset(tmp_path, scale=2, patch_size=PATCH)
    assert len(dataset.entries) == 6
    for index in range(6):
        hr, lr = dataset.pair(index)
        assert hr.shape[2] == lr.shape[2] == 3


def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        build_dataset(tmp_path / "nope", scale=2, patch_size=PATCH)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no images")):
        build_dataset(tmp_path, scale=2, patch_size=PATCH)


def test_unreadable_file_is_named_or_skipped_with_a_warning(
    tmp_path: Path, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(set5_dir / "bird.png", tmp_path / "bird.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        build_dataset(tmp_path, scale=2, patch_size=PATCH)
    with caplog.at_level(logging.WARNING, logger="rdn.data"):
        dataset = build_dataset(tmp_path, scale=2, patch_size=PATCH, skip_bad=True)
    assert [Path(e.name).name for e in dataset.entries] == ["bird.png"]
    assert len(dataset.skipped) == 1 and "broken.png" in dataset.skipped[0]
    assert "broken.png" in caplog.text


def test_image_smaller_than_one_hr_patch_is_named(tmp_path: Path, set5_dir: Path) -> None:
    small = resize_bicubic(read_rgb(set5_dir / "bird.png"), 40, 31)  # HR patch is 32x32 at x2
    Image.fromarray(small).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png: 40x31 is smaller than one HR patch"):
        build_dataset(tmp_path, scale=2, patch_size=PATCH)
    with pytest.raises(DataError, match="none of its 1 images is usable"):
        build_dataset(tmp_path, scale=2, patch_size=PATCH, skip_bad=True)
    assert len(build_dataset(tmp_path, scale=2, patch_size=15).entries) == 1


def test_channel_shuffle_permutes_lr_and_hr_alike_and_covers_all_orders(set5_dir: Path) -> None:
    plain = build_dataset(set5_dir, scale=2, patch_size=PATCH)
    shuffled = build_dataset(set5_dir, scale=2, patch_size=PATCH, channel_shuffle=True)
    orders = set()
    for step in range(40):
        key = (2, step, 0, 0)
        plan = plan_patch(key, plain.lr_sizes, PATCH)
        order = list(CHANNEL_ORDERS[plan.channels])
        orders.add(tuple(order))
        (lr, hr), (lr_s, hr_s) = plain.sample(key), shuffled.sample(key)
        np.testing.assert_array_equal(lr_s, lr[..., order])
        np.testing.assert_array_equal(hr_s, hr[..., order])
    assert orders == set(CHANNEL_ORDERS)
    hr_image = modcrop(read_rgb(set5_dir / "bird.png"), 2)  # the pair stays exact:
    for order in CHANNEL_ORDERS:
        permuted = np.ascontiguousarray(hr_image[..., list(order)])
        np.testing.assert_array_equal(downscale(permuted, 2), downscale(hr_image, 2)[..., order])
