"""x8 self-ensemble: the transforms invert exactly; an equivariant model is unchanged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rdn.ensemble import N_TRANSFORMS, inverse_transform, self_ensemble, transform


def batch(shape: tuple[int, ...] = (2, 3, 5, 7), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def nearest_x3(x: np.ndarray) -> np.ndarray:
    """A model that commutes with flips and rotations: nearest-neighbour upscaling."""
    return np.repeat(np.repeat(x, 3, axis=2), 3, axis=3)


@pytest.mark.parametrize("index", range(N_TRANSFORMS))
def test_inverse_undoes_transform(index: int) -> None:
    x = batch()
    y = transform(x, index)
    assert y.flags.c_contiguous
    assert y.shape == ((2, 3, 7, 5) if index % 2 else x.shape)
    np.testing.assert_array_equal(inverse_transform(y, index), x)


@pytest.mark.parametrize("index", range(N_TRANSFORMS))
def test_inverse_undoes_transform_on_upscaled_outputs(index: int) -> None:
    x = batch()
    np.testing.assert_array_equal(
        inverse_transform(nearest_x3(transform(x, index)), index), nearest_x3(x)
    )


def test_the_eight_transforms_are_distinct() -> None:
    x = batch((1, 1, 4, 4))
    assert len({transform(x, i).tobytes() for i in range(N_TRANSFORMS)}) == N_TRANSFORMS


def test_equivariant_model_is_unchanged_by_the_ensemble() -> None:
    x = batch()
    calls = []

    def predict(z: np.ndarray) -> np.ndarray:
        calls.append(z.shape)
        return nearest_x3(z)

    out = self_ensemble(predict, x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, nearest_x3(x))
    assert len(calls) == N_TRANSFORMS
    assert sorted(set(calls)) == [(2, 3, 5, 7), (2, 3, 7, 5)]


def test_ensemble_averages_a_model_that_is_not_equivariant() -> None:
    x = np.zeros((1, 1, 4, 4), np.float32)

    def ramp(z: np.ndarray) -> np.ndarray:  # adds the column index: not rotation-invariant
        return z + np.arange(z.shape[-1], dtype=np.float32)

    out = self_ensemble(ramp, x)
    # Averaged over the 8 orientations every pixel gets the mean column index, 1.5.
    np.testing.assert_allclose(out, np.full_like(x, 1.5), atol=1e-6)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="transform index"):
        transform(batch(), N_TRANSFORMS)
    with pytest.raises(ValueError, match="NCHW"):
        self_ensemble(nearest_x3, batch((3, 5, 7)))
    with pytest.raises(ValueError, match="equivariant"):
        self_ensemble(lambda z: z[..., :4], batch())  # crops columns: shapes disagree


def test_importing_the_ensemble_does_not_import_torch() -> None:
    code = "import sys, rdn.ensemble; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
