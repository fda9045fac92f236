"""One onnxruntime session running an exported RDN on batches of fixed-shape tiles.

The session is opened by ``rdn.onnx_session.open_model``, under the rules rdn-eval and the local
API share (file checks, provider choice, session options, the [N, 3, H, W] float32 contract,
the measured scale). The engine adds what serving needs: checked batches and, on a GPU,
IOBinding: one host-to-device copy of the batch in, the output allocated on the device, one
copy back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rdn.constants import CUDA
from rdn.onnx_session import (
    GpuRequired,
    open_model,
)
from server.config import EngineConfig

log = logging.getLogger(__name__)


class Engine:
    """An onnxruntime session of an RDN model: float32 [N,3,h,w] in, [N,3,s*h,s*w] out."""

    def __init__(self, model_path: Path, config: EngineConfig | None = None) -> None:
        config = config if config is not None else EngineConfig()
        self.config = config
        self.model_path = Path(model_path)
        try:
            opened = open_model(self.model_path, config)
        except GpuRequired as e:
            raise GpuRequired(f"--require-gpu: {e}") from e
        self._session = opened.session
        self.spinning = opened.spinning
        self.cpu_arena: bool = opened.cpu_arena
        self.providers: tuple[str, ...] = opened.providers
        self.active_provider: str = opened.active_provider
        self.input_name, self.output_name = opened.input_name, opened.output_name
        self.metadata: dict[str, str] = opened.metadata
        self.scale: int = opened.scale
        self._io_binding = config.io_binding and self.active_provider == CUDA

    @property
    def uses_io_binding(self) -> bool:
        """Whether runs go through IOBinding (asked for, and CUDA is active)."""
        return self._io_binding

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
