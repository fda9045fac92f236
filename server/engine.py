"""One onnxruntime session running an exported RDN on batches of fixed-shape tiles.

The engine is the only place that touches onnxruntime. It picks the execution provider,
checks that the provider it asked for is the one actually running (onnxruntime falls back to
CPU silently when the CUDA libraries are missing), validates the model's input contract
([N, 3, H, W] float32) at load time, and on a GPU moves tiles with IOBinding: one host-to-device
copy of the batch in, the output allocated on the device, one copy back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.metadata import KEY_SCALE
from server.config import EngineConfig
from server.providers import CUDA, GPU_HINT, cuda_probe, usable_providers

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDNN_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
FLOAT32 = "tensor(float)"
PROBE_SIZE = 16  # LR pixels, side of the input that measures a model's scale at load


class ModelLoadError(RuntimeError):
    """The model file is missing, truncated, not ONNX, or does not take [N, 3, H, W] float32."""


def cuda_provider_options(config: EngineConfig) -> dict[str, str]:
    """CUDA execution provider options for a server that runs a few fixed tile shapes.

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
    requested: Iterable[str], available: Iterable[str], config: EngineConfig
) -> list[str | tuple[str, dict[str, str]]]:
    """The requested providers this onnxruntime build has, in order, CUDA with its options."""
    have = set(available)
    chosen: list[str | tuple[str, dict[str, str]]] = []
    for name in requested:
        if name not in have:
            log.info("execution provider %s is not in this onnxruntime build; skipped", name)
            continue
        chosen.append((name, cuda_provider_options(config)) if name == CUDA else name)
    if not chosen:
        raise RuntimeError(
            f"none of the requested execution providers {list(requested)} is available "
            f"(this onnxruntime has {sorted(have)}); pass providers from that list"
        )
    return chosen


SWITCHES = ("auto", "on", "off")
# Chosen per provider, each measured (docs/design.md, "Defaults by provider"): on CPU, spinning
# keeps the intra-op threads ready between the model's ~50 ops; on a GPU the host threads only
# feed the device, and spinning would take cores from decoding and encoding.
AUTO_SPINNING = {"cpu": True, "cuda": False}
AUTO_CPU_ARENA = {"cpu": True, "cuda": True}


def resolve_switch(value: str, name: str, auto: Mapping[str, bool], device: str) -> bool:
    """``value`` ("auto", "on" or "off") as a bool; auto takes ``auto[device]``."""
    if value not in SWITCHES:
        raise ValueError(f"{name} must be one of {SWITCHES}, got {value!r}")
    return auto[device] if value == "auto" else value == "on"


def session_options(config: EngineConfig, device: str = "cpu") -> ort.SessionOptions:
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_file(path: Path) -> None:
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


def _check_io(session: ort.InferenceSession, path: Path) -> tuple[str, str]:
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


def _device_of(provider: str) -> str:
    return "cuda" if provider == CUDA else "cpu"


def _open_session(
    path: Path, options: ort.SessionOptions, providers: list[str | tuple[str, dict[str, str]]]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises Fail / InvalidProtobuf / InvalidGraph ...
        raise ModelLoadError(
            f"model file {path}: onnxruntime cannot load it, not an ONNX model or truncated? "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e


class Engine:
    """An onnxruntime session of an RDN model: float32 [N,3,h,w] in, [N,3,s*h,s*w] out."""

    def __init__(self, model_path: Path, config: EngineConfig | None = None) -> None:
        config = config if config is not None else EngineConfig()
        self.config = config
        self.model_path = path = Path(model_path)
        _check_file(path)
        requested = usable_providers(config.providers)
        if CUDA in config.providers and CUDA not in requested:
            why = f"{CUDA} cannot run: {cuda_probe().reason}; {GPU_HINT}"
            if config.require_gpu:
                raise RuntimeError(f"--require-gpu: {why}")
            if not requested:
                raise RuntimeError(f"{why}, or add {CPU} to the providers")
        providers = select_providers(requested, ort.get_available_providers(), config)
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        device = _device_of(first)
        options = session_options(config, device)
        self._session = _open_session(path, options, providers)
        active = self._session.get_providers()[0]
        if _device_of(active) != device and "auto" in (config.spinning, config.cpu_arena):
            # onnxruntime-gpu lists CUDA without a usable GPU and falls back to the CPU: the
            # "auto" switches must be those of the device that actually runs.
            device = _device_of(active)
            options = session_options(config, device)
            kept = [p for p in providers if (p if isinstance(p, str) else p[0]) == active]
            self._session = _open_session(path, options, kept)
        self.spinning = options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        self.cpu_arena: bool = options.enable_cpu_mem_arena
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.active_provider: str = self.providers[0]
        fell_back = CUDA in config.providers and self.active_provider != CUDA
        log.info(
            "model %s runs on %s (session providers: %s)%s",
            path,
            self.active_provider,
            ", ".join(self.providers),
            f"; {CUDA} was requested but is not active: {GPU_HINT}" if fell_back else "",
        )
        if config.require_gpu and self.active_provider != CUDA:
            raise RuntimeError(
                f"--require-gpu: {CUDA} is not active (session providers: {list(self.providers)}); "
                f"{GPU_HINT}"
            )
        self.input_name, self.output_name = _check_io(self._session, path)
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._io_binding = config.io_binding and self.active_provider == CUDA
        self.scale: int = self._scale_from(self.metadata, path)

    @property
    def uses_io_binding(self) -> bool:
        """Whether runs go through IOBinding (asked for, and CUDA is active)."""
        return self._io_binding

    def _scale_from(self, metadata: Mapping[str, str], path: Path) -> int:
        """The upscaling factor the graph computes, measured on a tiny input; the ``rdn.scale``
        metadata, where present, must agree (a mislabelled file would be served under the
        wrong scale and fail every request)."""
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
            out = self.run(probe)
        except Exception as e:
            raise ModelLoadError(
                f"model file {path}: fails on a {PROBE_SIZE}x{PROBE_SIZE} input "
                f"({type(e).__name__}: {_first_line(e)})"
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

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Upscale a batch: [N, 3, h, w] float32 -> [N, 3, s*h, s*w] float32.

        Safe to call from one worker thread while the event loop does other work (onnxruntime
        releases the GIL while it computes).
        """
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = getattr(batch, "shape", type(batch).__name__)
            raise ValueError(f"engine input must be a [N, 3, h, w] array, got {shape}")
        if batch.dtype != np.float32:
            raise ValueError(f"engine input must be float32, got {batch.dtype}")
        batch = np.ascontiguousarray(batch)
        if self._io_binding:
            return self._run_bound(batch)
        return self._session.run([self.output_name], {self.input_name: batch})[0]

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        """CUDA path: one copy of the batch to the device, output allocated there, one copy back."""
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(
            self.input_name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        )
        binding.bind_output(self.output_name, "cuda", 0)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warmup(self, tile: int | tuple[int, int], batch_sizes: Iterable[int]) -> None:
        """Run every batch size once on tiles of one shape (``tile``: a side or (h, w)).

        On CUDA this is where cuDNN searches its convolution algorithms (once per shape) and the
        memory arena grows, so the first requests do not pay for either.
        """
        height, width = (tile, tile) if isinstance(tile, int) else tile
        for n in sorted(set(batch_sizes)):
            if n < 1 or height < 1 or width < 1:
                raise ValueError(f"warmup needs positive sizes, got batch {n}, tile {tile}")
            start = time.perf_counter()
            self.run(np.zeros((n, 3, height, width), np.float32))
            log.debug(
                "warmup batch %d x %dx%d: %.1f ms",
                n,
                height,
                width,
                1e3 * (time.perf_counter() - start),
            )
