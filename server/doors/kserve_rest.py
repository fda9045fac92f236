"""KServe v2 REST inference bodies: the JSON header (and binary data after it) of
``POST /v2/models/{m}/infer`` read into the protocol's plain values (``server.core.kserve_rules``
checks them, as it checks gRPC's), its data loaded, and the answer written. Pure functions.

The JSON part is capped at JSON_TENSOR_BYTES whatever the headers say, and only standard JSON
goes either way: NaN and Infinity are refused on input (and the tensor's values must be finite),
and answers are written with ``allow_nan=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from server.core.errors import RequestError, RequestTooLarge
from server.core.kserve_rules import (
    DATATYPE,
    FLOAT32_LE,
    INPUT_NAME,
    MODEL_VERSION,
    OUTPUT_NAME,
    InferCall,
    Shape,
    TensorIn,
    TensorOut,
    check_infer,
    shown,
)
from server.doors.http_body import one_line

# JSON numbers cost many times their text once parsed (server/doors/http_body.py): larger tensors
# travel as binary data.
JSON_TENSOR_BYTES = 8 * 2**20
JSON_BYTES_PER_VALUE = 20  # a float32 written by json.dumps, with its separator
HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe's binary tensor data extension


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


def _parameters(holder: object, where: str) -> dict[str, Any]:
    """The ``parameters`` object of a JSON object (the protocol's rules check its names)."""
    parameters = (holder.get("parameters") if isinstance(holder, dict) else None) or {}
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}: parameters must be a JSON object")
    return parameters


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key) or []
    if not isinstance(value, list):
        raise RequestError(f"{key} must be a list")
    return value


def infer_call(body: dict[str, Any]) -> InferCall:
    """The request's inputs and outputs as the protocol's rules read them."""
    inputs = []
    for tensor in _list(body, "inputs"):
        if not isinstance(tensor, dict):
            raise RequestError(f"inputs must be a list of JSON objects, not of {shown(tensor)}")
        inputs.append(
            TensorIn(
                tensor.get("name"),
                tensor.get("datatype"),
                tensor.get("shape"),
                list(_parameters(tensor, f"input {shown(tensor.get('name'))}")),
            )
        )
    outputs = []
    for output in _list(body, "outputs"):
        name = output.get("name") if isinstance(output, dict) else output
        outputs.append(TensorOut(name, list(_parameters(output, f"output {shown(name)}"))))
    return InferCall(inputs, outputs)


def wants_binary(body: dict[str, Any]) -> bool:
    """The binary data extension: the output requested with ``binary_data``, or
    ``binary_data_output`` on the request (outputs already checked by ``check_infer``)."""
    binary = bool(_parameters(body, "the request").get("binary_data_output"))
    for output in _list(body, "outputs"):
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
) -> tuple[Shape, Callable[[], np.ndarray]]:
    """The checked [N, 3, H, W] shape of the request's one input and a loader of its data
    (JSON numbers, or the binary bytes after the header)."""
    shape = check_infer(infer_call(body))
    tensor = body["inputs"][0]
    n, _, h, w = shape
    count = n * 3 * h * w
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not _whole(size) or size != count * FLOAT32_LE.itemsize or len(rest) != size:
            raise RequestError(
                f"binary_data_size {shown(size)} with {len(rest)} bytes after the header: the "
                f"input {list(shape)} {DATATYPE} needs exactly {count * FLOAT32_LE.itemsize} bytes"
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
            raise RequestError(
                f"input data holds {array.size} values; shape {list(shape)} needs {count}"
            )
        return _finite(array.reshape(n, 3, h, w))

    return (n, 3, h, w), from_json
