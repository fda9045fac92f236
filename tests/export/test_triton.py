"""config.pbtxt parses with Triton's own ModelConfig schema; the repository layout is Triton's.

tritonclient[grpc] (which ships ``tritonclient.grpc.model_config_pb2``) pins protobuf < 7
while this project runs protobuf 7, so it runs in an interpreter of its own
(tests/tritonclient_env.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from export.triton import MODEL_FILENAME, TritonModelConfig, config_text, write_model_repository
from tests.tritonclient_env import tritonclient_python

PARSE = """
import sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
config = text_format.Parse(sys.stdin.read(), model_config_pb2.ModelConfig())
print(json_format.MessageToJson(
    config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
"""
METADATA = {
    "rdn.scale": "3",
    "rdn.precision": "float16",
    "rdn.step": "1200",
    "rdn.weights_sha256": "0123456789abcdef" * 4,
}


@pytest.fixture(scope="session")
def triton_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python interpreter that imports tritonclient.grpc.model_config_pb2."""
    return tritonclient_python(request.config, tmp_path_factory)


def parse(python: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", PARSE], input=text, capture_output=True, text=True, timeout=120
    )


def parsed(python: str, text: str) -> dict:
    result = parse(python, text)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_config_parses_with_tritons_model_config(triton_python: str) -> None:
    config = TritonModelConfig(name="rdn_x3", max_batch_size=16, max_queue_size=32)
    c = parsed(triton_python, config_text(config, METADATA))
    assert (c["name"], c["backend"], c["max_batch_size"]) == ("rdn_x3", "onnxruntime", 16)
    for tensors, name in ((c["input"], "lr"), (c["output"], "sr")):
        assert [(t["name"], t["data_type"], t["dims"]) for t in tensors] == [
            (name, "TYPE_FP32", ["3", "-1", "-1"])
        ]
    batching = c["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == "2000"
    assert batching["default_queue_policy"]["max_queue_size"] == 32
    assert [(g["kind"], g["count"]) for g in c["instance_group"]] == [("KIND_AUTO", 1)]
    (warmup,) = c["model_warmup"]
    assert warmup["batch_size"] == 1
    assert warmup["inputs"]["lr"]["dims"] == ["3", "64", "64"]
    assert warmup["inputs"]["lr"]["zero_data"] is True
    assert c["parameters"]["cudnn_conv_algo_search"]["string_value"] == "1"


def test_schema_check_rejects_a_bad_config(triton_python: str) -> None:
    good = config_text(TritonModelConfig())
    bad = good.replace("max_batch_size:", "max_batch_sizes:")
    result = parse(triton_python, bad)
    assert result.returncode != 0 and "max_batch_sizes" in result.stderr


def test_written_repository_is_what_triton_loads(cli_x2, triton_python: str) -> None:
    assert cli_x2.result.returncode == 0, cli_x2.result.stderr
    folder = cli_x2.triton_repo / cli_x2.model_name
    c = parsed(triton_python, (folder / "config.pbtxt").read_text())
    assert c["name"] == folder.name  # Triton requires the name to match the folder
    assert c["max_batch_size"] == cli_x2.max_batch
    assert (folder / "1" / MODEL_FILENAME).is_file()


def test_rewrite_replaces_files_without_litter(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"first")
    repo = tmp_path / "repo"
    write_model_repository(repo, model, TritonModelConfig(max_batch_size=2))
    model.write_bytes(b"second")
    folder = write_model_repository(repo, model, TritonModelConfig(max_batch_size=5), METADATA)
    assert folder == repo / "rdn"
    assert (folder / "1" / MODEL_FILENAME).read_bytes() == b"second"
    text = (folder / "config.pbtxt").read_text()
    assert "max_batch_size: 5" in text and "RDN x3, float16 weights, step 1200" in text
    assert sorted(p.name for p in folder.rglob("*")) == ["1", "config.pbtxt", MODEL_FILENAME]


@pytest.mark.parametrize(
    "fields,message",
    (({"name": "a b"}, "model name 'a b' must be"), ({"name": ""}, "model name '' must be"),
     ({"name": "../up"}, "model name '../up' must be"),
     ({"name": ".hidden"}, "model name '.hidden' must be"),
     ({"max_batch_size": 0}, "max_batch_size must be a positive integer, got 0"),
     ({"max_queue_size": -1}, "max_queue_size must be a positive integer, got -1"),
     ({"instance_kind": "KIND_TPU"}, "instance_kind must be one of"),
     ({"max_queue_delay_us": -5}, "max_queue_delay_us must be >= 0, got -5")),
)  # fmt: skip
def test_invalid_config_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TritonModelConfig(**fields)
