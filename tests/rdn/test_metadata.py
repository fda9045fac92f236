"""The rdn.* metadata contract, read the way the server reads it (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdn.metadata import (
    KEY_CONFIG,
    KEY_METADATA_VERSION,
    KEY_SCALE,
    MAX_TRAINING_ENTRY_BYTES,
    REQUIRED_KEYS,
    MetadataError,
    ModelMetadata,
    read_metadata,
    read_model_metadata,
    training_metadata,
)

META = ModelMetadata(
    scale=4,
    config={"scale": 4, "G0": 16, "D": 3, "C": 3, "G": 16, "norm": "batch"},
    step=1234,
    weights_sha256="ab" * 32,
    precision="float16",
    training={"best_psnr": 30.5, "train_config": {"preset": "tiny"}},
)


def test_props_round_trip() -> None:
    props = META.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert set(REQUIRED_KEYS) <= set(props)
    assert all(key.startswith("rdn.") for key in props)
    assert ModelMetadata.from_props(props) == META


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({KEY_SCALE: None}, "lacks metadata rdn.scale"),
        ({KEY_METADATA_VERSION: "2"}, "metadata version 2 not supported"),
        ({KEY_SCALE: "3"}, "does not match rdn.scale=3"),
        ({KEY_CONFIG: "{not json"}, "malformed"),
        ({"rdn.value_range": "0"}, "malformed"),
        ({"rdn.precision": "int4"}, "not one of"),
    ],
)
def test_from_props_refuses_what_it_cannot_trust(change: dict, message: str) -> None:
    props = {**META.to_props(), **change}
    props = {k: v for k, v in props.items() if v is not None}
    with pytest.raises(MetadataError, match=message):
        ModelMetadata.from_props(props)


def test_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="no such file"):
        read_metadata(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00garbage" * 50)
    with pytest.raises(MetadataError, match="not an ONNX model"):
        read_metadata(junk)


def test_foreign_onnx_model_is_named_as_such(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert read_metadata(path) == {}
    with pytest.raises(MetadataError, match="not exported by rdn-export"):
        read_model_metadata(path)


def test_training_metadata_keeps_small_json_only() -> None:
    checkpoint = {
        "format": "rdn-sr-checkpoint",
        "version": 1,
        "config": {},
        "model": {"w": torch.zeros(3)},
        "step": 5,
        "optimizer": {"state": {}},
        "bn_frozen": True,
        "best_psnr": torch.tensor(float("-inf")),
        "last_psnr": np.float32(28.5),
        "train_config": {"out": Path("runs/a"), "lr": 2e-4, "scales": (2, 3)},
        "rng": {"numpy": np.zeros(624, dtype=np.uint32)},
        "history": list(range(MAX_TRAINING_ENTRY_BYTES)),
        7: "non-string key",
    }
    assert training_metadata(checkpoint) == {
        "bn_frozen": True,
        "best_psnr": None,  # -inf: strict JSON has no infinity
        "last_psnr": 28.5,
        "train_config": {"out": "runs/a", "lr": 2e-4, "scales": [2, 3]},
    }


def test_metadata_module_does_not_import_torch() -> None:
    code = "import sys, rdn.metadata; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
