"""The query and headers of ``POST /v1/upscale`` read into the core's options: whole numbers
and decimals as JSON writes them (no "nan", "inf", "1_0" or other digits), a printable request
id, a known output format. Pure functions of the request."""

from __future__ import annotations

import re

from aiohttp import web

from server.core.errors import RequestError, check_name
from server.core.sizing import SizeOptions
from server.doors.http_body import one_line
from server.imaging.headers import ImageError
from server.imaging.options import ImageOptions, alpha_mode

# A query number: plain ASCII decimal, as JSON writes it (no "nan", "inf", "1_0" or "١")
DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,3})?|\.[0-9]{1,20}")
CONTENT_TYPES = {
    "png": "image/png",  # an APNG too
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
    "tiff": "image/tiff",
}
ALIASES = {"jpg": "jpeg", "tif": "tiff"}  # format= names for the same output format


def _whole_number(text: str, what: str) -> int:
    try:
        value = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else -1
    except ValueError:
        value = -1
    if value < 0:
        raise RequestError(f"{what}={one_line(text, 40)!r} must be a whole number >= 0")
    return value


def _int_query(request: web.Request, name: str) -> int:
    text = request.query.get(name, "")
    return _whole_number(text, f"query {name}") if text else 0


def _decimal_query(request: web.Request, name: str) -> float:
    text = request.query.get(name, "")
    if not text:
        return 0.0
    if DECIMAL.fullmatch(text) is None:
        raise RequestError(f"query {name}={one_line(text, 40)!r} must be a number, e.g. 1.5")
    return float(text)


def http_request_id(request: web.Request) -> str:
    """The ``X-Request-Id`` header: it is echoed in the answer's headers, so it must be
    printable text (aiohttp hands undecodable bytes over as surrogates)."""
    text = request.headers.get("X-Request-Id", "")
    if not text.isprintable():
        raise RequestError(
            f"X-Request-Id {one_line(text, 40)!r} is not printable UTF-8 text; send letters, "
            "digits and punctuation"
        )
    return text


def upscale_options(request: web.Request) -> tuple[SizeOptions, str, int]:
    """Model and size options, output format name and quality of ``POST /v1/upscale``."""
    outscale = _decimal_query(request, "outscale")
    options = SizeOptions(
        model=check_name(request.query.get("model", ""), "model"),
        scale=_int_query(request, "scale"),
        target_width=_int_query(request, "width"),
        target_height=_int_query(request, "height"),
        outscale=outscale,
    )
    # No format: PNG for a still image, the input's own kind for an animation.
    fmt = request.query.get("format", "auto").lower()
    if fmt not in CONTENT_TYPES and fmt not in ALIASES and fmt != "auto":
        raise RequestError(
            f"query format={one_line(fmt, 40)!r}: choose png, jpeg, webp, avif, gif or tiff"
        )
    return options, ALIASES.get(fmt, fmt), _int_query(request, "quality")


def _flag_query(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "")
    if text not in ("", "0", "1"):
        raise RequestError(f"query {name}={one_line(text, 40)!r} must be 1 (yes) or 0 (no)")
    return text == "1"


def image_query(request: web.Request) -> ImageOptions:
    """The colour, metadata and alpha options of ``POST /v1/upscale``: ``to_srgb=1``,
    ``strip=1``, ``alpha=model|bicubic``."""
    try:
        alpha = alpha_mode(request.query.get("alpha", ""))
    except ImageError as e:
        raise RequestError(f"query alpha: {e}") from None
    return ImageOptions(
        convert_to_srgb=_flag_query(request, "to_srgb"),
        strip_metadata=_flag_query(request, "strip"),
        alpha=alpha,
    )
