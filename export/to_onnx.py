"""Checkpoint -> one self-contained, verified ONNX file with every BatchNorm folded away.

``export_onnx`` rebuilds the model from the config stored in the checkpoint, folds each frozen
BatchNorm into the convolution before it (exact in eval mode, and the graph then has no
BatchNormalization node), exports with the torch dynamo exporter (dynamic batch, height and
width), writes ``rdn.*`` metadata (see ``rdn.metadata``) and, unless told not to, proves the
file computes what the checkpoint computes: onnxruntime against torch on random inputs of
several shapes and on a real photograph. Nothing is written at ``output`` unless every check
passes. The exported graph runs its RGB conv before the last pixel shuffle (``rdn.subpixel``),
which computes the same function with a fraction of the data movement.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from export.int8 import (
    DEFAULT_MAX_LOSS_DB,
    Int8Error,
    Int8Loss,
    int8_loss,
    quantize_graph,
    verification_photos,
)
from rdn.checkpoint import CheckpointError, atomic_write, load_model
from rdn.constants import CPU, CUDA, INPUT_NAME, OUTPUT_NAME
from rdn.fold import fold_batchnorm as fold_into_convs
from rdn.int8 import calibrate, calibration_batches, int8_model
from rdn.metadata import INT8_SUFFIX, ModelMetadata, default_model_name, training_metadata
from rdn.model import RDN
from rdn.quant import float_mode, is_calibrated
from rdn.subpixel import fold_rgb_before_shuffle

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # torchlib's own opset in torch 2.13: no version conversion needed
MIN_OPSET = 17  # lower ones go through onnx's C version converter; 17 is the lowest verified here
MAX_OPSET = 23  # torch.onnx's ONNX_MAX_OPSET in torch 2.13
FP32_TOLERANCE = 1e-4  # max |onnxruntime - torch| on outputs in [0, 1]
FP16_TOLERANCE = 1e-2  # float16 weights carry ~3 significant digits
EXAMPLE_SHAPE = (2, 3, 24, 32)  # traced example; batch, height and width are exported dynamic
# Verification shapes: odd sizes, batch 1 and 3, non-square (none equal to EXAMPLE_SHAPE).
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


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    fp16: bool = False  # float16 weights for GPUs; inputs and outputs stay float32
    verify: bool = True  # onnxruntime vs torch, and folded vs unfolded torch
    verify_image: Path | None = None  # RGB image for the real-image check; None: astronaut
    tolerance: float | None = None  # max |diff| allowed; None: FP32_/FP16_TOLERANCE
    name: str = ""  # the name servers use (rdn.name); "" = rdn_x{scale}[_{degradation}]
    int8: bool = False  # QDQ int8 model (export.int8); needs ``calibrate``
    calibrate: Path | None = None  # photos: calibration (float checkpoints) and the loss check
    calibrate_limit: int = 32  # photos of ``calibrate`` used, in name order
    int8_max_loss: float = DEFAULT_MAX_LOSS_DB  # refuse an int8 file losing more (Y-PSNR dB)
    allow_int8_loss: bool = False  # write it anyway
    # The float model the int8 one replaces (its twin), measured against instead of the float
    # graph of the same weights: after --qat the weights moved, and the twin's loss is the point.
    reference: Path | None = None


@dataclass(frozen=True)
class ExportReport:
    """What was written and what was measured."""

    output: Path
    max_abs_diff: float | None  # onnxruntime vs torch (None when not verified)
    fold_max_abs_diff: float | None  # folded vs unfolded torch model (None when not verified)
    tolerance: float
    opset: int
    precision: str  # "float32" | "float16" | "int8" (weights)
    scale: int
    config: Mapping[str, Any]
    step: int
    weights_sha256: str
    folded_batchnorms: int
    bn_frozen: bool | None  # as recorded in the checkpoint; None if it does not say
    verified_inputs: tuple[str, ...]  # e.g. "1x3x17x23", "astronaut 1x3x80x96"
    verify_provider: str | None  # onnxruntime provider the numbers came from
    notes: tuple[str, ...]  # skipped checks and why, one line each
    export_seconds: float
    verify_seconds: float
    size_bytes: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    int8_loss: Int8Loss | None = None  # int8: float and int8 Y-PSNR on the --calibrate photos


def check_opset(opset: int) -> None:
    """Raise ExportError unless ``opset`` is one the exporter and onnxruntime handle here."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} not supported: choose {MIN_OPSET}..{MAX_OPSET} (default "
            f"{DEFAULT_OPSET}, the torch dynamo exporter's own)"
        )


def fold_batchnorm(model: RDN) -> RDN:
    """``rdn.fold.fold_batchnorm``, its failure an ExportError."""
    try:
        return fold_into_convs(model)
    except ValueError as e:
        raise ExportError(str(e)) from e


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order.

    Identifies the trained weights independently of opset, precision or file layout, so two
    exports of one checkpoint share it.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def export_onnx(
    checkpoint: Path, output: Path, options: ExportOptions = ExportOptions()
) -> ExportReport:
    """Export ``checkpoint`` to ``output`` (one .onnx file); verify unless told not to.

    Raises ExportError on any failure, leaving nothing at ``output``. Killed at any moment, it
    leaves no file at ``output`` or the complete one; a kill inside the final write can leave a
    hidden ``.NAME.*.tmp`` beside it, which the next export to ``output`` removes.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    check_opset(options.opset)
    check_writable(output)
    if options.int8 and options.fp16:
        raise ExportError("--int8 and --fp16 exclude each other: choose one precision")
    if options.int8 and options.calibrate is None:
        raise ExportError(
            "--int8 needs --calibrate DIR: photos to calibrate on and to verify the int8 model "
            "against the float one"
        )
    precision = "int8" if options.int8 else "float16" if options.fp16 else "float32"
    tolerance = options.tolerance
    if tolerance is None:
        tolerance = FP16_TOLERANCE if options.fp16 else FP32_TOLERANCE

    try:
        model, data = load_model(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    except Exception as e:  # a foreign pickle can fail in any way
        raise ExportError(
            f"checkpoint {checkpoint}: cannot be loaded ({type(e).__name__}: {e}); write "
            "checkpoints with rdn-train"
        ) from e
    config = model.config
    n_bn = count_batchnorms(model)
    if options.int8:
        model = _int8_ready(model, options)
    elif config.quant != "none":
        raise ExportError(
            f"checkpoint {checkpoint}: a quantization-aware (--qat) model; export it with --int8"
        )
    with float_mode(model):  # an int8 model's float graph first; quantized below
        folded = fold_rgb_before_shuffle(fold_batchnorm(model))
    logger.info(
        "loaded %s: RDN x%d (G0=%d D=%d C=%d G=%d norm=%s), step %s, %d BatchNorms folded",
        checkpoint, config.scale, config.G0, config.D, config.C, config.G, config.norm,
        data.get("step", 0), n_bn,
    )  # fmt: skip
    bn_frozen = data.get("bn_frozen")
    if n_bn and bn_frozen is False:
        logger.warning(
            "checkpoint %s: BatchNorm was not frozen in training; the export uses its running "
            "statistics (eval mode), which may differ from what training measured",
            checkpoint,
        )

    verify_start = time.perf_counter()
    inputs = verification_inputs(options.verify_image) if options.verify else []
    with float_mode(model):
        expected = [_run_torch(model, x) for _, x in inputs]
    fold_diff = _check_fold(folded, inputs, expected, min(tolerance, FP32_TOLERANCE), output)
    verify_seconds = time.perf_counter() - verify_start

    training = training_metadata(data)
    degradation = str(training.get("train_config", {}).get("degradation", "bicubic"))
    metadata = ModelMetadata(
        scale=config.scale,
        config=config.to_dict(),
        step=int(data.get("step", 0)),
        weights_sha256=weights_sha256(data["model"]),
        precision=precision,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        training=training,
        name=options.name
        or default_model_name(config.scale, degradation) + (INT8_SUFFIX if options.int8 else ""),
    )
    float_metadata = replace(metadata, precision="float32") if options.int8 else metadata
    export_start = time.perf_counter()
    proto = build_onnx(folded, float_metadata, options.opset)
    export_seconds = time.perf_counter() - export_start
    model_bytes = proto.SerializeToString()

    verify_start = time.perf_counter()
    max_diff, provider, notes = _check_onnx(
        model_bytes, float_metadata, inputs, expected, tolerance, output
    )
    verify_seconds += time.perf_counter() - verify_start
    if not options.verify:
        notes = (*notes, "verification skipped (--no-verify)")
        logger.info("verify: skipped (--no-verify)")
    loss = None
    if options.int8:
        verify_start = time.perf_counter()
        model_bytes, metadata, loss = _quantize(proto, model, metadata, options)
        verify_seconds += time.perf_counter() - verify_start

    try:
        # A kill inside an earlier atomic write of this output left its hidden temp file.
        for stale in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        atomic_write(output, lambda f: f.write(model_bytes))
    except OSError as e:
        raise ExportError(
            f"cannot write {output}: {e.strerror or e}; choose a writable path"
        ) from e
    logger.info(
        "wrote %s (%.1f KiB, %s weights, weights sha256 %s...)",
        output, len(model_bytes) / 1024, precision, metadata.weights_sha256[:16],
    )  # fmt: skip
    return ExportReport(
        output=output,
        max_abs_diff=max_diff,
        fold_max_abs_diff=fold_diff,
        tolerance=tolerance,
        opset=options.opset,
        precision=precision,
        scale=config.scale,
        config=config.to_dict(),
        step=metadata.step,
        weights_sha256=metadata.weights_sha256,
        folded_batchnorms=n_bn,
        bn_frozen=bn_frozen if isinstance(bn_frozen, bool) else None,
        verified_inputs=tuple(label for label, _ in inputs) if max_diff is not None else (),
        verify_provider=provider,
        notes=notes,
        export_seconds=export_seconds,
        verify_seconds=verify_seconds,
        size_bytes=len(model_bytes),
        metadata=metadata.to_props(),
        int8_loss=loss,
    )


def _int8_ready(model: RDN, options: ExportOptions) -> RDN:
    """``model``'s int8 twin with its activation ranges: from --qat training, or calibrated
    now on the --calibrate photos."""
    assert options.calibrate is not None
    twin = int8_model(model).eval()
    if is_calibrated(twin):
        logger.info("int8: activation ranges from quantization-aware training")
        return twin
    try:
        batches = calibration_batches(
            options.calibrate, model.config.scale, limit=options.calibrate_limit
        )
    except (OSError, ValueError) as e:
        raise ExportError(f"--calibrate {options.calibrate}: {e}") from e
    seen = calibrate(twin, batches)
    logger.info("int8: calibrated on %d batches of %s", seen, options.calibrate)
    return twin


def _quantize(
    float_proto: onnx.ModelProto, model: RDN, metadata: ModelMetadata, options: ExportOptions
) -> tuple[bytes, ModelMetadata, Int8Loss]:
    """The QDQ int8 file's bytes, its metadata with the measured loss, and the loss; raises
    ExportError when the loss is over the bound (unless allowed)."""
    assert options.calibrate is not None
    try:
        quantized = quantize_graph(float_proto, model)
        photos = verification_photos(options.calibrate, options.calibrate_limit)
        int8_bytes = quantized.SerializeToString()
        reference = (
            options.reference.read_bytes()
            if options.reference is not None
            else float_proto.SerializeToString()
        )
        loss = int8_loss(reference, int8_bytes, photos, metadata.scale)
    except (Int8Error, OSError, ValueError) as e:
        raise ExportError(f"int8: {e}") from e
    logger.info(
        "int8: Y-PSNR %.3f dB (%s %.3f): %.3f dB lost on %d photos of %s (bound %.2f)",
        loss.int8_psnr_y, options.reference or "float graph", loss.float_psnr_y, loss.loss_db,
        loss.images, options.calibrate, options.int8_max_loss,
    )  # fmt: skip
    if loss.loss_db > options.int8_max_loss and not options.allow_int8_loss:
        raise ExportError(
            f"int8 model loses {loss.loss_db:.3f} dB Y-PSNR against the float one on "
            f"{options.calibrate}, over --int8-max-loss {options.int8_max_loss:g}; fine-tune it "
            "with rdn-train --qat, or pass --allow-int8-loss to write it anyway"
        )
    metadata = replace(
        metadata,
        int8_loss_db=loss.loss_db,
        int8_verified_on=f"{loss.images} photos of {options.calibrate.name}"
        + (f" against {options.reference.name}" if options.reference is not None else ""),
    )
    del quantized.metadata_props[:]
    set_metadata(quantized, metadata.to_props())
    return quantized.SerializeToString(), metadata, loss


def build_onnx(folded: RDN, metadata: ModelMetadata, opset: int) -> onnx.ModelProto:
    """Export a folded model and make it a finished, checked ONNX model (still in memory).

    Float16 conversion happens here when ``metadata.precision`` says so; the structural
    checks (no BatchNormalization, onnx.checker, float16 layout) run whatever the options.
    """
    start = time.perf_counter()
    proto = _export_proto(folded, opset)
    logger.info(
        "exported with the torch dynamo exporter, opset %d, in %.1f s",
        opset, time.perf_counter() - start,
    )  # fmt: skip
    bn_nodes = count_op(proto, "BatchNormalization")
    if bn_nodes:
        raise ExportError(
            f"exported graph still has {bn_nodes} BatchNormalization nodes; is every "
            "BatchNorm preceded by a conv in rdn/model.py?"
        )
    if metadata.precision == "float16":
        proto = to_float16(proto)
    set_metadata(proto, metadata.to_props())
    scale = metadata.scale
    proto.doc_string = (
        f"RDN x{scale} super-resolution, {metadata.precision} weights: input {INPUT_NAME} "
        f"float32 [N,3,H,W] RGB in [0,1], output {OUTPUT_NAME} float32 [N,3,{scale}H,{scale}W]"
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"exported model fails onnx.checker: {first}") from e
    if metadata.precision == "float16":
        check_float16_structure(proto)
    return proto


def onnx_max_abs_diff(
    session: ort.InferenceSession, model: nn.Module, inputs: Sequence[tuple[str, np.ndarray]]
) -> float:
    """Largest |onnxruntime - torch| over ``inputs``; NaN if any output pair has NaN."""
    model = model.eval()
    return _max_abs_diff(
        [_run_torch(model, x) for _, x in inputs], [_run_ort(session, x) for _, x in inputs]
    )


def _check_fold(
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
    diff = _max_abs_diff(expected, [_run_torch(folded, x) for _, x in inputs])
    _require(diff, tolerance, "folded vs unfolded torch model", output)
    logger.info(
        "fold: folded vs unfolded torch max |diff| %.3g (<= %g) over %d inputs",
        diff, tolerance, len(inputs),
    )  # fmt: skip
    return diff


def _check_onnx(
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


def count_op(proto: onnx.ModelProto, op_type: str) -> int:
    """Nodes of ``op_type`` in the main graph and in every local function."""
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    return sum(node.op_type == op_type for node in nodes)


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace the model-level ``metadata_props`` entries named in ``props``."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and compute with float32 inputs and outputs (onnxruntime's converter).

    The converter appends its input Casts at the end of the node list; onnxruntime's own
    topological sort puts them back in order (``onnx.checker`` requires it).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = convert_float_to_float16(proto, keep_io_types=True)
        OnnxModel.graph_topological_sort(half.graph, is_deterministic=True)
    except Exception as e:  # the converter raises plain ValueError/RuntimeError/KeyError
        raise ExportError(
            f"float16 conversion failed ({type(e).__name__}: {e}); export without --fp16"
        ) from e
    return half


def check_float16_structure(proto: onnx.ModelProto) -> None:
    """Float32 inputs and outputs, float16 floating-point initializers, no float32 weight."""
    io = [*proto.graph.input, *proto.graph.output]
    not_fp32 = [v.name for v in io if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT]
    if not_fp32:
        raise ExportError(f"float16 model: inputs/outputs {not_fp32} are not float32")
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = [t for t in proto.graph.initializer if t.data_type in float_types]
    not_fp16 = [t.name for t in weights if t.data_type != onnx.TensorProto.FLOAT16]
    if not weights or not_fp16:
        raise ExportError(f"float16 model: initializers {not_fp16[:5]} are not float16")


def _export_proto(model: RDN, opset: int) -> onnx.ModelProto:
    """The dynamo export of ``model`` with dynamic batch/height/width, as an in-memory proto."""
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=1)
    width = torch.export.Dim("width", min=1)
    example = torch.rand(EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(VERIFY_SEED))
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (example,),
                None,  # keep it in memory: metadata and checks come before the atomic write
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
            return program.model_proto  # initializers included: one self-contained file
    except Exception as e:  # the exporter raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(
            f"torch dynamo exporter failed at opset {opset} ({type(e).__name__}: {first}); "
            f"try --opset {DEFAULT_OPSET}"
        ) from e


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (warnings, "torchvision is not installed", opset notes)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
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
