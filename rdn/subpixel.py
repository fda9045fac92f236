"""Move the RGB conv in front of the last PixelShuffle: the same function, far less shuffling.

An RDN ends in ``PixelShuffle(r)`` (ONNX DepthToSpace) of G*r*r feature channels, then a 3x3
conv from G channels to RGB at high resolution. onnxruntime's CPU DepthToSpace is a plain
element-wise copy outside its NCHWc layout: in onnxruntime's profile of the small model, it and
the layout reorders around it took 11-13 % of an x2 batch and 28 % of an x4 one. The same 3x3 HR
conv can run *before* the shuffle, as a 3x3 conv at the lower resolution from G*r*r to 3*r*r
channels; the shuffle then moves 3*r*r channels instead of G*r*r.

The LR conv has r*r times the HR conv's multiply-adds, but (r*r - 1)/(r*r) of its weights are
structural zeros: each HR tap lands on exactly one (LR tap, sub-pixel) pair. Its non-zero
multiply-adds equal the HR conv's, which is what the benchmarks count.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rdn.model import RDN

KERNEL = 3  # the HR conv this applies to: 3x3, stride 1, padding 1


def subpixel_conv_weights(
    weight: torch.Tensor, bias: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the LR conv with ``shuffle(lr_conv(u)) == hr_conv(shuffle(u))``.

    ``weight`` [Co, Ci, 3, 3] and ``bias`` [Co] are those of a stride-1, padding-1 conv at high
    resolution; ``shuffle`` is ``PixelShuffle(r)`` (channel ``c*r*r + i*r + j`` becomes
    sub-pixel (i, j) of channel c). The result is [Co*r*r, Ci*r*r, 3, 3] and [Co*r*r], for a
    stride-1, padding-1 conv: HR output row ``r*h + a`` reads HR row ``r*h + a + dy``, which is
    LR row ``h + (a + dy) // r``, sub-row ``(a + dy) % r``; |dy| <= 1 < r keeps the LR offset in
    -1..1 and zero padding at either resolution lines up.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (KERNEL, KERNEL):
        raise ValueError(f"expected a [Co, Ci, 3, 3] weight, got {list(weight.shape)}")
    if r < 2:
        raise ValueError(f"upscale factor must be >= 2, got {r}")
    co, ci = weight.shape[:2]
    # [o, a, b, c, i, j, ky, kx]: output channel (o, a, b), input channel (c, i, j)
    lr = weight.new_zeros(co, r, r, ci, r, r, KERNEL, KERNEL)
    for a in range(r):
        for dy in (-1, 0, 1):
            ky, i = divmod(a + dy, r)
            for b in range(r):
                for dx in (-1, 0, 1):
                    kx, j = divmod(b + dx, r)
                    lr[:, a, b, :, i, j, ky + 1, kx + 1] = weight[:, :, dy + 1, dx + 1]
    return lr.reshape(co * r * r, ci * r * r, KERNEL, KERNEL), bias.repeat_interleave(r * r)


def fold_rgb_before_shuffle(model: RDN) -> RDN:
    """A copy of ``model`` whose RGB conv runs before its last PixelShuffle (same function)."""
    folded = copy.deepcopy(model).eval()
    upsampler = folded.upsample
    stages = list(upsampler.body)
    shuffle, conv = stages[-1], upsampler.to_rgb
    if not isinstance(shuffle, nn.PixelShuffle) or not isinstance(conv, nn.Conv2d):
        raise ValueError("the upsampler does not end in PixelShuffle then a conv")
    if conv.bias is None or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
        raise ValueError("the RGB conv is not a biased 3x3 stride-1 padding-1 conv")
    r = shuffle.upscale_factor
    weight, bias = subpixel_conv_weights(conv.weight.detach(), conv.bias.detach(), r)
    lr_conv = nn.Conv2d(weight.shape[1], weight.shape[0], KERNEL, padding=1)
    with torch.no_grad():
        lr_conv.weight.copy_(weight)
        lr_conv.bias.copy_(bias)
    upsampler.body = nn.Sequential(*stages[:-1])
    upsampler.to_rgb = nn.Sequential(lr_conv, nn.PixelShuffle(r))
    return folded


def hr_conv_weights(
    weight: torch.Tensor, bias: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``subpixel_conv_weights``: the HR conv's [Co, Ci, 3, 3] weight and [Co] bias.

    Every HR tap sits at exactly one (LR tap, sub-pixel) pair of output sub-pixel (0, 0), so
    reading those back recovers the HR conv exactly.
    """
    if weight.dim() != 4 or weight.shape[0] % (r * r) or weight.shape[1] % (r * r):
        raise ValueError(f"not an LR conv of a x{r} shuffle: weight {list(weight.shape)}")
    co, ci = weight.shape[0] // (r * r), weight.shape[1] // (r * r)
    lr = weight.reshape(co, r, r, ci, r, r, KERNEL, KERNEL)
    hr = weight.new_zeros(co, ci, KERNEL, KERNEL)
    for dy in (-1, 0, 1):
        ky, i = divmod(dy, r)
        for dx in (-1, 0, 1):
            kx, j = divmod(dx, r)
            hr[:, :, dy + 1, dx + 1] = lr[:, 0, 0, :, i, j, ky + 1, kx + 1]
    return hr, bias.reshape(co, r * r)[:, 0].clone()
