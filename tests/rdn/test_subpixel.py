"""The RGB conv moved before the last pixel shuffle computes the same image, with the same work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rdn.model import RDN, RDNConfig
from rdn.subpixel import fold_rgb_before_shuffle, subpixel_conv_weights


def random_conv(co: int, ci: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(co, ci, 3, 3, generator=generator)
    return weight, torch.randn(co, generator=generator)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_lr_conv_then_shuffle_equals_shuffle_then_hr_conv(r: int) -> None:
    weight, bias = random_conv(3, 5, seed=r)
    u = torch.rand(2, 5 * r * r, 7, 9, generator=torch.Generator().manual_seed(10 + r))
    hr = F.conv2d(F.pixel_shuffle(u, r), weight, bias, padding=1)
    lr_weight, lr_bias = subpixel_conv_weights(weight, bias, r)
    assert lr_weight.shape == (3 * r * r, 5 * r * r, 3, 3) and lr_bias.shape == (3 * r * r,)
    folded = F.pixel_shuffle(F.conv2d(u, lr_weight, lr_bias, padding=1), r)
    assert folded.shape == hr.shape == (2, 3, 7 * r, 9 * r)
    assert (folded - hr).abs().max().item() <= 1e-5  # borders included: zero padding lines up
    assert hr.abs().mean().item() > 0.1


@pytest.mark.parametrize("r", [2, 3, 4])
def test_every_hr_weight_lands_once_so_the_multiply_adds_match(r: int) -> None:
    weight, bias = random_conv(3, 4, seed=r)
    lr_weight, _ = subpixel_conv_weights(weight, bias, r)
    # the benchmarks count non-zero weights: the LR conv counts as the HR conv it replaces
    assert torch.count_nonzero(lr_weight).item() == weight.numel() * r * r
    assert sorted(lr_weight[lr_weight != 0].tolist()) == sorted((weight.flatten().tolist()) * r * r)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_folded_model_computes_the_same_image_with_a_small_last_shuffle(scale: int) -> None:
    torch.manual_seed(scale)
    model = RDN(RDNConfig.from_preset("tiny", scale=scale, norm="none")).eval()
    folded = fold_rgb_before_shuffle(model)
    x = torch.rand(2, 3, 13, 10, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference, result = model(x), folded(x)
    assert (reference - result).abs().max().item() <= 1e-5
    conv, shuffle = folded.upsample.to_rgb
    r = 2 if scale == 4 else scale
    assert isinstance(shuffle, nn.PixelShuffle) and shuffle.upscale_factor == r
    assert conv.out_channels == 3 * r * r  # what the last shuffle moves: 3 channels per pixel
    assert isinstance(model.upsample.to_rgb, nn.Conv2d)  # the source model is left alone


def test_refuses_what_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match=r"expected a \[Co, Ci, 3, 3\] weight, got \[3, 4, 5, 5\]"):
        subpixel_conv_weights(torch.zeros(3, 4, 5, 5), torch.zeros(3), 2)
    with pytest.raises(ValueError, match="upscale factor must be >= 2, got 1"):
        subpixel_conv_weights(torch.zeros(3, 4, 3, 3), torch.zeros(3), 1)
    model = RDN(RDNConfig.from_preset("tiny", scale=2, norm="none"))
    model.upsample.to_rgb = nn.Conv2d(
        model.upsample.to_rgb.in_channels, 3, 3, padding=1, bias=False
    )
    with pytest.raises(ValueError, match="not a biased 3x3 stride-1 padding-1 conv"):
        fold_rgb_before_shuffle(model)
