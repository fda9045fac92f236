"""``multipart/form-data`` uploads to ``/v1/upscale`` (``curl -F file=@x.png``, HTML forms).

The body has been read whole under the request-byte budget, the upload timeouts and the
minimum rate, as a raw upload is; python-multipart splits it. Exactly one part must carry a
file (a ``filename`` in its Content-Disposition); other fields are ignored, since the options
travel in the query string. While the file part is copied out the budget holds it too, so
the budget counts both copies.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.core.errors import RequestError
from server.core.uploads import Hold

FORM = b"multipart/form-data"
ACCEPTS = (
    "send the image file itself as the body (curl --data-binary @photo.png) or one file part "
    "of multipart/form-data (curl -F file=@photo.png)"
)


def is_form(content_type: str) -> bool:
    return parse_options_header(content_type)[0] == FORM


class _Part:
    def __init__(self) -> None:
        self.disposition = b""
        self.data = bytearray()


def form_file(body: bytearray, content_type: str, hold: Hold) -> bytearray:
    """The bytes of the one file part of ``body``; ``body`` is emptied. RequestError if the
    form is malformed or does not carry exactly one file."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(f"multipart/form-data without a boundary parameter; {ACCEPTS}")
    hold.grow(len(body))  # the file part is copied out while the body is still held
    parts: list[_Part] = []
    field: list[bytes] = []

    def begin() -> None:
        parts.append(_Part())

    def header_field(data: bytes, start: int, end: int) -> None:
        field.append(bytes(data[start:end]).lower())

    def header_value(data: bytes, start: int, end: int) -> None:
        if field and b"".join(field) == b"content-disposition":
            parts[-1].disposition += bytes(data[start:end])

    def header_end() -> None:
        field.clear()

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1].data += chunk[start:end]

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise RequestError(f"malformed multipart/form-data ({e}); {ACCEPTS}") from None
    finally:
        body.clear()
    files = [p for p in parts if b"filename=" in p.disposition]
    if len(files) != 1:
        raise RequestError(
            f"multipart/form-data with {len(files)} file parts; send exactly one ({ACCEPTS})"
        )
    return files[0].data
