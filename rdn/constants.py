"""Constants every layer shares, each defined here once: the upscaling factors, the exported
graph's tensor names and onnxruntime's provider names.

Imports nothing, so the server (which never imports torch) and the torch side read the same
values: ``rdn.model``, ``rdn.metadata``, ``export`` and ``server`` all take them from here.
"""

from __future__ import annotations

SCALES = (2, 3, 4)  # upscaling factors RDN is built for
DEFAULT_SCALE = 2  # the factor a model, a training run or a server takes when none is named
INPUT_NAME = "lr"  # the exported graph's input: [N, 3, H, W] float32 LR in [0, 1]
OUTPUT_NAME = "sr"  # the exported graph's output: [N, 3, s*H, s*W] float32 SR
CUDA = "CUDAExecutionProvider"  # onnxruntime's name of the CUDA execution provider
CPU = "CPUExecutionProvider"  # onnxruntime's name of its CPU execution provider
