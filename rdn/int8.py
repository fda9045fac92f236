"""Int8 models from float ones: fold, copy, calibrate (torch only).

``int8_model`` turns any float RDN (BatchNorm or not) into its quantization-aware twin
(``RDNConfig(norm="none", quant="int8")``), which computes the same float function in
``rdn.quant.float_mode``; ``calibrate`` gives its activation quantizers their ranges.
rdn-train --qat starts from the result and rdn-export --int8 writes it as a QDQ ONNX model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdn.fold import fold_batchnorm
from rdn.imaging import downscale, list_images, modcrop, read_rgb, to_tensor_layout
from rdn.model import RDN
from rdn.quant import ActQuant, configure

CALIBRATION_CROP = 64  # LR pixels a side of each calibration crop
CALIBRATION_CROPS_PER_IMAGE = 2
CALIBRATION_BATCH = 8
QAT_MOMENTUM = 0.01  # EMA of activation ranges while quantization-aware training observes


def folded_state(model: RDN) -> dict[str, torch.Tensor]:
    """The weights of ``model`` (eval mode) with every BatchNorm folded into its conv."""
    return {k: v.detach().clone() for k, v in fold_batchnorm(model).state_dict().items()}


def int8_model(model: RDN) -> RDN:
    """The int8 twin of float ``model``, uncalibrated (activations pass unrounded until then)."""
    if model.config.quant != "none":
        return copy.deepcopy(model)
    twin = RDN(replace(model.config, norm="none", quant="int8"))
    missing, unexpected = twin.load_state_dict(folded_state(model), strict=False)
    stray = [k for k in missing if not _is_quantizer_state(twin, k)]
    if stray or unexpected:
        raise ValueError(f"int8 twin does not fit the float model: {stray or unexpected}")
    return twin


def _is_quantizer_state(model: nn.Module, key: str) -> bool:
    owner = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(owner, ActQuant)


@torch.no_grad()
def calibrate(model: RDN, batches: Iterable[torch.Tensor]) -> int:
    """Set every activation range to the mean of the per-batch extremes over ``batches``.

    Returns the number of batches seen. Leaves the model rounding and not observing.
    """
    for q in model.modules():
        if isinstance(q, ActQuant):
            q.count.zero_()
    was_training = model.training
    model.eval()
    configure(model, active=False, observe=True, momentum=None)
    seen = 0
    device = next(model.parameters()).device
    for batch in batches:
        model(batch.to(device))
        seen += 1
    configure(model, active=True, observe=False)
    model.train(was_training)
    if not seen:
        raise ValueError("calibration saw no images")
    return seen


def calibration_batches(
    folder: Path,
    scale: int,
    *,
    crop: int = CALIBRATION_CROP,
    per_image: int = CALIBRATION_CROPS_PER_IMAGE,
    batch: int = CALIBRATION_BATCH,
    limit: int | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """LR crops of the photos of ``folder`` (the benchmark's bicubic downscale), in batches."""
    paths = list_images(folder)[:limit]
    if not paths:
        raise ValueError(f"calibration folder {folder}: no images")
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    for path in paths:
        lr = downscale(modcrop(read_rgb(path), scale), scale)
        h, w = lr.shape[:2]
        side_y, side_x = min(crop, h), min(crop, w)
        for _ in range(per_image):
            y = int(rng.integers(0, h - side_y + 1))
            x = int(rng.integers(0, w - side_x + 1))
            crops.append(to_tensor_layout(lr[y : y + side_y, x : x + side_x])[0])
    return _batched(crops, batch)


def _batched(crops: Sequence[np.ndarray], batch: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for c in crops:
        by_shape.setdefault(c.shape, []).append(c)
    for group in by_shape.values():
        for i in range(0, len(group), batch):
            out.append(torch.from_numpy(np.stack(group[i : i + batch])))
    return out
