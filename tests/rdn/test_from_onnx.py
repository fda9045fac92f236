"""rdn.from_onnx: a shipped ONNX model rebuilt as a trainable RDN computes the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rdn.from_onnx import OnnxImportError, checkpoint_from_onnx, model_from_onnx
from rdn.model import batchnorm_frozen
from rdn.subpixel import hr_conv_weights, subpixel_conv_weights

MODELS = Path(__file__).resolve().parents[2] / "server" / "models"


@pytest.mark.parametrize("r", [2, 3])
def test_hr_conv_weights_inverts_subpixel_conv_weights(r: int) -> None:
    gen = torch.Generator().manual_seed(r)
    weight, bias = torch.randn(3, 8, 3, 3, generator=gen), torch.randn(3, generator=gen)
    lr_weight, lr_bias = subpixel_conv_weights(weight, bias, r)
    back_weight, back_bias = hr_conv_weights(lr_weight, lr_bias, r)
    assert torch.equal(back_weight, weight) and torch.equal(back_bias, bias)


@pytest.mark.parametrize("name", ["default_x2", "default_x4"])
def test_rebuilt_model_matches_onnxruntime_in_train_mode(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    model, meta = model_from_onnx(path)
    assert batchnorm_frozen(model)  # frozen: train() computes the same function as eval()
    x = np.random.default_rng(0).random((1, 3, 24, 20), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {meta.input_name: x})[0]
    model.train()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (1, 3, 24 * meta.scale, 20 * meta.scale)
    assert float(np.abs(got - want).max()) < 1e-5


def test_checkpoint_payload_carries_the_config_and_step() -> None:
    payload = checkpoint_from_onnx(MODELS / "default_x2.onnx")
    assert payload["config"]["scale"] == 2 and payload["step"] > 0
    assert payload["bn_frozen"] is True and "sfe1.weight" in payload["model"]


def test_a_file_that_is_not_an_rdn_export_is_one_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(OnnxImportError, match=r"junk\.onnx"):
        model_from_onnx(junk)
