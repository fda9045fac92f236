"""One way to open an exported model in onnxruntime, with one set of rules, for every user:
rdn-eval, the server's engine and the local API.

The rules, in the order ``open_model`` applies them:

- the file exists, is a regular file and is not empty;
- providers are taken in the order asked for, those this onnxruntime build lacks are skipped,
  and CUDA is dropped where it cannot run (``rdn.providers``: onnxruntime would log an error
  and fall back to the CPU); ``require_gpu`` turns either into an error;
- session options follow the device that runs ("auto" switches resolve per device, the CUDA
  provider is set up for fixed tile shapes); where onnxruntime falls back from CUDA to the CPU
  after all, the session is reopened with the CPU's options;
- the graph takes one [N, 3, H, W] float32 input with dynamic N, H, W (an rdn-export model);
- the scale is measured on a small input, and ``rdn.scale`` metadata, where present, must agree.

Every refusal is one line that starts with ``model file PATH:`` and names the cause and the fix.
Torch-free: the server never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from rdn.constants import CPU, CUDA
from rdn.metadata import KEY_SCALE
from rdn.providers import GPU_HINT, cuda_probe, usable_providers

log = logging.getLogger(__name__)

CUDNN_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
FLOAT32 = "tensor(float)"
PROBE_SIZE = 16  # LR pixels, side of the input that measures a model's scale at load
SWITCHES = ("auto", "on", "off")
# Chosen per provider, each measured (docs/design.md, "Defaults by provider"): on CPU, spinning
# keeps the intra-op threads ready between the model's ~50 ops; on a GPU the host threads only
# feed the device, and spinning would take cores from decoding and encoding.
AUTO_SPINNING = {"cpu": True, "cuda": False}
AUTO_CPU_ARENA = {"cpu": True, "cuda": True}

Provider = str | tuple[str, dict[str, str]]  # a name, or a name with its provider options


class ModelLoadError(RuntimeError):
    """The model file is missing, truncated, not ONNX, or does not take [N, 3, H, W] float32."""


class ProviderError(RuntimeError):
    """No execution provider asked for can run this model here."""


class GpuRequired(ProviderError):
    """A GPU was required and CUDA cannot run, or onnxruntime did not activate it."""


class SessionSettings(Protocol):
    """How a session is created: ``SessionConfig`` here, the server's ``EngineConfig``."""

    @property
    def providers(self) -> tuple[str, ...]: ...
    @property
    def require_gpu(self) -> bool: ...
    @property
    def intra_op_threads(self) -> int: ...
    @property
    def spinning(self) -> str: ...
    @property
    def cpu_arena(self) -> str: ...
    @property
    def cudnn_conv_algo_search(self) -> str: ...
    @property
    def gpu_mem_limit_bytes(self) -> int: ...


@dataclass(frozen=True)
class SessionConfig:
    """``SessionSettings`` with the server's defaults, for callers without an ``EngineConfig``."""

    providers: tuple[str, ...] = (CUDA, CPU)
    require_gpu: bool = False
    intra_op_threads: int = 0  # 0 = onnxruntime default
    spinning: str = "auto"  # intra-op threads spin between ops: on/off; auto: by provider
    cpu_arena: str = "auto"  # onnxruntime's CPU memory arena: on/off; auto: by provider
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # fixed tile shapes make the search a one-time cost
    gpu_mem_limit_bytes: int = 0  # 0 = no limit


@dataclass(frozen=True)
class OnnxModel:
    """An open session of an exported model and the facts ``open_model`` checked about it."""

    path: Path
    session: ort.InferenceSession
    providers: tuple[str, ...]  # what the session runs on, the active one first
    spinning: bool  # the switches the session was created with
    cpu_arena: bool
    input_name: str
    output_name: str
    metadata: dict[str, str]  # the file's custom metadata (``rdn.*`` for an rdn-export model)
    scale: int  # measured, and equal to ``rdn.scale`` where the file declares it

    @property
    def active_provider(self) -> str:
        return self.providers[0]


def cuda_provider_options(config: SessionSettings) -> dict[str, str]:
    """CUDA execution provider options for a few fixed tile shapes.

    EXHAUSTIVE cuDNN search and the maximal workspace are a one-time cost per shape (paid in
    warmup); kSameAsRequested keeps the arena at what the tile batches need instead of
    doubling; copies run on the compute stream so IOBinding transfers need no extra sync.
    """
    if config.cudnn_conv_algo_search not in CUDNN_ALGO_SEARCHES:
        raise ValueError(
            f"cudnn_conv_algo_search must be one of {CUDNN_ALGO_SEARCHES}, "
            f"got {config.cudnn_conv_algo_search!r}"
        )
    options = {
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    if config.gpu_mem_limit_bytes > 0:
        options["gpu_mem_limit"] = str(config.gpu_mem_limit_bytes)
    return options


def select_providers(
    requested: Iterable[str], available: Iterable[str], config: SessionSettings
) -> list[Provider]:
    """The requested providers this onnxruntime build has, in order, CUDA with its options."""
    have = set(available)
    chosen: list[Provider] = []
    for name in requested:
        if name not in have:
            log.info("execution provider %s is not in this onnxruntime build; skipped", name)
            continue
        chosen.append((name, cuda_provider_options(config)) if name == CUDA else name)
    if not chosen:
        raise ProviderError(
            f"none of the requested execution providers {list(requested)} is available "
            f"(this onnxruntime has {sorted(have)}); pass providers from that list"
        )
    return chosen


def resolve_switch(value: str, name: str, auto: Mapping[str, bool], device: str) -> bool:
    """``value`` ("auto", "on" or "off") as a bool; auto takes ``auto[device]``."""
    if value not in SWITCHES:
        raise ValueError(f"{name} must be one of {SWITCHES}, got {value!r}")
    return auto[device] if value == "auto" else value == "on"


def session_options(config: SessionSettings, device: str = "cpu") -> ort.SessionOptions:
    """Session options for ``config``; "auto" switches resolve for ``device`` (cpu or cuda)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if config.intra_op_threads < 0:
        raise ValueError(
            f"intra_op_threads must be >= 0 (0 = default), got {config.intra_op_threads}"
        )
    options.intra_op_num_threads = config.intra_op_threads
    spinning = resolve_switch(config.spinning, "spinning", AUTO_SPINNING, device)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_cpu_mem_arena = resolve_switch(
        config.cpu_arena, "cpu_arena", AUTO_CPU_ARENA, device
    )
    return options


def first_line(error: BaseException) -> str:
    """An error's first line, or its type's name when it has no text (errors are one line)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_file(path: Path) -> None:
    """Refuse a path that is missing, not a regular file, or empty."""
    if not path.exists():
        raise ModelLoadError(f"model file {path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"model file {path}: not a regular file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path}: empty file (interrupted download or export?)")


def _type_text(onnx_type: str) -> str:
    """onnxruntime's "tensor(float)" as numpy says it: "float32"."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def check_io(session: ort.InferenceSession, path: Path) -> tuple[str, str]:
    """Names of the model's input and output, after checking both are [N, 3, H, W] float32."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelLoadError(
            f"model file {path}: has {len(inputs)} inputs and {len(outputs)} outputs; expected "
            "one input [N, 3, H, W] float32 and one output (an rdn-export model)"
        )
    for kind, arg in (("input", inputs[0]), ("output", outputs[0])):
        shape = list(arg.shape)
        fixed = [d for i, d in enumerate(shape) if i != 1 and isinstance(d, int)]
        if arg.type != FLOAT32 or len(shape) != 4 or shape[1] != 3 or fixed:
            raise ModelLoadError(
                f"model file {path}: {kind} {arg.name!r} is {_type_text(arg.type)} "
                f"{_shape_text(shape)}; "
                "expected float32 [N, 3, H, W] with dynamic N, H, W (export with rdn-export)"
            )
    return inputs[0].name, outputs[0].name


def measure_scale(
    session: ort.InferenceSession, input_name: str, metadata: Mapping[str, str], path: Path
) -> int:
    """The upscaling factor the graph computes, measured on a tiny input; the ``rdn.scale``
    metadata, where present, must agree (a mislabelled file would be served under the wrong
    scale and fail every request)."""
    declared = None
    if KEY_SCALE in metadata:
        try:
            declared = int(metadata[KEY_SCALE])
        except ValueError:
            declared = 0
        if declared < 1:
            raise ModelLoadError(
                f"model file {path}: metadata {KEY_SCALE}={metadata[KEY_SCALE]!r} is not a "
                "positive integer; re-export the model with rdn-export"
            )
    probe = np.zeros((1, 3, PROBE_SIZE, PROBE_SIZE), np.float32)
    try:
        out = session.run(None, {input_name: probe})[0]
    except Exception as e:
        raise ModelLoadError(
            f"model file {path}: fails on a {PROBE_SIZE}x{PROBE_SIZE} input "
            f"({type(e).__name__}: {first_line(e)})"
        ) from e
    h, w = out.shape[2:]
    if out.shape[:2] != (1, 3) or h != w or h % PROBE_SIZE:
        raise ModelLoadError(
            f"model file {path}: maps [1, 3, {PROBE_SIZE}, {PROBE_SIZE}] to "
            f"{list(out.shape)}; expected [1, 3, s*{PROBE_SIZE}, s*{PROBE_SIZE}] for an "
            "integer scale s"
        )
    scale = h // PROBE_SIZE
    if declared is not None and declared != scale:
        raise ModelLoadError(
            f"model file {path}: metadata {KEY_SCALE}={declared} but the network upscales "
            f"x{scale} (a {PROBE_SIZE}x{PROBE_SIZE} input gives {w}x{h}); the file is "
            "mislabelled: re-export it with rdn-export"
        )
    return scale


def _device_of(provider: str) -> str:
    return "cuda" if provider == CUDA else "cpu"


def _name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _open_session(
    path: Path, options: ort.SessionOptions, providers: list[Provider]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises Fail / InvalidProtobuf / InvalidGraph ...
        raise ModelLoadError(
            f"model file {path}: onnxruntime cannot load it, not an ONNX model or truncated? "
            f"(not a loadable ONNX model: {type(e).__name__}: {first_line(e)})"
        ) from e


def open_model(model_path: Path, config: SessionSettings) -> OnnxModel:
    """Open ``model_path`` under the module's rules; raise ``ModelLoadError`` for a bad file,
    ``ProviderError`` (``GpuRequired``) when no provider asked for can run it."""
    path = Path(model_path)
    check_file(path)
    requested = usable_providers(config.providers)
    if CUDA in config.providers and CUDA not in requested:
        why = f"{CUDA} cannot run: {cuda_probe().reason}; {GPU_HINT}"
        if config.require_gpu:
            raise GpuRequired(why)
        if not requested:
            raise ProviderError(f"{why}, or add {CPU} to the providers")
    providers = select_providers(requested, ort.get_available_providers(), config)
    device = _device_of(_name(providers[0]))
    options = session_options(config, device)
    session = _open_session(path, options, providers)
    active = session.get_providers()[0]
    if _device_of(active) != device and "auto" in (config.spinning, config.cpu_arena):
        # onnxruntime-gpu lists CUDA without a usable GPU and falls back to the CPU: the
        # "auto" switches must be those of the device that actually runs.
        options = session_options(config, _device_of(active))
        session = _open_session(path, options, [p for p in providers if _name(p) == active])
    running = tuple(session.get_providers())
    fell_back = CUDA in config.providers and running[0] != CUDA
    log.info(
        "model %s runs on %s (session providers: %s)%s",
        path,
        running[0],
        ", ".join(running),
        f"; {CUDA} was requested but is not active: {GPU_HINT}" if fell_back else "",
    )
    if config.require_gpu and running[0] != CUDA:
        raise GpuRequired(f"{CUDA} is not active (session providers: {list(running)}); {GPU_HINT}")
    input_name, output_name = check_io(session, path)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return OnnxModel(
        path=path,
        session=session,
        providers=running,
        spinning=options.get_session_config_entry("session.intra_op.allow_spinning") == "1",
        cpu_arena=options.enable_cpu_mem_arena,
        input_name=input_name,
        output_name=output_name,
        metadata=metadata,
        scale=measure_scale(session, input_name, metadata, path),
    )
