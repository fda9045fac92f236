"""What an exported model says about itself: the ``rdn.*`` ONNX ``metadata_props``.

Torch-free on purpose: the server imports this module to describe a model file without
guessing (``ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)`` works on an
onnxruntime session; ``read_model_metadata(path)`` works on a file). Every value is a string;
structured values (model config, training metadata) are compact JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from rdn.constants import INPUT_NAME, OUTPUT_NAME

PREFIX = "rdn."
METADATA_VERSION = 1  # bump when a key changes meaning; readers reject unknown versions

KEY_METADATA_VERSION = "rdn.metadata_version"
KEY_SCALE = "rdn.scale"
KEY_CONFIG = "rdn.config"
KEY_VALUE_RANGE = "rdn.value_range"
KEY_CHANNEL_ORDER = "rdn.channel_order"
KEY_LAYOUT = "rdn.layout"
KEY_STEP = "rdn.step"
KEY_WEIGHTS_SHA256 = "rdn.weights_sha256"
KEY_PRECISION = "rdn.precision"
KEY_INPUT = "rdn.input"
KEY_OUTPUT = "rdn.output"
KEY_TRAINING = "rdn.training"
KEY_NAME = "rdn.name"  # optional: the name a server serves the model under
# int8 models: Y-PSNR (dB) the int8 file lost against its float model at export, and on what
KEY_INT8_LOSS = "rdn.int8_loss_db"
KEY_INT8_VERIFIED_ON = "rdn.int8_verified_on"

REQUIRED_KEYS = (
    KEY_METADATA_VERSION,
    KEY_SCALE,
    KEY_CONFIG,
    KEY_VALUE_RANGE,
    KEY_CHANNEL_ORDER,
    KEY_LAYOUT,
    KEY_STEP,
    KEY_WEIGHTS_SHA256,
    KEY_PRECISION,
    KEY_INPUT,
    KEY_OUTPUT,
)
PRECISIONS = ("float32", "float16", "int8")
INT8_SUFFIX = "_int8"  # an int8 twin is named after its float model: rdn_x2 -> rdn_x2_int8
INT8_MAX_LOSS_DB = 0.10  # Y-PSNR an int8 twin may lose against its float model to replace it

# Checkpoint entries that are the model itself or bulky training state, never metadata.
_NOT_TRAINING_METADATA = frozenset({"format", "version", "config", "model", "step", "optimizer"})
MAX_TRAINING_ENTRY_BYTES = 4096  # one entry's JSON; larger ones (RNG state, histories) are dropped


class MetadataError(ValueError):
    """A model file is unreadable or lacks the ``rdn.*`` metadata this project writes."""


@dataclass(frozen=True)
class ModelMetadata:
    """The contract between export and serving: how to feed the model and what it is."""

    scale: int
    config: Mapping[str, Any]  # RDNConfig as a dict: RDNConfig(**config) rebuilds it
    step: int
    weights_sha256: str  # sha256 of the checkpoint's state_dict, see export.to_onnx.weights_sha256
    precision: str = "float32"  # of the weights; inputs and outputs are float32 either way
    value_range: tuple[float, float] = (0.0, 1.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    training: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""  # "" = unnamed: a server names it after its file
    int8_loss_db: float | None = None  # int8 only: measured at export (export.int8.int8_loss)
    int8_verified_on: str = ""  # int8 only: the photos that loss was measured on

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries, all strings."""
        props = {
            KEY_METADATA_VERSION: str(METADATA_VERSION),
            KEY_SCALE: str(self.scale),
            KEY_CONFIG: _dumps(dict(self.config)),
            KEY_VALUE_RANGE: f"{self.value_range[0]:g},{self.value_range[1]:g}",
            KEY_CHANNEL_ORDER: self.channel_order,
            KEY_LAYOUT: self.layout,
            KEY_STEP: str(self.step),
            KEY_WEIGHTS_SHA256: self.weights_sha256,
            KEY_PRECISION: self.precision,
            KEY_INPUT: self.input_name,
            KEY_OUTPUT: self.output_name,
        }
        if self.training:
            props[KEY_TRAINING] = _dumps(dict(self.training))
        if self.name:
            props[KEY_NAME] = self.name
        if self.int8_loss_db is not None:
            props[KEY_INT8_LOSS] = f"{self.int8_loss_db:.4f}"
            props[KEY_INT8_VERIFIED_ON] = self.int8_verified_on
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> ModelMetadata:
        """Parse ``metadata_props`` (or onnxruntime's ``custom_metadata_map``); strict."""
        missing = [k for k in REQUIRED_KEYS if k not in props]
        if missing:
            raise MetadataError(
                f"{source}: lacks metadata {', '.join(missing)}; not exported by rdn-export? "
                "re-export it with rdn-export"
            )
        try:
            version = int(props[KEY_METADATA_VERSION])
        except ValueError as e:
            raise MetadataError(f"{source}: malformed {KEY_METADATA_VERSION}: {e}") from e
        if version != METADATA_VERSION:
            raise MetadataError(
                f"{source}: metadata version {version} not supported (expected "
                f"{METADATA_VERSION}); re-export with this version of rdn-export"
            )
        try:
            low, high = (float(v) for v in props[KEY_VALUE_RANGE].split(","))
            config = json.loads(props[KEY_CONFIG])
            meta = cls(
                scale=int(props[KEY_SCALE]),
                config=config,
                step=int(props[KEY_STEP]),
                weights_sha256=props[KEY_WEIGHTS_SHA256],
                precision=props[KEY_PRECISION],
                value_range=(low, high),
                channel_order=props[KEY_CHANNEL_ORDER],
                layout=props[KEY_LAYOUT],
                input_name=props[KEY_INPUT],
                output_name=props[KEY_OUTPUT],
                training=json.loads(props.get(KEY_TRAINING, "{}")),
                name=props.get(KEY_NAME, ""),
                int8_loss_db=float(props[KEY_INT8_LOSS]) if KEY_INT8_LOSS in props else None,
                int8_verified_on=props.get(KEY_INT8_VERIFIED_ON, ""),
            )
        except ValueError as e:  # bad int/float, bad JSON, wrong number of range values
            raise MetadataError(f"{source}: malformed rdn.* metadata ({e}); re-export it") from e
        if not isinstance(config, dict) or config.get("scale") != meta.scale:
            raise MetadataError(
                f"{source}: {KEY_CONFIG} does not match {KEY_SCALE}={meta.scale}; re-export it"
            )
        if meta.name and not valid_model_name(meta.name):
            raise MetadataError(f"{source}: {KEY_NAME}={meta.name!r} is not a valid model name")
        if meta.precision not in PRECISIONS:
            raise MetadataError(
                f"{source}: {KEY_PRECISION}={meta.precision!r} is not one of {PRECISIONS}"
            )
        return meta


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_model_name(name: str) -> bool:
    """Letters, digits, ``_ . -``, at most 64 characters, not starting with a sign: a name
    that is safe in a URL path, a Triton repository and a log line."""
    return NAME_PATTERN.fullmatch(name) is not None


def default_model_name(scale: int, degradation: str = "bicubic") -> str:
    """``rdn_x{scale}`` for a model trained on clean (bicubic) inputs, else with the
    degradation's name appended: ``rdn_x2_photo``, ``rdn_x4_jpeg50``."""
    if degradation in ("", "bicubic"):
        return f"rdn_x{scale}"
    suffix = re.sub(r"[^A-Za-z0-9]+", "", degradation.split("-")[0])
    return f"rdn_x{scale}_{suffix}" if suffix else f"rdn_x{scale}"


def read_metadata(path: Path) -> dict[str, str]:
    """All ``metadata_props`` of the ONNX file at ``path`` (any prefix), as a dict."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"model file {path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise MetadataError(f"model file {path}: not an ONNX model (truncated?): {e}") from e
    return {p.key: p.value for p in model.metadata_props}


def read_model_metadata(path: Path) -> ModelMetadata:
    """The parsed ``rdn.*`` metadata of the ONNX file at ``path``."""
    return ModelMetadata.from_props(read_metadata(path), source=f"model file {path}")


def training_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The small JSON-able entries of a checkpoint besides weights (train config, best PSNR...).

    Entries that are not JSON-able (optimizer tensors, numpy RNG state) or whose JSON exceeds
    ``MAX_TRAINING_ENTRY_BYTES`` are left out: metadata should describe, not carry state.
    """
    kept: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str) or key in _NOT_TRAINING_METADATA:
            continue
        try:
            plain = _jsonable(value)
        except TypeError:
            continue
        if len(_dumps(plain).encode()) <= MAX_TRAINING_ENTRY_BYTES:
            kept[key] = plain
    return kept


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; scalar tensors and numpy scalars become numbers.

    Non-finite floats become None so the result is strict JSON (best_psnr may start at -inf).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("mapping with non-string keys")
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # torch/numpy scalar
        return _jsonable(value.item())
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
