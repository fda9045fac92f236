"""``rdn-serve``: the command line of the super-resolution server.

Its flags become a ``ServerConfig`` (server/config.py); ``server.app.build_server`` assembles
the server and ``server.lifecycle.serve`` runs it until a signal stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from rdn.constants import DEFAULT_SCALE, SCALES
from rdn.metadata import INT8_MAX_LOSS_DB
from rdn.onnx_session import SWITCHES
from server.app import CPU_MAX_BATCH, GPU_MAX_BATCH
from server.config import (
    BatcherConfig,
    EngineConfig,
    HttpLimitsConfig,
    LimitsConfig,
    ServerConfig,
    TilingConfig,
    UploadConfig,
)
from server.core.planner import MODES
from server.doors.cross_site import add_http_flags, cross_site_config_from_args
from server.doors.http_limits import raise_open_file_limit
from server.lifecycle import EarlySignals, serve
from server.models import MODELS_DIR
from server.ops.logging_setup import LEVELS, configure_logging
from server.ops.memory import pin_mmap_threshold
from server.ops.metrics import (
    add_metrics_flags,
    metrics_config_from_args,
)
from server.ops.security import (
    add_security_flags,
    security_config_from_args,
)

log = logging.getLogger("rdn.serve")

PRECISION_CHOICES = ("auto", "int8", "fp32")  # --precision: see RepositoryConfig.precision
MIN_MESSAGE_BYTES = 64 * 2**10  # below this even a stream chunk barely fits


def _bucket_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected LR core sizes >= 1, comma-separated (e.g. 64,128,256), got {text!r}"
        )
    return sizes


# ----------------------------------------------------------------------------- command line


def _int_at_least(minimum: int) -> type[int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse  # type: ignore[return-value]


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 = any free port), got {value}")
    return value


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for flags that have a value by default (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="rdn-serve",
        description="Serve RDN ONNX models over gRPC (rdn.v1.Upscaler and KServe v2).",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        help="ONNX model to serve (repeatable; the first answers requests that name no model, "
        "scale or size). Without --model: every model of --model-dir",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="serve every *.onnx in this folder (default without --model: the shipped "
        "server/models/)",
    )
    p.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="NAME",
        help="make model NAME the default of its scale (repeatable; default: rdn_x{scale})",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=SCALES,
        help=f"whose default model answers requests that name no model, scale or size (default "
        f"{DEFAULT_SCALE}); with --model, checked against the first model",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=d.precision,
        help="which model answers a request naming only a scale when an int8 twin "
        "(rdn_x2_int8 beside rdn_x2) is served: auto (default) the int8 one on a CPU if its "
        f"export measured at most {INT8_MAX_LOSS_DB} dB loss, the float one on CUDA; int8; fp32",
    )
    p.add_argument("--host", default=d.host, help="address to bind")
    p.add_argument("--port", type=_port, default=d.port, help="port to bind; 0 = any free port")
    p.add_argument(
        "--max-batch",
        type=_int_at_least(0),
        default=d.batcher.max_batch,
        help=f"tiles per engine call; 0 = by provider ({CPU_MAX_BATCH} on CPU, "
        f"{GPU_MAX_BATCH} on CUDA)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=_non_negative_float,
        default=d.batcher.max_delay_ms,
        help="longest wait for more tiles while the engine is busy",
    )
    p.add_argument(
        "--max-queue-tiles",
        type=_int_at_least(1),
        default=d.batcher.max_queue_tiles,
        help="queued tiles beyond this are refused (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--tiling",
        choices=MODES,
        default=d.tiling.mode,
        help="fit: tiles fitted to each image (whole image under --max-tile-pixels); buckets: "
        "square windows of a few fixed sizes (--tile-buckets); grid: fixed --tile cores; auto: "
        "fit on CPU, buckets on CUDA",
    )
    p.add_argument(
        "--tile-buckets",
        type=_bucket_list,
        default=d.tiling.buckets,
        help="bucket tiling: LR core sizes, comma-separated (default 64,128,256; windows add "
        "2 x --tile-pad)",
    )
    p.add_argument(
        "--max-tile-pixels",
        type=_int_at_least(0),
        default=d.tiling.max_tile_pixels,
        help="fit tiling: largest tile, LR pixels; 0 = 384x384",
    )
    p.add_argument(
        "--tile", type=_int_at_least(1), default=d.tiling.tile, help="grid tiling: LR tile core"
    )
    p.add_argument(
        "--tile-pad", type=_int_at_least(0), default=d.tiling.pad, help="LR context per side"
    )
    p.add_argument(
        "--providers",
        default=",".join(d.engine.providers),
        help="onnxruntime execution providers, comma-separated, in priority order",
    )
    p.add_argument("--require-gpu", action="store_true", help="exit 1 unless CUDA is active")
    p.add_argument(
        "--threads", type=_int_at_least(0), default=0, help="onnxruntime intra-op threads; 0 = auto"
    )
    p.add_argument(
        "--ort-spinning",
        choices=SWITCHES,
        default=d.engine.spinning,
        help="onnxruntime intra-op threads spin between ops (auto: on for CPU, off for CUDA)",
    )
    p.add_argument(
        "--ort-cpu-arena",
        choices=SWITCHES,
        default=d.engine.cpu_arena,
        help="onnxruntime CPU memory arena (auto: on)",
    )
    p.add_argument(
        "--max-pixels", type=_int_at_least(1), default=d.limits.max_pixels, help="input W*H limit"
    )
    p.add_argument(
        "--max-request-bytes",
        type=_int_at_least(1),
        default=d.limits.max_request_bytes,
        help="largest encoded or raw input (streams included)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_int_at_least(MIN_MESSAGE_BYTES),
        default=d.limits.max_message_bytes,
        help="gRPC message limit, both directions (clients must use the same)",
    )
    p.add_argument(
        "--max-uploads",
        type=_int_at_least(1),
        default=d.uploads.max_concurrent,
        help="UpscaleStream uploads in progress at once; more are refused (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--max-buffered-bytes",
        type=_int_at_least(1),
        default=d.uploads.max_buffered_bytes,
        help="request bytes all calls together may hold (at least --max-request-bytes)",
    )
    p.add_argument(
        "--upload-idle-timeout",
        type=_positive_float,
        default=d.uploads.idle_timeout_s,
        help="seconds an upload may pause between messages",
    )
    p.add_argument(
        "--upload-deadline",
        type=_positive_float,
        default=d.uploads.deadline_s,
        help="seconds a whole upload (UpscaleStream, HTTP body) may take",
    )
    p.add_argument(
        "--upload-min-rate",
        type=_non_negative_float,
        default=d.uploads.min_rate_bytes_s,
        help="bytes/s an upload must average after its first --upload-idle-timeout seconds; "
        "slower ones end, and give their slot to a new upload when all are taken (0 = no minimum)",
    )
    p.add_argument(
        "--decode-workers",
        type=_int_at_least(1),
        default=d.decode_workers,
        help="threads that decode and encode images (each may hold one decode's memory)",
    )
    p.add_argument(
        "--grace", type=_non_negative_float, default=d.grace_s, help="seconds to drain on SIGTERM"
    )
    p.add_argument("--log-level", choices=LEVELS, default=d.log_level, help="log threshold")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument(
        "--self-ensemble", action="store_true", help="x8 geometric self-ensemble (8x compute)"
    )
    p.add_argument(
        "--http-port",
        type=_port,
        default=0,
        help="also serve HTTP here (KServe v2 REST, POST /v1/upscale, the page at /); 0 = off",
    )
    p.add_argument(
        "--http-idle-timeout",
        type=_positive_float,
        default=d.http_limits.idle_timeout_s,
        help="seconds an HTTP connection may take to send a complete request head, after it "
        "opens or after its previous answer (slow heads, idle keep-alive); then it is closed",
    )
    p.add_argument(
        "--http-max-connections",
        type=_int_at_least(1),
        default=d.http_limits.max_connections,
        help="open HTTP connections; more are closed at once (lowered at start to keep file "
        "descriptors for gRPC)",
    )
    add_http_flags(p)
    add_security_flags(p)
    add_metrics_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the flags describe; the shipped models when --model is absent."""
    models = tuple(args.model or ())
    model_dir = args.model_dir if args.model_dir is not None or models else MODELS_DIR
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    if not providers:
        raise ValueError("--providers is empty; name at least one, e.g. CPUExecutionProvider")
    if args.max_buffered_bytes < args.max_request_bytes:
        raise ValueError(
            f"--max-buffered-bytes {args.max_buffered_bytes} is below --max-request-bytes "
            f"{args.max_request_bytes}: a request of the allowed size could never be held"
        )
    return ServerConfig(
        model=models[0] if models else None,
        models=models[1:],
        model_dir=model_dir,
        defaults=tuple(args.default),
        default_scale=args.scale or DEFAULT_SCALE,
        precision=args.precision,
        host=args.host,
        port=args.port,
        grace_s=args.grace,
        engine=EngineConfig(
            providers=providers,
            require_gpu=args.require_gpu,
            intra_op_threads=args.threads,
            spinning=args.ort_spinning,
            cpu_arena=args.ort_cpu_arena,
        ),
        tiling=TilingConfig(
            tile=args.tile,
            pad=args.tile_pad,
            mode=args.tiling,
            max_tile_pixels=args.max_tile_pixels,
            buckets=args.tile_buckets,
        ),
        batcher=BatcherConfig(
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            max_queue_tiles=args.max_queue_tiles,
        ),
        limits=LimitsConfig(
            max_pixels=args.max_pixels,
            max_request_bytes=args.max_request_bytes,
            max_message_bytes=args.max_message_bytes,
        ),
        uploads=UploadConfig(
            idle_timeout_s=args.upload_idle_timeout,
            deadline_s=args.upload_deadline,
            max_concurrent=args.max_uploads,
            max_buffered_bytes=args.max_buffered_bytes,
            min_rate_bytes_s=args.upload_min_rate,
        ),
        decode_workers=args.decode_workers,
        log_level=args.log_level,
        log_json=args.log_json,
        self_ensemble=args.self_ensemble,
        security=security_config_from_args(args),
        metrics=metrics_config_from_args(args),
        http_port=args.http_port or None,
        http_limits=HttpLimitsConfig(
            idle_timeout_s=args.http_idle_timeout, max_connections=args.http_max_connections
        ),
        http_host=args.http_host,
        cross_site=cross_site_config_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    """``rdn-serve``."""
    early = EarlySignals()
    early.install()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    log.debug("starting")  # from here on a signal is recorded, then stops the start-up
    pin_mmap_threshold()  # large request buffers go back to the system when freed
    raise_open_file_limit()  # descriptors for connections; the HTTP door's cap keeps a reserve
    # A given --model is checked against --scale; otherwise --scale picks the default model.
    scale = args.scale if args.model else None
    try:
        config = config_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 1
    return asyncio.run(serve(config, scale, early))


if __name__ == "__main__":
    sys.exit(main())
