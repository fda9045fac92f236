"""Fake quantization for int8 models: the arithmetic onnxruntime's QDQ int8 graph computes.

An int8 RDN (``RDNConfig(quant="int8")``) quantizes what the exported QDQ model quantizes, in
the same places, with the same rules, so that training sees what serving will compute:

- activations: uint8, asymmetric, one (scale, zero point) per tensor, after every conv (after
  its ReLU where one follows), every concat and every residual add (``ActQuant``);
- weights: int8, symmetric, one scale per output channel (``absmax / 127``), recomputed from
  the current weights at every forward (``QConv2d``);
- the RGB output conv: int8 weights, and its output rounded to the 8-bit image's own grid
  (``ImageQuant``: [0, 1] at 1/255, zero point 0), the grid the served image is rounded to
  anyway; the graph then ends in integers (no float tensor of 4 to 9 times the feature size);
- the concats of one residual dense block share one range (``tie_ranges``): each concat's
  output is the previous one's plus one more tensor, so with one scale and zero point
  onnxruntime copies the part already quantized instead of requantizing it through a lookup
  table (the concats took 16 % of an x2 int8 run; sharing saved about a tenth of the engine's
  time, docs/int8.md). The ReLU outputs keep ranges of their own: a range starting at 0 is
  what makes their uint8 tensor the ReLU (the file has no Relu node);
- left in float32: the first conv's weights (3 input channels: 0.2 % of the multiply-adds), so
  that the network reads full-precision pixels.

Biases are int32 in the exported graph (scale = input scale x weight scale); their rounding is
below a thousandth of an activation level and is not simulated.

An ``ActQuant`` learns its range by observing: as a running mean of per-batch minima and
maxima (calibration), or as an exponential moving average (quantization-aware training).
What it has seen lives in buffers, so checkpoints carry it and a resume is exact; whether it
observes and whether it quantizes are plain attributes that the caller sets for each phase
(``configure``), never saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations (onnxruntime's u8s8 integer convolutions)
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127  # int8 weights; the symmetric scale uses 127
MIN_RANGE = 1e-6  # a constant tensor still gets a valid, non-zero scale
MIN_WEIGHT_ABSMAX = 1e-8  # an all-zero output channel still gets a valid scale
IMAGE_RANGE = (0.0, 1.0)  # the RGB output's grid: the served 8-bit image's (1/255, zero at 0)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 (scale, zero point) covering [lo, hi] and 0 exactly, as float32 stores the scale."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < MIN_RANGE:
        hi = lo + MIN_RANGE
    scale = float(torch.tensor((hi - lo) / (ACT_QMAX - ACT_QMIN), dtype=torch.float32))
    zero_point = int(min(max(round(ACT_QMIN - lo / scale), ACT_QMIN), ACT_QMAX))
    return scale, zero_point


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scales of a conv weight [Co, Ci, kh, kw]: absmax / 127."""
    absmax = weight.detach().abs().amax(dim=(1, 2, 3)).clamp_min(MIN_WEIGHT_ABSMAX)
    return (absmax / WEIGHT_QMAX).float()


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to its int8 grid (straight-through gradient)."""
    scales = weight_scales(weight)
    zeros = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(
        weight, scales, zeros, 0, WEIGHT_QMIN, WEIGHT_QMAX
    )


class ActQuant(nn.Module):
    """One activation tensor's uint8 quantizer: observes its range, rounds to its grid."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.active = True  # round to the grid (once anything was observed)
        self.observe = False  # update the range from each forward
        self.momentum: float | None = None  # None: running mean of batch extremes; else EMA
        self.peers: tuple[ActQuant, ...] = ()  # quantizers sharing one range (``tie_ranges``)

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of this tensor: of its own range, or of the union of its
        range and its peers' when tied (each observes its own tensor; all round alike)."""
        lo, hi = float(self.lo), float(self.hi)
        for peer in self.peers:
            if int(peer.count) > 0:
                lo, hi = min(lo, float(peer.lo)), max(hi, float(peer.hi))
        return activation_qparams(lo, hi)

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        n = int(self.count)
        weight = 1.0 / (n + 1) if self.momentum is None or n == 0 else self.momentum
        self.lo.add_((lo - self.lo) * weight)
        self.hi.add_((hi - self.hi) * weight)
        self.count.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self._update(x)
        if not self.active or int(self.count) == 0:
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


class ImageQuant(nn.Module):
    """The RGB output's quantizer: a fixed grid, the 8-bit image's (``IMAGE_RANGE``).

    Values outside [0, 1] clip, as the served image clips them; inside, rounding to the nearest
    1/255 is what converting the output to 8 bits does anyway (up to how ties round), so this
    point costs next to nothing in quality. It holds no state: a checkpoint written before the
    RGB conv was quantized loads as it was.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = True

    def qparams(self) -> tuple[float, int]:
        return activation_qparams(*IMAGE_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


class QConv2d(nn.Conv2d):
    """A conv whose weights are int8 (unless ``quantize_weight`` is off) and whose output, when
    ``quantize_output``, is a uint8 tensor of its own (``out_q``): on the 8-bit image's grid
    when ``image_output`` (the RGB conv), else on a range it observes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        *,
        quantize_weight: bool = True,
        quantize_output: bool = True,
        image_output: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.quantize_weight = quantize_weight
        self.active = True
        self.out_q: nn.Module = nn.Identity()
        if image_output:
            self.out_q = ImageQuant()
        elif quantize_output:
            self.out_q = ActQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.quantize_weight and self.active:
            weight = fake_quantize_weight(weight)
        return self.out_q(F.conv2d(x, weight, self.bias, padding=self.padding))


def tie_ranges(quantizers: list[ActQuant]) -> None:
    """Make ``quantizers`` round with one scale and zero point: their ranges' union."""
    for quantizer in quantizers:
        quantizer.peers = tuple(other for other in quantizers if other is not quantizer)


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def configure(
    model: nn.Module, *, active: bool, observe: bool, momentum: float | None = None
) -> None:
    """Set every quantizer of ``model``: round or not, observe or not, and how to average."""
    for module in model.modules():
        if isinstance(module, ActQuant):
            module.active, module.observe, module.momentum = active, observe, momentum
        elif isinstance(module, QConv2d | ImageQuant):
            module.active = active


def is_calibrated(model: nn.Module) -> bool:
    quantizers = act_quantizers(model)
    return bool(quantizers) and all(int(q.count) > 0 for q in quantizers)


@contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` computes in float32 and observes nothing (to export its float graph)."""
    saved = [
        (m, m.active, getattr(m, "observe", False))
        for m in model.modules()
        if isinstance(m, ActQuant | QConv2d | ImageQuant)
    ]
    configure(model, active=False, observe=False)
    try:
        yield model
    finally:
        for module, active, observe in saved:
            module.active = active
            if isinstance(module, ActQuant):
                module.observe = observe


def execution_order(model: nn.Module, channels: int = 3, side: int = 8) -> list[ActQuant]:
    """The activation quantizers in the order one forward pass reaches them."""
    order: list[ActQuant] = []
    handles = [
        q.register_forward_hook(lambda module, _inputs, _output: order.append(module))
        for q in act_quantizers(model)
    ]
    try:
        with torch.no_grad(), float_mode(model):
            parameter = next(model.parameters())
            model(torch.zeros(1, channels, side, side, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
    return order
