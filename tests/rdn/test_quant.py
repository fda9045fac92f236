"""Fake quantization (rdn.quant) and int8 twins (rdn.int8): the rules the int8 export follows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rdn.checkpoint import load_model
from rdn.int8 import calibrate, calibration_batches, int8_model
from rdn.model import RDN, RDNConfig
from rdn.quant import (
    ACT_QMAX,
    ActQuant,
    ImageQuant,
    QConv2d,
    act_quantizers,
    activation_qparams,
    execution_order,
    fake_quantize_weight,
    float_mode,
    is_calibrated,
    weight_scales,
)


@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 3.0), (0.0, 6.0), (0.5, 2.0), (-2.0, -0.5), (0, 0)])
def test_activation_grid_covers_the_range_and_zero_exactly(lo: float, hi: float) -> None:
    scale, zero_point = activation_qparams(lo, hi)
    assert scale > 0 and 0 <= zero_point <= ACT_QMAX
    x = torch.tensor([0.0, min(lo, 0.0), max(hi, 0.0)])
    q = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACT_QMAX)
    assert q[0].item() == 0.0  # zero is on the grid: ReLU outputs and padding stay exact
    assert torch.allclose(q, x, atol=scale / 2 + 1e-7)


def test_weight_grid_is_per_output_channel_absmax_over_127() -> None:
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 100  # one large channel must not coarsen the others
    scales = weight_scales(w)
    assert torch.allclose(scales, w.abs().amax(dim=(1, 2, 3)) / 127)
    q = fake_quantize_weight(w)
    assert ((q - w).abs().amax(dim=(1, 2, 3)) <= scales / 2 + 1e-6).all()
    assert torch.allclose(
        q / scales[:, None, None, None], (q / scales[:, None, None, None]).round(), atol=1e-4
    )


def test_a_float_models_config_and_state_are_as_before_int8_existed() -> None:
    config = RDNConfig.from_preset("tiny")
    assert "quant" not in config.to_dict()
    assert not act_quantizers(RDN(config))
    with pytest.raises(ValueError, match="norm='none'"):
        RDNConfig.from_preset("tiny", norm="batch", quant="int8")


def test_the_int8_twin_computes_the_float_function_in_float_mode(
    tiny_checkpoint: Path, set5_dir: Path
) -> None:
    model, _ = load_model(tiny_checkpoint)  # BatchNorm with real statistics: folded here
    twin = int8_model(model).eval()
    assert twin.config.norm == "none" and twin.config.quant == "int8"
    x = torch.rand(2, 3, 20, 24)
    with torch.no_grad():
        assert not is_calibrated(twin)
        with float_mode(twin):
            assert torch.allclose(twin(x), model(x), atol=1e-5)  # BatchNorm folded exactly
        calibrate(twin, calibration_batches(set5_dir, 2, crop=24, limit=3))
        assert is_calibrated(twin)
        rounded = twin(x)
        with float_mode(twin):
            assert torch.allclose(twin(x), model(x), atol=1e-5)
    # the RGB output is on the 8-bit image's grid, so it clips to [0, 1] as the image does
    clipped = model(x).detach().clamp(0, 1)
    assert not torch.allclose(rounded, clipped, atol=1e-4)
    assert (rounded - clipped).abs().mean() < 0.02  # rounded, not broken
    assert rounded.min() >= 0 and rounded.max() <= 1
    levels = rounded * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_the_rgb_conv_is_int8_and_writes_the_image_grid_with_no_state(
    tiny_checkpoint: Path,
) -> None:
    """The RGB conv has int8 weights and a fixed [0, 1] / 255 output grid; it adds nothing to
    the state, so checkpoints written before it was quantized load unchanged."""
    twin = int8_model(load_model(tiny_checkpoint)[0])
    rgb = twin.upsample.to_rgb
    assert isinstance(rgb, QConv2d) and rgb.quantize_weight and isinstance(rgb.out_q, ImageQuant)
    assert rgb.out_q.qparams() == (float(torch.tensor(1 / 255)), 0)
    assert not [k for k in twin.state_dict() if k.startswith("upsample.to_rgb.out_q")]


def test_quantizers_are_reached_in_graph_order_once_each(tiny_checkpoint: Path) -> None:
    twin = int8_model(load_model(tiny_checkpoint)[0])
    order = execution_order(twin)
    assert len(order) == len(set(map(id, order))) == len(act_quantizers(twin))
    # the first is the shallow feature conv's output, the last the upsampler conv's
    assert order[0] is twin.sfe1.out_q and order[-1] is twin.upsample.body[0].out_q
    assert all(isinstance(q, ActQuant) for q in order)


def test_the_concats_of_a_block_round_on_the_union_of_their_ranges() -> None:
    model = RDN(RDNConfig(scale=2, G0=8, D=2, C=3, G=4, norm="none", quant="int8"))
    for b, block in enumerate(model.rdbs):
        for k, layer in enumerate(block.layers):
            for quantizer, lo, hi in (
                (layer.cat_q, -1.0 - b - k, 2.0 + k),
                (layer.relu_q, 0, k + 1),
            ):
                quantizer.lo.fill_(lo)
                quantizer.hi.fill_(hi)
                quantizer.count.fill_(1)
    for b, block in enumerate(model.rdbs):
        union = activation_qparams(-1.0 - b - 2, 2.0 + 2)  # block b's widest: its last layer's
        assert [layer.cat_q.qparams() for layer in block.layers] == [union] * 3
        # the ReLU outputs keep their own ranges (from 0: the uint8 tensor is the ReLU)
        assert [layer.relu_q.qparams() for layer in block.layers] == [
            activation_qparams(0, k + 1) for k in range(3)
        ]
