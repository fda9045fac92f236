"""Whether onnxruntime's CUDA provider can run here: re-exported from ``rdn.providers``, where it
now lives beside ``rdn.onnx_session``. Kept because tests import this path."""

from rdn.constants import CUDA
from rdn.providers import GPU_HINT, CudaProbe, cuda_probe, usable_providers

__all__ = ["CUDA", "GPU_HINT", "CudaProbe", "cuda_probe", "usable_providers"]
