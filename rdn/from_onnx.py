"""A trainable model rebuilt from an exported ONNX file, to fine-tune a shipped model.

Export folds each frozen BatchNorm into the conv before it and moves the RGB conv in front of
the last pixel shuffle (``rdn.subpixel``). Both are exact and both invert: the folded conv
keeps its weights with a BatchNorm of identity statistics (mean 0, variance 1 - eps, scale 1,
shift 0, frozen), and the HR RGB conv is read back from the LR one. The rebuilt model computes
the ONNX model's function (checked against onnxruntime in the tests) and trains like any
``--init`` checkpoint whose BatchNorm arrived frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from rdn.checkpoint import make_payload
from rdn.metadata import MetadataError, ModelMetadata
from rdn.model import RDN, FreezableBatchNorm2d, RDNConfig, batchnorm_layers, freeze_batchnorm
from rdn.subpixel import hr_conv_weights

RGB_LR_CONV = "upsample.to_rgb.0"  # the exported name of the RGB conv moved before the shuffle
RGB_HR_CONV = "upsample.to_rgb"


class OnnxImportError(ValueError):
    """The ONNX file is not an export of this project's RDN; the message says why."""


def model_from_onnx(path: Path) -> tuple[RDN, ModelMetadata]:
    """The RDN (BatchNorm frozen at identity) whose function is the ONNX file's."""
    try:
        proto = onnx.load(str(path))
        meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    except (OSError, MetadataError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        cause = " ".join(str(e).split())  # the checker's messages span lines; errors are one
        raise OnnxImportError(f"model {path}: cannot be read as an rdn export ({cause})") from e
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise OnnxImportError(f"model {path}: not an ONNX model ({type(e).__name__})") from e
    if meta.precision != "float32":
        raise OnnxImportError(f"model {path}: {meta.precision} weights; import a float32 export")
    config = RDNConfig(**meta.config)
    weights = {
        i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer
    }
    model = RDN(config).eval()
    state = model.state_dict()
    r = 2 if config.scale == 4 else config.scale  # the last shuffle's factor
    lr_w = weights.pop(f"{RGB_LR_CONV}.weight", None)
    lr_b = weights.pop(f"{RGB_LR_CONV}.bias", None)
    if lr_w is None or lr_b is None:
        raise OnnxImportError(f"model {path}: no {RGB_LR_CONV} conv; not an rdn-export file")
    hr_w, hr_b = hr_conv_weights(lr_w, lr_b, r)
    weights[f"{RGB_HR_CONV}.weight"], weights[f"{RGB_HR_CONV}.bias"] = hr_w, hr_b
    for name, tensor in weights.items():
        if name not in state or state[name].shape != tensor.shape:
            raise OnnxImportError(f"model {path}: tensor {name} {list(tensor.shape)} does not fit")
        state[name] = tensor
    norms = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, FreezableBatchNorm2d)
        for key in module.state_dict()
    }
    missing = [n for n in state if n not in weights and n not in norms]
    if missing:
        raise OnnxImportError(f"model {path}: no weights for {missing[:4]}")
    model.load_state_dict(state)
    for bn in batchnorm_layers(model):
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    freeze_batchnorm(model)
    return model, meta


def checkpoint_from_onnx(path: Path) -> dict[str, Any]:
    """A checkpoint payload (``rdn.checkpoint`` format) of ``model_from_onnx(path)``."""
    model, meta = model_from_onnx(path)
    return make_payload(model, step=meta.step, source_onnx=str(path))
