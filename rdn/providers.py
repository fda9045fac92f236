"""Whether onnxruntime's CUDA provider can run in this process, found without asking onnxruntime.

onnxruntime-gpu lists CUDAExecutionProvider whether or not CUDA can load. Asked for it where the
CUDA libraries are missing, every session logs a red error and a yellow warning, then runs on the
CPU; where the libraries load but no device exists, session creation fails and onnxruntime
prints an "EP Error" banner on stdout before retrying on the CPU. So the probe does what
onnxruntime does first, once per process: it loads ``libonnxruntime_providers_shared`` (global
symbols) and ``libonnxruntime_providers_cuda`` from onnxruntime's own ``capi`` folder, whose load
pulls in cuBLAS and the CUDA runtime; then it asks that runtime for a device.

Torch-free, at the lowest layer: ``rdn.onnx_session`` (rdn-eval, the server's engine, the local
API) chooses providers with it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from rdn.constants import CUDA

log = logging.getLogger(__name__)

GPU_HINT = "install onnxruntime-gpu[cuda,cudnn] / CUDA 13 + cuDNN 9"
_WINDOWS = sys.platform == "win32"


@dataclass(frozen=True)
class CudaProbe:
    """Whether ``CUDAExecutionProvider`` can run here, and why (or why not), in one phrase."""

    usable: bool
    reason: str


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _library(stem: str) -> Path:
    capi = Path(ort.__file__).parent / "capi"
    return capi / (f"{stem}.dll" if _WINDOWS else f"lib{stem}.so")


def _cuda_runtime_name() -> str:
    """The CUDA runtime this onnxruntime build links (loaded already by the provider library)."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        cuda_version = "13.0"
    major = str(cuda_version).split(".")[0]
    return f"cudart64_{major}.dll" if _WINDOWS else f"libcudart.so.{major}"


def _device_count() -> tuple[int, str]:
    """(CUDA devices, "") or (0, what the CUDA runtime said)."""
    try:
        runtime = ctypes.CDLL(_cuda_runtime_name())
    except OSError as e:
        return 0, f"the CUDA runtime does not load ({_first_line(e)})"
    count = ctypes.c_int(0)
    status = runtime.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0:
        return 0, f"no usable CUDA device (cudaGetDeviceCount returned error {status})"
    return count.value, ""


@functools.cache
def cuda_probe() -> CudaProbe:
    """Whether onnxruntime's CUDA provider loads and finds a device; probed once per process."""
    if CUDA not in ort.get_available_providers():
        return CudaProbe(False, f"this onnxruntime build has no {CUDA}")
    mode = 0 if _WINDOWS else os.RTLD_NOW | os.RTLD_GLOBAL
    try:
        ctypes.CDLL(str(_library("onnxruntime_providers_shared")), mode=mode)
        ctypes.CDLL(str(_library("onnxruntime_providers_cuda")))
    except OSError as e:
        return CudaProbe(False, f"its libraries do not load: {_first_line(e)}")
    count, why = _device_count()
    if count < 1:
        return CudaProbe(False, why or "the CUDA runtime sees no device")
    return CudaProbe(True, f"its libraries load and the CUDA runtime sees {count} device(s)")


def usable_providers(requested: Sequence[str]) -> tuple[str, ...]:
    """``requested`` without CUDA where it cannot run, so onnxruntime is never asked for it there
    (and logs nothing); says once per process which provider runs and why."""
    requested = tuple(requested)
    if CUDA not in requested:
        return requested
    probe = cuda_probe()
    kept = requested if probe.usable else tuple(p for p in requested if p != CUDA)
    _announce(probe, kept[0] if kept else "no provider")
    return kept


@functools.cache
def _announce(probe: CudaProbe, chosen: str) -> None:
    if probe.usable:
        log.info("onnxruntime runs on %s: %s", chosen, probe.reason)
    else:
        log.info("onnxruntime runs on %s: %s cannot: %s (%s)", chosen, CUDA, probe.reason, GPU_HINT)
