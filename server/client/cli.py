"""``rdn-client``: upscale image files and folders through rdn-serve (or in-process with
``--local``), list the served models, print a model's info, or check health.

The command line only: flags, the walk over the inputs (naming rules in
``server.client.files``), one bar of files and, for a single file, one of its tiles
(``server.client.progress``), a line on stdout per written file and exit codes (0, or 1 when
anything failed). The calls themselves are ``server.client``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from rdn.constants import DEFAULT_SCALE, SCALES
from server.client.files import (
    expand_inputs,
    option_warnings,
    output_path,
    own_format,
    resolve_format,
    size_tag,
    writes_single_file,
)
from server.client.library import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    LB_POLICIES,
    AsyncUpscaleClient,
    UpscaleClient,
)
from server.client.retry import RetryPolicy, UpscaleError
from server.core.sizing import SizeOptions
from server.imaging.options import ALPHA_MODES, DEFAULT_ALPHA, ImageOptions
from server.ops.security import add_client_security_flags, client_security_from_args
from server.pb.rdn.v1 import upscale_pb2
from server.wire import AUTO_MODEL, DEFAULT_QUALITY

log = logging.getLogger("rdn.client")

CLI_FORMATS = ("png", "jpeg", "webp", "avif", "gif", "tiff")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 (default) or 1..100, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """``rdn-client``'s flags: four subcommands sharing the connection flags."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"HOST:PORT or dns:///HOST:PORT ({DEFAULT_TARGET})"
    )
    common.add_argument("--deadline", type=float, default=None, help="seconds per image (none)")
    common.add_argument(
        "--retries", type=int, default=3, help="retries on UNAVAILABLE / full queue (3)"
    )
    common.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="gRPC message limit, both directions; match the server's (8 MiB)",
    )
    common.add_argument("--lb", choices=LB_POLICIES, default=None, help="load-balancing policy")
    add_client_security_flags(common)

    parser = argparse.ArgumentParser(
        prog="rdn-client", description="Upscale images with an rdn-serve server (rdn.v1.Upscaler)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upscale", parents=[common], help="upscale image files")
    up.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders")
    up.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder, or file for one input"
    )
    up.add_argument("--recursive", action="store_true", help="images in sub-folders of IN too")
    up.add_argument("--model", default="", help="model name (rdn-client models lists them)")
    up.add_argument(
        "--scale", type=int, choices=SCALES, default=0, help="that scale's default model"
    )
    up.add_argument("--width", type=_positive_int, default=0, help="output width in pixels")
    up.add_argument("--height", type=_positive_int, default=0, help="output height in pixels")
    up.add_argument(
        "--outscale", type=_positive_float, default=0.0, help="output size / input size, e.g. 1.5"
    )
    up.add_argument(
        "--local",
        metavar="MODEL",
        help="upscale in this process with MODEL, a shipped model's name (rdn_x2, rdn_x4_photo "
        "...), an .onnx file, or auto (the shipped clean or photo model of --scale, chosen per "
        "image as the server does); no server, same tiling and resize",
    )
    up.add_argument(
        "--format",
        choices=CLI_FORMATS,
        default=None,
        help="output format (default: the extension of -o for one file, else each file's own "
        "kind: an animated GIF stays a GIF, a TIFF a TIFF, BMP/HEIC become PNG)",
    )
    up.add_argument(
        "--quality", type=_quality, default=0, help="JPEG/WebP/AVIF 1..100; 0 = default"
    )
    up.add_argument(
        "--to-srgb",
        action="store_true",
        help="convert from the image's colour profile to sRGB (default: keep the profile)",
    )
    up.add_argument(
        "--strip-metadata",
        action="store_true",
        help="drop EXIF and XMP, GPS included (default: keep them, orientation reset to 1)",
    )
    up.add_argument(
        "--alpha",
        choices=ALPHA_MODES,
        default=DEFAULT_ALPHA,
        help=f"how an alpha channel is upscaled ({DEFAULT_ALPHA})",
    )
    up.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (4)")
    info = commands.add_parser("info", parents=[common], help="print ModelInfo as JSON")
    info.add_argument("--model", default="", help="a model's name (default: the server's default)")
    commands.add_parser(
        "models", parents=[common], help="list the served models, one line each, default first"
    )
    commands.add_parser("health", parents=[common], help="print SERVING or NOT_SERVING")
    return parser


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {args.retries}")
    return {
        "max_message_bytes": args.max_message_bytes,
        "lb": args.lb,
        "retry": RetryPolicy(max_attempts=args.retries + 1),
        "security": client_security_from_args(args),
    }


def size_options(args: argparse.Namespace) -> SizeOptions:
    """The model and sizing options of ``rdn-client upscale``, checked."""
    options = SizeOptions(
        model=args.model,
        scale=args.scale,
        target_width=args.width,
        target_height=args.height,
        outscale=args.outscale,
    )
    if options.outscale and (options.target_width or options.target_height):
        raise ValueError("--outscale cannot be combined with --width / --height; pick one")
    local_auto = args.local == AUTO_MODEL
    if args.local is not None and (options.model or (options.scale and not local_auto)):
        raise ValueError(
            "--local runs the given file; --model and --scale choose a served model "
            "(--scale goes with --local auto)"
        )
    return options


# An upscale of one file: its bytes, their size tag, the model that ran and why.
Upscaled = tuple[bytes, str, str, str]
Upscaler = Callable[[bytes, str, int, str, SizeOptions], Awaitable[Upscaled]]


def image_options(args: argparse.Namespace) -> ImageOptions:
    """The colour, metadata and alpha options of ``rdn-client upscale``."""
    return ImageOptions(args.to_srgb, args.strip_metadata, args.alpha)


def _say_notes(name: str, notes: tuple[str, ...]) -> None:
    for note in notes:
        log.warning("%s: %s", name, note)


def _remote(
    client: AsyncUpscaleClient, deadline: float | None, tile_bar: bool, image: ImageOptions
) -> Upscaler:
    """Upscales through the server; with ``tile_bar`` (one file) a bar follows its tiles."""
    from server.client.progress import TileBar  # tqdm: only for the command line

    async def run(data: bytes, fmt: str, quality: int, name: str, options: SizeOptions) -> Upscaled:
        bar = TileBar(name) if tile_bar else None
        try:
            result = await client.upscale(
                data,
                fmt,
                quality,
                request_id=name,
                timeout=deadline,
                options=options,
                progress=bar,
                image=image,
            )
        finally:
            if bar is not None:
                bar.close()
        _say_notes(name, result.notes)
        tag = size_tag(result.width, result.height, result.scale, result.resized)
        return result.image, tag, result.model, result.model_reason

    return run


def _local(model: str, scale: int, image: ImageOptions) -> Upscaler:
    """Upscales in this process with ``model`` (``--local``), one image at a time."""
    # Imported when asked: they open an onnxruntime session.
    from rdn.onnx_session import ModelLoadError
    from server.local import LocalUpscaler

    try:
        upscaler = LocalUpscaler(model, scale=scale or DEFAULT_SCALE)
    except (ModelLoadError, ValueError) as e:
        raise ValueError(f"--local: {e}") from e
    lock = asyncio.Lock()  # one image at a time: the session already uses every core

    async def run(data: bytes, fmt: str, quality: int, name: str, options: SizeOptions) -> Upscaled:
        async with lock:
            result = await asyncio.to_thread(
                upscaler.upscale_bytes,
                data,
                fmt,
                quality or DEFAULT_QUALITY,
                width=options.target_width,
                height=options.target_height,
                outscale=options.outscale,
                convert_to_srgb=image.convert_to_srgb,
                strip_metadata=image.strip_metadata,
                alpha=image.alpha,
            )
        _say_notes(name, result.notes)
        tag = size_tag(result.width, result.height, upscaler.scale, result.resized)
        return result.image, tag, result.model, result.model_reason

    return run


async def _upscale_files(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    from tqdm import tqdm

    options = size_options(args)
    sources = expand_inputs(args.inputs, args.recursive)
    to_file = writes_single_file(args.inputs, args.output)
    fmt = resolve_format(args.output, to_file, args.format)
    for warning in option_warnings(args.output, to_file, fmt, args.quality):
        log.warning("warning: %s", warning)
    if not to_file:
        args.output.mkdir(parents=True, exist_ok=True)
    failures = 0
    limit = asyncio.Semaphore(args.concurrency)
    progress = tqdm(total=len(sources), unit="img", disable=len(sources) < 2, file=sys.stderr)

    async def one(run: Upscaler, source: Path, relative: Path) -> None:
        nonlocal failures
        async with limit:
            try:
                data = await asyncio.to_thread(source.read_bytes)
                kind = fmt or own_format(source)  # a folder: each file in its own kind
                image, tag, model, reason = await run(
                    data, kind, args.quality, source.name, options
                )
                target = output_path(relative, args.output, to_file, kind, tag)
                target.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(target.write_bytes, image)
                write(f"{source} -> {target}")
                log.info("%s: %s (%s)", source.name, model, reason)
            except (UpscaleError, OSError, ValueError) as e:
                failures += 1
                log.error("%s: %s", source, e)
            finally:
                progress.update(1)

    try:
        if args.local is not None:
            run = await asyncio.to_thread(_local, args.local, args.scale, image_options(args))
            await asyncio.gather(*(one(run, s, r) for s, r in sources))
        else:
            async with AsyncUpscaleClient(args.target, **_client_kwargs(args)) as client:
                run = _remote(client, args.deadline, len(sources) == 1, image_options(args))
                await asyncio.gather(*(one(run, s, r) for s, r in sources))
    finally:
        progress.close()
    return 1 if failures else 0


def model_line(info: upscale_pb2.ModelInfo) -> str:
    """One line of ``rdn-client models``."""
    roles = [r for r, on in (("server default", info.server_default), ("default of its scale",
             info.is_default)) if on]  # fmt: skip
    return f"{info.name}\tx{info.scale}\t{info.file}\t{', '.join(roles) or '-'}"


def main(argv: list[str] | None = None) -> int:
    """``rdn-client``: upscale files, print model info, or check health."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rdn-client: %(message)s", stream=sys.stderr)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        if args.command == "upscale":
            return asyncio.run(_upscale_files(args, write))
        with UpscaleClient(args.target, **_client_kwargs(args)) as client:
            if args.command == "models":
                for info in client.models(timeout=args.deadline):
                    write(model_line(info))
                return 0
            if args.command == "info":
                info = client.info(timeout=args.deadline, model=args.model)
                write(
                    json_format.MessageToJson(
                        info,
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    )
                )
                return 0
            status = client.health(timeout=args.deadline)
            write(status)
            return 0 if status == "SERVING" else 1
    except (UpscaleError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
