"""Plans by provider: the CPU fits tiles to each image (one tile, the whole image, when it fits),
the GPU cuts into a few shape buckets (checked with a fake engine: no GPU here); defaults follow
the active provider; a real server's answer equals whole-image inference."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from server.app import warmup_shapes, with_provider_defaults
from server.client import UpscaleClient
from server.config import BatcherConfig, ServerConfig, TilingConfig
from server.core.batcher import TileBatcher
from server.core.chunked import infer_chunked, to_uint8, to_unit_float
from server.core.engine import Engine
from server.core.planner import CPU_MAX_TILE_PIXELS, make_planner
from server.core.tiling import fit_axis, plan_buckets, sized_axis
from tests.background import BackgroundServer
from tests.server.loopback import NO_RETRY, loopback_config
from tests.server.reference import from_planar, to_planar

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
WAIT = 60.0


def test_auto_fits_tiles_on_cpu_and_uses_shape_buckets_on_cuda() -> None:
    auto = TilingConfig()
    cpu, gpu = make_planner(auto, CPU), make_planner(auto, CUDA)
    assert (cpu.mode, cpu.max_tile_pixels) == ("fit", CPU_MAX_TILE_PIXELS)
    assert gpu.mode == "buckets" and gpu.windows == (80, 144, 272)
    assert cpu.plan(160, 240).count == 1  # a 481x321 photo at x2: one tile, the whole image
    # On the GPU: 3 rows of 80 (240 < 1 x 272) and one column of 272 (< 2 x 144, 4 x 80):
    # 1.7x the image's pixels, where the 80x80 grid computes 12 tiles, 2.0x.
    plan = gpu.plan(160, 240)
    assert (plan.rows.count, plan.cols.count, plan.input_shape) == (3, 1, (80, 272))
    assert plan.waste == pytest.approx(1.7)
    assert make_planner(replace(auto, mode="grid"), CUDA).plan(160, 240).count == 12
    assert make_planner(replace(auto, mode="grid"), CPU).mode == "grid"
    assert make_planner(replace(auto, mode="fit"), CUDA).mode == "fit"
    with pytest.raises(ValueError, match="tiling mode 'tiles'"):
        make_planner(replace(auto, mode="tiles"), CPU)
    # Queue units are grid tiles' pixels: a whole 240x160 image is 6 units of 80x80.
    assert cpu.units(cpu.plan(160, 240)) == 6


def test_max_batch_follows_the_provider_unless_set(tiny_onnx_x2: Path) -> None:
    auto = ServerConfig(model=tiny_onnx_x2)
    assert auto.batcher.max_batch == 0
    assert with_provider_defaults(auto, CPU).batcher.max_batch == 1
    assert with_provider_defaults(auto, CUDA).batcher.max_batch == 8
    fixed = replace(auto, batcher=replace(auto.batcher, max_batch=3))
    assert with_provider_defaults(fixed, CPU) is fixed


@pytest.fixture(scope="module")
def shared_server_config(tiny_onnx_x2: Path) -> ServerConfig:
    """The CPU defaults: fitted tiles, max batch by provider."""
    base = loopback_config(tiny_onnx_x2)
    return replace(base, tiling=TilingConfig(), batcher=replace(base.batcher, max_batch=0))


def test_an_image_under_the_cap_is_computed_whole_like_the_whole_image_loop(
    server: BackgroundServer, engine: Engine
) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (61, 97, 3), np.uint8)
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client:
        result = client.upscale(rgb, "raw", timeout=WAIT)
        info = client.info(timeout=WAIT)
    whole = from_planar(engine.run(to_planar(rgb)[None])[0])
    assert result.tiles == 1
    np.testing.assert_array_equal(result.to_array(), whole)
    assert (info.max_batch, info.tiling, info.max_tile_pixels) == (1, "fit", CPU_MAX_TILE_PIXELS)
    assert (info.decode_workers, info.max_uploads) == (2, 16)
    assert (info.ort_spinning, info.ort_cpu_arena) == (True, True)  # the CPU choices
    assert list(info.tile_windows) == []  # no buckets on the CPU


def test_an_image_over_the_cap_is_tiled_within_a_level_of_the_whole_image(
    tiny_onnx_x2: Path, engine: Engine
) -> None:
    config = loopback_config(tiny_onnx_x2, tiling=TilingConfig(mode="fit", max_tile_pixels=48 * 48))
    rgb = np.random.default_rng(6).integers(0, 256, (90, 110, 3), np.uint8)
    with (
        BackgroundServer(config, engine) as server,
        UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client,
    ):
        result = client.upscale(rgb, "raw", timeout=WAIT)
    whole = from_planar(engine.run(to_planar(rgb)[None])[0])
    assert result.tiles > 4
    diff = np.abs(result.to_array().astype(int) - whole.astype(int))
    assert diff.max() <= 1


@pytest.mark.parametrize("length", [1, 7, 79, 80, 81, 143, 200, 271, 272, 273, 999])
@pytest.mark.parametrize("size", [80, 144, 272])
def test_sized_axis_windows_have_the_bucket_size_and_context_at_every_seam(
    length: int, size: int
) -> None:
    pad = 8
    axis = sized_axis(length, size, pad)
    assert axis.size == size and axis.before == 0
    assert axis.cores[0][0] == 0 and axis.cores[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(axis.cores))  # a partition
    if length <= size:
        assert (axis.count, axis.after) == (1, size - length)  # reflected past the end
        return
    assert axis.after == 0
    for start, (begin, end) in zip(axis.starts, axis.cores, strict=True):
        assert start >= 0 and start + size <= length  # inside the image
        assert start <= begin and end <= start + size
        if begin > 0:
            assert begin - start >= pad
        if end < length:
            assert start + size - end >= pad
    # the fewest tiles: one fewer core could not be cut into windows of ``size``
    fewer = fit_axis(length, axis.count - 1, pad)
    assert axis.count == 2 or fewer is None or fewer.size > size


def test_bucket_plans_take_the_cheapest_size_per_axis() -> None:
    sizes, pad = (80, 144, 272), 8
    for height, width in [(100, 100), (160, 240), (512, 512), (37, 2000), (1000, 700)]:
        plan = plan_buckets(height, width, sizes, pad)
        for axis, length in ((plan.rows, height), (plan.cols, width)):
            costs = [sized_axis(length, s, pad) for s in sizes]
            assert axis.count * axis.size == min(a.count * a.size for a in costs)
        assert plan.input_shape in make_planner(TilingConfig(), CUDA).shapes
    assert plan_buckets(2048, 2048, sizes, pad).waste < 1.15  # the 80x80 grid: 1.56


class NearestEngine:
    """A pixel-wise x2 model (nearest upsampling) that records every batch's shape."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.owners: list[set[int]] = []  # request k's pixels lie in [80k, 80k + 50)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        self.owners.append({round(float(v) * 255) // 80 for v in batch[:, 0, 0, 0]})
        return batch.repeat(2, axis=2).repeat(2, axis=3)


def test_gpu_buckets_stitch_exactly_and_batch_one_shape_across_requests() -> None:
    planner = make_planner(TilingConfig(), CUDA)
    engine = NearestEngine()
    images = [  # request k's pixels lie in [80k, 80k + 50): a tile tells whose it is
        np.random.default_rng(k).integers(80 * k, 80 * k + 50, (150, 150, 3), np.uint8)
        for k in range(3)
    ]

    async def run_all() -> list[np.ndarray]:
        batcher = TileBatcher(engine, BatcherConfig(max_batch=8, max_delay_ms=20), 80 * 80)
        await batcher.start()
        try:
            canvases = [np.empty((300, 300, 3), np.uint8) for _ in images]
            await asyncio.gather(
                *(
                    infer_chunked(
                        batcher,
                        [rgb.transpose(2, 0, 1)],
                        [canvas.transpose(2, 0, 1)],
                        plan=planner.plan,
                        scale=2,
                        ensemble=False,
                        chunk_pixels=64 * 80 * 80,
                        request_id=f"r{k}",
                        to_model=to_unit_float,
                        from_model=to_uint8,
                    )
                    for k, (rgb, canvas) in enumerate(zip(images, canvases, strict=True))
                )
            )
            return canvases
        finally:
            await batcher.stop()

    canvases = asyncio.run(run_all())
    for rgb, canvas in zip(images, canvases, strict=True):
        np.testing.assert_array_equal(canvas, rgb.repeat(2, axis=0).repeat(2, axis=1))
    plan = planner.plan(150, 150)  # 3 x 3 windows of 80: 3 x 80 < 1 x 272 < 2 x 144
    assert plan.input_shape == (80, 80) and plan.count == 9
    assert {shape[2:] for shape in engine.batches} == {(80, 80)}
    assert sum(shape[0] for shape in engine.batches) == 3 * 9
    assert max(len(owners) for owners in engine.owners) > 1  # requests shared a batch


def test_warm_up_runs_every_bucket_shape_at_every_batch_size_that_fits() -> None:
    gpu = make_planner(TilingConfig(), CUDA)
    pairs = warmup_shapes(gpu, 8)
    assert {shape for shape, _ in pairs} == set(gpu.shapes) and len(gpu.shapes) == 9
    assert ((80, 80), 8) in pairs and ((272, 272), 1) in pairs
    for shape, size in pairs:  # a batch holds at most 8 queue units of 80x80
        assert size == 1 or size * gpu.units_per_tile_of(shape) <= 8
    cpu = make_planner(TilingConfig(), CPU)
    assert warmup_shapes(cpu, 1) == [((80, 80), 1)]
