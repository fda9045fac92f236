"""Plans by provider: the CPU fits tiles to each image (one tile, the whole image, when it fits),
the GPU keeps the fixed grid; defaults follow the active provider; a real server's answer equals
whole-image inference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from server.client import UpscaleClient
from server.codec import from_planar, to_planar
from server.config import ServerConfig, TilingConfig
from server.engine import Engine
from server.main import BackgroundServer, with_provider_defaults
from server.planner import CPU_MAX_TILE_PIXELS, make_planner
from tests.server.loopback import NO_RETRY, loopback_config

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
WAIT = 60.0


def test_auto_fits_tiles_on_cpu_and_keeps_the_grid_on_cuda() -> None:
    auto = TilingConfig()
    cpu, gpu = make_planner(auto, CPU), make_planner(auto, CUDA)
    assert (cpu.mode, cpu.max_tile_pixels) == ("fit", CPU_MAX_TILE_PIXELS)
    assert gpu.mode == "grid"
    assert cpu.plan(160, 240).count == 1  # a 481x321 photo at x2: one tile, the whole image
    assert gpu.plan(160, 240).count == 3 * 4 and gpu.plan(160, 240).input_shape == (80, 80)
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
