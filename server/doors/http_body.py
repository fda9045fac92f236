"""Request bodies of the HTTP door: read under the byte budget, the upload timeouts and the
minimum rate; JSON parsed only once its real cost is held.

A body grows with the bytes received (memory follows what arrived, not what was announced),
its announced size is held in the budget before any byte is read (a body without one holds
what has arrived), and when the upload ends early in any way (the client closes, pauses too
long, drips, sends too much) its buffer is emptied before the error leaves: its memory goes back
at once, whatever still refers to the failed frame. Compressed bodies are refused (415): aiohttp
would inflate them while the budget held their compressed size.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.core.errors import RequestError, RequestTooLarge
from server.core.uploads import Hold, UploadBudget, timed

READ_CHUNK_BYTES = 256 * 2**10  # one read of a request body
IDENTITY = ("", "identity")  # the only Content-Encoding accepted
# What parsed JSON costs, measured with tracemalloc on CPython 3.11: per `,` `[` `{` `:` of its
# text at most 77 bytes (a dict of many keys), per byte of text at most 25 (a list of empty
# objects; numbers 2.6-9). The smaller of the two bounds is held before parsing.
JSON_TOKEN_BYTES = 128
JSON_TEXT_FACTOR = 25
MESSAGE_CHARS = 200  # of a client's malformed input quoted in an error


class ClientGone(Exception):
    """The client closed the connection before its request was read: a cancellation."""


class UnsupportedEncoding(RequestError):
    """A body with a Content-Encoding (415): its inflated size could not be held up front."""


def one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` on one printable ASCII line of at most ``limit`` characters, for logs and errors
    that quote what a client sent."""
    flat = " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def check_encoding(request: web.BaseRequest) -> None:
    """Refuse a compressed body (``UnsupportedEncoding``)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in IDENTITY:
        raise UnsupportedEncoding(
            f"Content-Encoding {one_line(encoding, 40)!r} is not accepted: send the body "
            "uncompressed (images are compressed already; large tensors travel as binary data)"
        )


async def read_body(
    request: web.BaseRequest, limit: int, uploads: UploadBudget, flag: str = ""
) -> tuple[bytearray, Hold]:
    """The request body and its hold on the request-byte budget (release it when the request
    ends). The announced size is checked against ``limit`` (``flag`` names the option that
    sets it) and held before any byte is read; a body without one holds what has arrived. The
    body is read under the upload idle timeout, deadline and minimum rate, like an
    UpscaleStream upload, and takes an upload slot until it is received."""
    check_encoding(request)
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(
            f"the body is {length} bytes, over the limit of {limit} bytes for this request{flag}"
        )
    pace = uploads.pace()
    hold = uploads.hold(length or 0, upload=True, pace=pace)
    buffer = bytearray()
    try:
        async for chunk in timed(_pieces(request), uploads.config, pace):
            pace.add(len(chunk))
            end = len(buffer) + len(chunk)
            if end > limit:
                raise RequestTooLarge(f"the body is over the limit of {limit} bytes{flag}")
            hold.grow(end - hold.nbytes)  # only a body without an announced size grows
            buffer += chunk
        hold.end_upload()  # its bytes stay held until the request ends; the slot is free
        return buffer, hold
    except BaseException:
        buffer.clear()  # the memory goes back now, not when the failed frames are collected
        hold.release()
        raise


async def _pieces(request: web.BaseRequest) -> AsyncIterator[bytes]:
    """The request body in pieces of at most READ_CHUNK_BYTES, as they arrive; ``ClientGone``
    when the client closes the connection, ``RequestError`` for a malformed chunked body."""
    while True:
        try:
            piece = await request.content.read(READ_CHUNK_BYTES)
        except ConnectionError as e:
            # aiohttp keeps this exception on the request: without its traceback it holds no
            # frame (and so no buffer) of this request alive.
            e.__traceback__ = None
            raise ClientGone("the client closed the connection during the upload") from None
        except HttpProcessingError as e:
            e.__traceback__ = None
            raise RequestError(f"the request body is malformed: {one_line(str(e))}") from None
        if not piece:
            return
        yield piece


def json_cost(text: bytes) -> int:
    """An upper bound of the bytes ``json.loads(text)`` allocates (see JSON_TOKEN_BYTES)."""
    tokens = 1 + sum(text.count(c) for c in (b",", b"[", b"{", b":"))
    return min(JSON_TOKEN_BYTES * tokens, JSON_TEXT_FACTOR * len(text))


def _refuse_constant(name: str) -> Any:
    raise RequestError(f"{name} is not a JSON number; send finite numbers only")


def parse_json(text: bytes, what: str) -> dict[str, Any]:
    """``text`` as a JSON object, or ``RequestError`` saying why not (not JSON, not an object,
    NaN / Infinity, nested deeper than the parser goes)."""
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply; send a flat JSON object") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"{what} is not JSON: {one_line(str(e))}") from None
    if not isinstance(body, dict):
        raise RequestError(f"{what} must be a JSON object")
    return body
