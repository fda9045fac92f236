"""What an export must pass before anything is written: the output path is writable, the
folded model computes what the checkpoint's does, and onnxruntime computes what torch does.

The checks run on seeded noise of several odd shapes and on a real photograph; a float16 model's
numbers are compared only on a session really running on CUDA. ``ExportError`` is every export
failure, one line with the cause and the fix; ``export.to_onnx`` builds the graph and calls these.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from rdn.constants import CPU, CUDA, INPUT_NAME, OUTPUT_NAME
from rdn.metadata import ModelMetadata
from rdn.model import RDN

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # max |onnxruntime - torch| on outputs in [0, 1]
FP16_TOLERANCE = 1e-2  # float16 weights carry ~3 significant digits
# Verification shapes: odd sizes, batch 1 and 3, non-square (none equal to the traced example's).
VERIFY_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1, 3, 17, 23),
    (3, 3, 24, 18),
    (1, 3, 45, 31),
)
VERIFY_IMAGE_HW = (80, 96)  # real-image check: centre crop of at most this many LR pixels
VERIFY_SEED = 0
WARMUP_SHAPE = (1, 3, 16, 16)  # one run of a float16 model on whatever provider is active
_ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's default (warning); restored after the CUDA probe


class ExportError(RuntimeError):
    """Any export failure; the message is one readable line with the cause and the fix."""


def reference_image(path: Path | None = None) -> tuple[str, np.ndarray]:
    """(label, [1, 3, H, W] float32 RGB in [0, 1]) for the real-image check.

    Default: scikit-image's bundled astronaut photograph, downscaled 4x by striding and
    centre-cropped to at most ``VERIFY_IMAGE_HW`` (the library must not depend on tests/).
    """
    if path is None:
        from skimage import data  # lazy: skimage.data is only needed here

        label, rgb = "astronaut", data.astronaut()[::4, ::4]
    else:
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ExportError(f"verification image {path}: cannot be read ({e})") from e
        label = Path(path).name
    height, width = (min(n, limit) for n, limit in zip(rgb.shape[:2], VERIFY_IMAGE_HW, strict=True))
    top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    crop = rgb[top : top + height, left : left + width]
    array = np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    return f"{label} {'x'.join(map(str, array.shape))}", array


def verification_inputs(image: Path | None = None) -> list[tuple[str, np.ndarray]]:
    """Labelled float32 inputs: seeded uniform noise of ``VERIFY_SHAPES`` plus a photograph."""
    rng = np.random.default_rng(VERIFY_SEED)
    inputs = [
        ("x".join(map(str, shape)), rng.random(shape, dtype=np.float32)) for shape in VERIFY_SHAPES
    ]
    inputs.append(reference_image(image))
    return inputs


def onnx_max_abs_diff(
    session: ort.InferenceSession, model: nn.Module, inputs: Sequence[tuple[str, np.ndarray]]
) -> float:
    """Largest |onnxruntime - torch| over ``inputs``; NaN if any output pair has NaN."""
    model = model.eval()
    return _max_abs_diff(
        [run_torch(model, x) for _, x in inputs], [_run_ort(session, x) for _, x in inputs]
    )


def check_fold(
    folded: RDN,
    inputs: Sequence[tuple[str, np.ndarray]],
    expected: Sequence[np.ndarray],
    tolerance: float,
    output: Path,
) -> float | None:
    """Max |folded - unfolded| over ``inputs`` (None without inputs); raise past tolerance."""
    if not inputs:
        return None
    for (label, _), y in zip(inputs, expected, strict=True):
        if not np.isfinite(y).all():
            raise ExportError(
                f"verification failed: the torch model's output on {label} is not finite "
                f"(NaN/inf weights or statistics?); export a healthy checkpoint; nothing "
                f"written to {output}"
            )
    diff = _max_abs_diff(expected, [run_torch(folded, x) for _, x in inputs])
    _require(diff, tolerance, "folded vs unfolded torch model", output)
    logger.info(
        "fold: folded vs unfolded torch max |diff| %.3g (<= %g) over %d inputs",
        diff, tolerance, len(inputs),
    )  # fmt: skip
    return diff


def check_onnx(
    model_bytes: bytes,
    metadata: ModelMetadata,
    inputs: Sequence[tuple[str, np.ndarray]],
    expected: Sequence[np.ndarray],
    tolerance: float,
    output: Path,
) -> tuple[float | None, str | None, tuple[str, ...]]:
    """Load the model in onnxruntime and compare it with torch on ``inputs`` (if any).

    Returns (max |diff| or None, provider the numbers came from, notes on skipped checks).
    A float16 model's numbers are only checked on a session really running on CUDA; on CPU
    it is only loaded and run once, and the note says why the numbers were skipped.
    """
    if metadata.precision == "float16":
        session, why_not = _cuda_session(model_bytes)
        if session is None:
            _run_once(_cpu_session(model_bytes), metadata.scale)
            note = f"fp16 numeric check skipped: {why_not}"
            logger.info("fp16: structure ok (float32 io, float16 weights, runs on CPU); %s", note)
            return None, None, (note,)
        provider = CUDA
    else:
        session, provider = _cpu_session(model_bytes), CPU
        _run_once(session, metadata.scale)
    if not inputs:
        return None, None, ()
    diff = _max_abs_diff(expected, [_run_ort(session, x) for _, x in inputs])
    _require(diff, tolerance, f"onnxruntime ({provider}) vs torch", output)
    logger.info(
        "verify: onnxruntime %s vs torch max |diff| %.3g (<= %g) over %s",
        provider, diff, tolerance, ", ".join(label for label, _ in inputs),
    )  # fmt: skip
    return diff, provider, ()


def check_writable(output: Path) -> None:
    """Fail fast (before a seconds-long export) if ``output`` cannot be written.

    Probes the nearest existing ancestor with a real temporary file, which also catches
    read-only file systems and permissions that ``os.access`` misjudges (e.g. for root).
    """
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"output {output} is a directory; give a file path such as model.onnx")
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(
            f"cannot write {output}: {ancestor} is not a directory; choose another --output"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".rdn-export-probe.", dir=ancestor)
    except OSError as e:
        raise ExportError(
            f"cannot write {output}: {ancestor}: {e.strerror or e}; choose a writable path"
        ) from e
    os.close(fd)
    os.unlink(probe)


def run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def _run_ort(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model_bytes, providers=[CPU])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load the exported model: {e}") from e


def _cuda_session(model_bytes: bytes) -> tuple[ort.InferenceSession | None, str]:
    """(session really running on CUDA, "") or (None, why not).

    An onnxruntime-gpu without CUDA 13/cuDNN 9 logs an error and silently falls back to CPU,
    so the providers the session actually got are what counts, not the available ones.
    """
    if CUDA not in ort.get_available_providers():
        return None, f"this onnxruntime build has no {CUDA}"
    ort.set_default_logger_severity(4)  # the fallback's error lines would break one-line output
    try:
        session = ort.InferenceSession(model_bytes, providers=[CUDA, CPU])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        return None, f"CUDA session failed ({type(e).__name__})"
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)
    active = session.get_providers()
    if CUDA not in active:
        return None, f"CUDA provider not active (session runs on {', '.join(active)}; no GPU?)"
    return session, ""


def _run_once(session: ort.InferenceSession, scale: int) -> None:
    """Run one small input and check the output's dtype and shape."""
    y = _run_ort(session, np.zeros(WARMUP_SHAPE, dtype=np.float32))
    n, c, h, w = WARMUP_SHAPE
    if y.dtype != np.float32 or y.shape != (n, c, h * scale, w * scale):
        raise ExportError(f"exported model returns {y.dtype} {y.shape}, expected float32 x{scale}")


def _max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest |a - b| over all pairs; NaN if any difference is NaN (never hidden by max)."""
    diffs = [float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True)]
    return float("nan") if any(np.isnan(diffs)) else max(diffs)


def _require(diff: float, tolerance: float, what: str, output: Path) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"verification failed: {what} max |diff| {diff:.3g} > {tolerance:g}; "
            f"nothing written to {output}"
        )
