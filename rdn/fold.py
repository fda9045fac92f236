"""BatchNorm folded into the conv before it: what export writes and int8 twins train on."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rdn.model import RDN


def fold_batchnorm(model: RDN) -> RDN:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the conv before it.

    Folding uses the running statistics, so the copy computes ``model.eval()``'s function (up
    to float rounding); a frozen BatchNorm computes that function in training too. Raises
    ValueError if a BatchNorm has no conv before it.
    """
    folded = copy.deepcopy(model).eval()
    for rdb in folded.rdbs:
        for layer in rdb.layers:
            if isinstance(layer.norm, nn.BatchNorm2d):
                layer.conv = fuse_conv_bn_eval(layer.conv, layer.norm)
                layer.norm = nn.Identity()
        if isinstance(rdb.lff_norm, nn.BatchNorm2d):
            rdb.lff = fuse_conv_bn_eval(rdb.lff, rdb.lff_norm)
            rdb.lff_norm = nn.Identity()
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(f"BatchNorm layers not preceded by a foldable conv: {left}")
    return folded
