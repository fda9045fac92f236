"""Geometric self-ensemble (the paper's RDN+): average a model over the 8 dihedral transforms.

Each input is rotated by 0/90/180/270 degrees, with and without a horizontal flip; the model
runs on all 8 versions, every output is transformed back and the 8 are averaged. RDN+ gains
0.06-0.14 dB on Set5 this way for 8x the compute.

numpy only (no torch): the gRPC server imports this module. Arrays are NCHW; transforms act
on the last two axes, so they serve any batch and channel count, and at any scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_TRANSFORMS = 8  # the dihedral group of the square: 4 rotations x {no flip, flip}


def _check_index(index: int) -> None:
    if not 0 <= index < N_TRANSFORMS:
        raise ValueError(f"transform index must be in [0, {N_TRANSFORMS}), got {index}")


def transform(x: np.ndarray, index: int) -> np.ndarray:
    """Dihedral transform ``index`` of an NCHW array: flip if ``index >= 4``, then rotate
    by ``index % 4`` quarter turns. Returns a C-contiguous copy (ready for torch/onnxruntime)."""
    _check_index(index)
    if index >= 4:
        x = x[..., ::-1]
    return np.ascontiguousarray(np.rot90(x, index % 4, axes=(-2, -1)))


def inverse_transform(y: np.ndarray, index: int) -> np.ndarray:
    """Undo ``transform(., index)`` on an NCHW array (a model output at any scale)."""
    _check_index(index)
    y = np.rot90(y, -(index % 4), axes=(-2, -1))
    if index >= 4:
        y = y[..., ::-1]
    return np.ascontiguousarray(y)


def self_ensemble(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Mean of ``inverse_transform(predict(transform(x, i)), i)`` over the 8 transforms.

    ``predict`` maps an NCHW float32 batch to an NCHW float32 batch (e.g. LR -> SR). The
    result is float32 and not clipped; clip and round it as a single prediction would be.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW array, got shape {x.shape}")
    total = inverse_transform(np.asarray(predict(transform(x, 0))), 0).astype(np.float64)
    for index in range(1, N_TRANSFORMS):
        y = inverse_transform(np.asarray(predict(transform(x, index))), index)
        if y.shape != total.shape:
            raise ValueError(
                f"prediction for transform {index} has shape {y.shape} after inversion, "
                f"expected {total.shape}: predict must be equivariant in shape (an SR model is)"
            )
        total += y
    return (total / N_TRANSFORMS).astype(np.float32)
