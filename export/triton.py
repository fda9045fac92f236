"""A Triton Inference Server model repository for an exported model.

Layout (what ``tritonserver --model-repository=REPO`` loads)::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx

The config is text generated from a frozen dataclass by a pure function; only
``write_model_repository`` touches the file system.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rdn.checkpoint import atomic_write
from rdn.constants import INPUT_NAME, OUTPUT_NAME

MODEL_FILENAME = "model.onnx"  # the onnxruntime backend's default_model_filename
VERSION = 1
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"


def serve_command(repo: Path) -> str:
    """The docker command that serves the model repository ``repo`` with Triton."""
    mount = shlex.quote(f"{Path(repo).resolve()}:/models")
    return (
        f"docker run --rm --gpus=all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v {mount} "
        f"{TRITON_IMAGE} tritonserver --model-repository=/models"
    )


@dataclass(frozen=True)
class TritonModelConfig:
    """What config.pbtxt says: batching, queueing, instances, warm-up."""

    name: str = "rdn"
    max_batch_size: int = 8  # tiles per execution; Triton batches only equal tile shapes
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    max_queue_size: int = 64  # requests queued beyond this are rejected (UNAVAILABLE)
    instance_count: int = 1  # model instances per device
    instance_kind: str = "KIND_AUTO"  # GPU when one is visible, else CPU
    warmup_tile: int = 64  # warm-up request: one zero tile of 3 x 64 x 64 LR pixels
    cudnn_conv_algo_search: int = 1  # onnxruntime CUDA: 0 exhaustive, 1 heuristic, 2 default
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"model name {self.name!r} must be letters, digits, '_', '.', '-' (it is a "
                "folder name); choose another --model-name"
            )
        for field_name in ("max_batch_size", "max_queue_size", "instance_count", "warmup_tile"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}")
        if self.cudnn_conv_algo_search not in (0, 1, 2):
            raise ValueError("cudnn_conv_algo_search must be 0, 1 or 2")


def config_text(config: TritonModelConfig, metadata: Mapping[str, str] | None = None) -> str:
    """config.pbtxt for ``config``; ``metadata`` (the model's rdn.* props) goes in a comment.

    Inputs and outputs are float32 [3, -1, -1] per batch item (any tile size) for float32 and
    float16 exports alike: the float16 export keeps float32 inputs and outputs.
    """
    header = "# Written by rdn-export."
    if metadata:
        header += (
            f" RDN x{metadata.get('rdn.scale', '?')}, {metadata.get('rdn.precision', '?')} "
            f"weights, step {metadata.get('rdn.step', '?')}, weights sha256 "
            f"{metadata.get('rdn.weights_sha256', '?')[:16]}."
        )
    t = config.warmup_tile
    return f"""{header}
# Input: float32 RGB in [0, 1], NCHW; output: the same, scale times larger.
name: "{config.name}"
backend: "onnxruntime"
max_batch_size: {config.max_batch_size}
input [
  {{
    name: "{config.input_name}"
    data_type: TYPE_FP32
    dims: [ 3, -1, -1 ]
  }}
]
output [
  {{
    name: "{config.output_name}"
    data_type: TYPE_FP32
    dims: [ 3, -1, -1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {config.max_queue_delay_us}
  default_queue_policy {{
    max_queue_size: {config.max_queue_size}
  }}
}}
instance_group [
  {{
    count: {config.instance_count}
    kind: {config.instance_kind}
  }}
]
model_warmup [
  {{
    name: "zero_tile_{t}x{t}"
    batch_size: 1
    inputs {{
      key: "{config.input_name}"
      value {{
        data_type: TYPE_FP32
        dims: [ 3, {t}, {t} ]
        zero_data: true
      }}
    }}
  }}
]
# cuDNN re-benchmarks every new input shape under exhaustive search; heuristic does not.
parameters {{
  key: "cudnn_conv_algo_search"
  value {{ string_value: "{config.cudnn_conv_algo_search}" }}
}}
"""


def model_folder(repo: Path, config: TritonModelConfig) -> Path:
    return Path(repo) / config.name


def write_model_repository(
    repo: Path,
    model_file: Path,
    config: TritonModelConfig,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx``; return ``REPO/NAME``.

    Each file is written atomically, the model first, so a loaded config never points at a
    missing or partial model.
    """
    folder = model_folder(repo, config)

    def copy_model(f: BinaryIO) -> None:
        with open(model_file, "rb") as src:
            shutil.copyfileobj(src, f)

    atomic_write(folder / str(VERSION) / MODEL_FILENAME, copy_model)
    text = config_text(config, metadata)
    atomic_write(folder / "config.pbtxt", lambda f: f.write(text.encode()))
    return folder
