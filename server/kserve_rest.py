"""KServe v2 REST inference bodies: the JSON header (and binary data after it) of
``POST /v2/models/{m}/infer`` checked and parsed, and the answer written. Pure functions.

The JSON part is capped at JSON_TENSOR_BYTES whatever the headers say, and only standard JSON
goes either way: NaN and Infinity are refused on input (and the tensor's values must be finite),
and answers are written with ``allow_nan=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from server.errors import RequestError, RequestTooLarge
from server.http_body import one_line
from server.kserve import (
    DATATYPE,
    FLOAT32_LE,
    INPUT_NAME,
    MODEL_VERSION,
    OUTPUT_NAME,
    UNSUPPORTED_PARAMETERS,
)

# JSON numbers cost many times their text once parsed (server/http_body.py): larger tensors
# travel as binary data.
JSON_TENSOR_BYTES = 8 * 2**20
JSON_BYTES_PER_VALUE = 20  # a float32 written by json.dumps, with its separator
HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe's binary tensor data extension


def shown(value: object) -> str:
    """A client's JSON value quoted in an error: scalars as they are (cut short), containers
    by their type only (their repr could be huge or nested past the recursion limit)."""
    if value is None or isinstance(value, bool | int | float | str):
        return one_line(repr(value), 80)
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def _whole(value: object) -> bool:
    """A JSON integer (not a boolean, which Python counts as an int)."""
    return type(value) is int


def header_length(text: str | None, body_bytes: int) -> int:
    """The byte length of the JSON header that starts an inference body of ``body_bytes``:
    ``Inference-Header-Content-Length`` when sent, else the whole body; ``RequestTooLarge``
    over JSON_TENSOR_BYTES either way."""
    if text is None:
        split = body_bytes
    else:
        digits = text.strip()
        valid = digits.isascii() and digits.isdigit() and len(digits) <= 18
        split = int(digits) if valid else -1
        if not 0 <= split <= body_bytes:
            raise RequestError(
                f"{HEADER_LENGTH}: {one_line(text, 40)!r} must be the byte length of the JSON "
                f"header that starts the body (the body has {body_bytes} bytes)"
            )
    if split > JSON_TENSOR_BYTES:
        raise RequestTooLarge(
            f"the JSON part of the inference request is {split} bytes, over {JSON_TENSOR_BYTES}; "
            f"send the tensor as binary data ({HEADER_LENGTH}, binary_data_size)"
        )
    return split


def infer_request_id(body: dict[str, Any]) -> str:
    """The request's ``id``: a string, or "" when absent."""
    value = body.get("id", "")
    if not isinstance(value, str):
        raise RequestError(f"id {shown(value)} must be a string")
    return value


def infer_answer(
    model: str, request_id: str, canvas: np.ndarray, binary: bool
) -> tuple[bytes, bytes]:
    """Worker thread: the JSON header of an inference answer and its binary output (empty
    when the output travels as JSON numbers in the header)."""
    output: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "datatype": DATATYPE,
        "shape": list(canvas.shape),
    }
    answer: dict[str, Any] = {
        "model_name": model,
        "model_version": MODEL_VERSION,
        "outputs": [output],
    }
    if request_id:
        answer["id"] = request_id
    if not binary:
        output["data"] = canvas.ravel().tolist()
        return json.dumps(answer, allow_nan=False).encode(), b""
    raw = canvas.astype(FLOAT32_LE, copy=False).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    return json.dumps(answer, allow_nan=False).encode(), raw


def _parameters(holder: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``parameters`` object of ``holder``, checked: an object, without the ones this
    server refuses (shared memory, classification), as gRPC ModelInfer refuses them."""
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}: parameters must be a JSON object")
    for key in parameters:
        if key in UNSUPPORTED_PARAMETERS:
            raise RequestError(
                f"{where} sets parameter {key!r}, which this server does not support (no shared "
                "memory, no classification); send the tensor data in the request"
            )
    return parameters


def wants_binary(body: dict[str, Any]) -> bool:
    """The binary data extension: the output requested with ``binary_data``, or
    ``binary_data_output`` on the request."""
    binary = bool(_parameters(body, "the request").get("binary_data_output"))
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list):
        raise RequestError("outputs must be a list")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT_NAME:
            name = output.get("name") if isinstance(output, dict) else output
            raise RequestError(
                f"unknown output {shown(name)}; the model has one output {OUTPUT_NAME!r}"
            )
        binary = binary or bool(_parameters(output, f"output {OUTPUT_NAME!r}").get("binary_data"))
    return binary


def _finite(array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise RequestError(
            f"input {INPUT_NAME!r} holds NaN or infinite values (or numbers beyond float32); "
            "send finite RGB values in [0, 1]"
        )
    return array


def parse_infer_input(
    body: dict[str, Any], rest: memoryview
) -> tuple[tuple[int, int, int, int], Callable[[], np.ndarray]]:
    """The checked [N, 3, H, W] shape of the request's one input and a loader of its data
    (JSON numbers, or the binary bytes after the header)."""
    inputs = body.get("inputs")
    accepted = f"one input {INPUT_NAME!r} {DATATYPE} [N, 3, H, W] (RGB planes in [0, 1])"
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f"the request must carry {accepted}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME or tensor.get("datatype") != DATATYPE:
        raise RequestError(
            f"input {shown(tensor.get('name'))} {shown(tensor.get('datatype'))}: expected "
            f"{accepted}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(_whole(d) and d >= 1 for d in shape)
        or shape[1] != 3
    ):
        given = (
            f"[{', '.join(shown(d) for d in shape)}]" if isinstance(shape, list) else shown(shape)
        )
        raise RequestError(
            f"input shape {one_line(given, 120)}: expected [N, 3, H, W], whole numbers with "
            "N, H, W >= 1"
        )
    n, _, h, w = shape
    count = n * 3 * h * w
    size = _parameters(tensor, f"input {INPUT_NAME!r}").get("binary_data_size")
    if size is not None:
        if not _whole(size) or size != count * FLOAT32_LE.itemsize or len(rest) != size:
            raise RequestError(
                f"binary_data_size {shown(size)} with {len(rest)} bytes after the header: the "
                f"input {shape} {DATATYPE} needs exactly {count * FLOAT32_LE.itemsize} bytes"
            )

        def from_binary() -> np.ndarray:
            array = np.frombuffer(rest, FLOAT32_LE).astype(np.float32, copy=False)
            return _finite(array.reshape(n, 3, h, w))

        return (n, 3, h, w), from_binary
    values = tensor.get("data")
    if not isinstance(values, list):
        raise RequestError(f"input {INPUT_NAME!r} carries no data: send `data` or binary data")

    def from_json() -> np.ndarray:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                array = np.asarray(values, np.float32)
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise RequestError(f"input data is not a list of numbers: {one_line(str(e))}") from None
        if array.size != count:
            raise RequestError(f"input data holds {array.size} values; shape {shape} needs {count}")
        return _finite(array.reshape(n, 3, h, w))

    return (n, 3, h, w), from_json
