"""Clients for rdn.v1.Upscaler: ``UpscaleClient`` (blocking) and ``AsyncUpscaleClient``
(asyncio), and the ``rdn-client`` command line.

``from server.client import UpscaleClient`` is the public entry point: the library lives in
``server.client.library`` (with ``messages`` and ``retry`` beside it), the command line in
``server.client.cli`` (``python -m server.client``), which a library user never loads.
"""

from __future__ import annotations

from server.client.library import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    LB_POLICIES,
    AsyncUpscaleClient,
    UpscaleClient,
    channel_options,
)
from server.client.messages import (
    AnswerError,
    Payload,
    ProgressCallback,
    StreamAssembler,
    UpscaleResult,
    make_payload,
    stream_messages,
    unary_request,
)
from server.client.retry import RetryPolicy, UpscaleError, backoff_s, is_retryable, retry_after_s
from server.core.sizing import SizeOptions
from server.imaging.options import ImageOptions
from server.wire import FORMATS as FORMAT_NAMES  # OutputFormat number -> format name

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "FORMAT_NAMES",
    "LB_POLICIES",
    "AnswerError",
    "AsyncUpscaleClient",
    "ImageOptions",
    "Payload",
    "ProgressCallback",
    "RetryPolicy",
    "SizeOptions",
    "StreamAssembler",
    "UpscaleClient",
    "UpscaleError",
    "UpscaleResult",
    "backoff_s",
    "channel_options",
    "is_retryable",
    "main",
    "make_payload",
    "retry_after_s",
    "stream_messages",
    "unary_request",
]


def main(argv: list[str] | None = None) -> int:
    """``rdn-client`` (its command line is imported only when run)."""
    from server.client.cli import main as cli_main

    return cli_main(argv)
