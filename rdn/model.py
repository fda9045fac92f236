"""Residual Dense Network (Zhang et al., CVPR 2018, arXiv 1802.08797), readable top to bottom.

Names follow the paper: G0 (feature width), D (residual dense blocks), C (conv layers per
block), G (growth rate). With ``norm="batch"`` every dense-layer conv and every local feature
fusion conv is followed by a BatchNorm that training freezes into eval mode after a short
calibration phase (see ``FreezableBatchNorm2d``); with ``norm="none"`` the network is the
paper's exactly.

Input and output: float32 RGB in [0, 1], NCHW, any height and width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rdn.constants import DEFAULT_SCALE, SCALES
from rdn.quant import ActQuant, QConv2d, tie_ranges

__all__ = ["NORMS", "PRESETS", "QUANTS", "RDN", "SCALES", "RDNConfig"]

NORMS = ("batch", "none")
QUANTS = ("none", "int8")  # "int8": fake-quantized as the exported int8 model computes

# preset name -> (G0, D, C, G)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "paper": (64, 16, 8, 64),
    "medium": (64, 8, 6, 32),
    "small": (32, 4, 4, 32),
    "tiny": (16, 3, 3, 16),
}


@dataclass(frozen=True)
class RDNConfig:
    """One RDN architecture; stored in every checkpoint so ``RDN(RDNConfig(**d))`` rebuilds it."""

    scale: int = DEFAULT_SCALE
    G0: int = 64  # feature width of shallow features, block outputs and fusion
    D: int = 16  # number of residual dense blocks
    C: int = 8  # conv layers per residual dense block
    G: int = 64  # growth rate: channels each dense layer adds
    norm: str = "batch"  # "batch": BN after dense/LFF convs, frozen during training
    quant: str = "none"  # "int8": quantization-aware (rdn.quant), BN already folded

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.quant != "none" and self.norm != "none":
            raise ValueError("an int8 model has its BatchNorm folded: use norm='none'")
        for name in ("G0", "D", "C", "G"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_preset(
        cls, preset: str, scale: int = DEFAULT_SCALE, norm: str = "batch", quant: str = "none"
    ) -> RDNConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        G0, D, C, G = PRESETS[preset]
        return cls(scale=scale, G0=G0, D=D, C=C, G=G, norm=norm, quant=quant)

    def to_dict(self) -> dict[str, Any]:
        # A float model's dict has no "quant" key, as before int8 existed, so its files and
        # their metadata are unchanged.
        d = asdict(self)
        if self.quant == "none":
            del d["quant"]
        return d


class FreezableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, once frozen, always normalises with its running statistics.

    The frozen flag is a buffer, so it travels with ``state_dict`` through checkpoints, and
    ``model.train()`` cannot undo it: a frozen layer computes the same function in train and
    eval mode and never updates its running statistics again. The affine weight and bias
    stay trainable. (torchvision's ``FrozenBatchNorm2d`` freezes those too; here they keep
    learning after the freeze.)
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def freeze(self) -> None:
        self.frozen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.frozen):
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _norm(channels: int, norm: str) -> nn.Module:
    return FreezableBatchNorm2d(channels) if norm == "batch" else nn.Identity()


def _conv(
    cin: int, cout: int, k: int, quant: str, *, weight: bool = True, output: bool = True
) -> nn.Conv2d:
    """A conv; for an int8 model one with int8 ``weight`` and a quantized ``output``."""
    if quant == "none":
        return nn.Conv2d(cin, cout, k, padding=k // 2)
    return QConv2d(cin, cout, k, k // 2, quantize_weight=weight, quantize_output=output)


def _act(quant: str) -> nn.Module:
    """A point where the int8 model holds a uint8 tensor (identity for a float model)."""
    return nn.Identity() if quant == "none" else ActQuant()


class DenseLayer(nn.Module):
    """conv3x3 (in -> G) [+ BN] + ReLU, output concatenated to the input."""

    def __init__(self, in_channels: int, G: int, norm: str, quant: str = "none") -> None:
        super().__init__()
        self.conv = _conv(in_channels, G, 3, quant, output=False)  # quantized after the ReLU
        self.norm = _norm(G, norm)
        self.relu_q = _act(quant)
        self.cat_q = _act(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cat_q(torch.cat([x, self.relu_q(F.relu(self.norm(self.conv(x))))], dim=1))


class RDB(nn.Module):
    """Residual dense block: C dense layers, 1x1 local feature fusion, local residual."""

    def __init__(self, G0: int, C: int, G: int, norm: str, quant: str = "none") -> None:
        super().__init__()
        self.layers = nn.Sequential(*(DenseLayer(G0 + c * G, G, norm, quant) for c in range(C)))
        self.lff = _conv(G0 + C * G, G0, 1, quant)
        self.lff_norm = _norm(G0, norm)
        self.add_q = _act(quant)
        if quant != "none":  # one range for the block's concats (rdn.quant: copies, not LUTs)
            tie_ranges([layer.cat_q for layer in self.layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, G0, H, W] -> layers: [N, G0 + C*G, H, W] -> lff: [N, G0, H, W]
        return self.add_q(x + self.lff_norm(self.lff(self.layers(x))))


class Upsampler(nn.Module):
    """ESPCN sub-pixel upsampling: x2/x3 one conv + PixelShuffle(r), x4 two x2 stages."""

    def __init__(self, G0: int, G: int, scale: int, quant: str = "none") -> None:
        super().__init__()
        stages: list[nn.Module] = []
        if scale == 4:
            stages += [_conv(G0, G * 4, 3, quant), nn.PixelShuffle(2)]
            stages += [_conv(G, G * 4, 3, quant), nn.PixelShuffle(2)]
        else:
            stages += [_conv(G0, G * scale * scale, 3, quant), nn.PixelShuffle(scale)]
        self.body = nn.Sequential(*stages)
        # int8: int8 weights and the output on the 8-bit image's grid (rdn.quant.ImageQuant)
        self.to_rgb = (
            nn.Conv2d(G, 3, 3, padding=1)
            if quant == "none"
            else QConv2d(G, 3, 3, 1, image_output=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(self.body(x))


class RDN(nn.Module):
    def __init__(self, config: RDNConfig) -> None:
        super().__init__()
        self.config = config
        G0, D, C, G, quant = config.G0, config.D, config.C, config.G, config.quant
        # F_-1, feeds the global residual; int8 models keep its weights float (3 input channels)
        self.sfe1 = _conv(3, G0, 3, quant, weight=False)
        self.sfe2 = _conv(G0, G0, 3, quant)  # F_0
        self.rdbs = nn.ModuleList(RDB(G0, C, G, config.norm, quant) for _ in range(D))
        self.gff_cat_q = _act(quant)
        self.gff = nn.Sequential(
            _conv(D * G0, G0, 1, quant),
            _conv(G0, G0, 3, quant),
        )
        self.gff_add_q = _act(quant)
        self.upsample = Upsampler(G0, G, config.scale, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3, H, W] in [0, 1] -> [N, 3, scale*H, scale*W]
        f_minus1 = self.sfe1(x)
        f = self.sfe2(f_minus1)
        block_outputs = []
        for rdb in self.rdbs:
            f = rdb(f)
            block_outputs.append(f)
        f = self.gff(self.gff_cat_q(torch.cat(block_outputs, dim=1)))
        f = self.gff_add_q(f + f_minus1)  # dense feature fusion
        return self.upsample(f)


def batchnorm_layers(model: nn.Module) -> list[FreezableBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, FreezableBatchNorm2d)]


def freeze_batchnorm(model: nn.Module) -> int:
    """Freeze every BatchNorm of ``model`` into eval mode; returns how many were frozen."""
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.freeze()
    return len(layers)


def batchnorm_frozen(model: nn.Module) -> bool:
    """True when the model has no BatchNorm or every BatchNorm is frozen."""
    return all(bool(layer.frozen) for layer in batchnorm_layers(model))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
