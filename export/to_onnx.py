"""Checkpoint -> one self-contained, verified ONNX file with every BatchNorm folded away.

``export_onnx`` rebuilds the model from the config stored in the checkpoint, folds each frozen
BatchNorm into the convolution before it (exact in eval mode, and the graph then has no
BatchNormalization node), exports with the torch dynamo exporter (dynamic batch, height and
width), writes ``rdn.*`` metadata (see ``rdn.metadata``) and, unless told not to, proves the
file computes what the checkpoint computes: onnxruntime against torch on random inputs of
several shapes and on a real photograph (``export.verify``). Nothing is written at ``output``
unless every check passes. The exported graph runs its RGB conv before the last pixel
shuffle (``rdn.subpixel``), which computes the same function with a fraction of the data
movement.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.int8 import (
    DEFAULT_MAX_LOSS_DB,
    Int8Error,
    Int8Loss,
    int8_loss,
    quantize_graph,
    verification_photos,
)
from export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    VERIFY_SEED,
    ExportError,
    check_fold,
    check_onnx,
    check_writable,
    run_torch,
    verification_inputs,
)
from rdn.checkpoint import CheckpointError, atomic_write, load_model
from rdn.constants import INPUT_NAME, OUTPUT_NAME
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
EXAMPLE_SHAPE = (2, 3, 24, 32)  # traced example; batch, height and width are exported dynamic


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
        expected = [run_torch(model, x) for _, x in inputs]
    fold_diff = check_fold(folded, inputs, expected, min(tolerance, FP32_TOLERANCE), output)
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
    max_diff, provider, notes = check_onnx(
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
