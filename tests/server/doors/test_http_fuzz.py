"""Property-based fuzzing of the HTTP door (as tests/server/doors/test_fuzz.py does for what gRPC
parses): random methods, routes, model names, query options (huge, tiny, non-finite,
non-ASCII), headers and bodies (images, random bytes, KServe JSON of random shapes and
values) against a real server on 127.0.0.1.

Property: every request is answered below 500, and the server logs no error and no traceback.
CI runs a bounded, derandomized number of examples; a long run is
``RDN_FUZZ_EXAMPLES=20000 pytest tests/server/doors/test_http_fuzz.py``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.background import BackgroundServer
from tests.server.doors.test_http_hostile import png
from tests.server.loopback import loopback_config

EXAMPLES = int(os.environ.get("RDN_FUZZ_EXAMPLES", "200"))
LONG_RUN = "RDN_FUZZ_EXAMPLES" in os.environ
pytestmark = [pytest.mark.timeout(0)] if LONG_RUN else []
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),  # one real request; a hang fails
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
CALL_TIMEOUT_S = 20.0
OPTIONS = ("model", "scale", "width", "height", "outscale", "format", "quality")
ROUTES = (
    "/",
    "/v1/models",
    "/v1/upscale",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/stats",
    "/v2/models/{m}",
    "/v2/models/{m}/ready",
    "/v2/models/{m}/config",
    "/v2/models/{m}/stats",
    "/v2/models/{m}/infer",
    "/v2/models/{m}/versions/{v}/infer",
    "/v2/repository/index",
)


class Recorder(logging.Handler):
    """Every record at WARNING or above, and every record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(f"{record.name} {record.levelname}: {record.getMessage()[:300]}")


@pytest.fixture(scope="module")
def door(tiny_onnx_x2: Path) -> Iterator[tuple[int, Recorder]]:
    recorder = Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        with BackgroundServer(loopback_config(tiny_onnx_x2, http_port=0)) as bg:
            assert bg.running is not None and bg.running.http is not None
            yield bg.running.http.port, recorder
    finally:
        root.removeHandler(recorder)


# ------------------------------------------------------------------------------ strategies

numbers_as_text = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e308", "-1e308", "1e-308", "5e-324", "nan", "inf", "-0", "0x10", "1_5"]),
    st.sampled_from(["\u0661", "\uff11", "\u00b2", "1.5\u200b", "", " ", "2 "]),
    st.text(max_size=12),
)
names = st.one_of(
    st.sampled_from(["rdn_x2", "rdn_x4", "", "..", "%00", "a" * 300]),
    st.text(max_size=40),
)
queries = st.dictionaries(
    st.sampled_from(OPTIONS) | st.text(max_size=8), numbers_as_text | names, max_size=4
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.one_of(
    st.lists(st.integers(-2, 6) | st.booleans() | st.floats(0, 4), min_size=0, max_size=5),
    json_values,
)


@st.composite
def tensors(draw: st.DrawFn) -> bytes:
    """A KServe JSON inference body: mostly well-formed, with any part replaced at random."""
    shape = draw(st.just([1, 3, 2, 2]) | shapes)
    data: Any = draw(
        st.lists(st.floats(0, 1, width=32), min_size=12, max_size=12)
        | st.lists(json_scalars | st.sampled_from([1e39, -1e39, 10**400]), max_size=14)
        | json_values
    )
    tensor = {"name": draw(st.just("lr") | names), "datatype": draw(st.just("FP32") | names)}
    tensor.update({"shape": shape, "data": data})
    if draw(st.booleans()):
        tensor["parameters"] = draw(json_values)
    body: dict[str, Any] = {"inputs": draw(st.just([tensor]) | json_values)}
    if draw(st.booleans()):
        body["id"] = draw(json_values)
    if draw(st.booleans()):
        body["outputs"] = draw(json_values)
    text = json.dumps(body)
    for token in draw(
        st.lists(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"]), max_size=2)
    ):
        text = text.replace("0.", f"{token}, 0.", 1)
    return text.encode()


bodies = st.one_of(
    st.none(),
    st.just(png()),
    st.binary(max_size=256),
    tensors(),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"ready": true}', b"{}", b"null", b"\xff\xfe"]),
)
header_values = st.one_of(
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=30),
    numbers_as_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
).map(lambda b: b.translate(None, b"\r\n\0"))  # http.client refuses line breaks in a value
headers = st.dictionaries(
    st.sampled_from(
        [
            "X-Request-Id",
            "Content-Encoding",
            "Inference-Header-Content-Length",
            "Content-Type",
            "Authorization",
            "Accept",
        ]
    ),
    header_values,
    max_size=3,
)


def segment(text: str) -> str:
    """``text`` as one percent-encoded path segment (lone surrogates kept as their bytes)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def send(
    port: int, method: str, path: str, body: bytes | None, head: dict[str, bytes]
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in head.items():
            connection.putheader(name, value.strip(b" \t"))
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH"]),
    route=st.sampled_from(ROUTES),
    model=names,
    version=names,
    query=queries,
    head=headers,
    body=bodies,
)
@example(
    method="POST", route="/v1/upscale", model="", version="", query={"outscale": "1e308"},
    head={}, body=png(),
)  # fmt: skip
@example(
    method="POST", route="/v1/upscale", model="", version="", query={},
    head={"X-Request-Id": b"\xff\xfe"}, body=png(),
)  # fmt: skip
@example(
    method="POST", route="/v2/models/{m}/infer", model="rdn_x2", version="", query={}, head={},
    body=b'{"inputs": [{"name": "lr", "datatype": "FP32", "shape": [true, 3, true, true], '
    b'"data": [0, 0, 0]}]}',
)  # fmt: skip
def test_http_requests_are_never_answered_5xx_nor_logged_as_errors(
    door: tuple[int, Recorder],
    method: str,
    route: str,
    model: str,
    version: str,
    query: dict[str, str],
    head: dict[str, bytes],
    body: bytes | None,
) -> None:
    port, recorder = door
    path = route.replace("{m}", segment(model)).replace("{v}", segment(version))
    encoded = urlencode(query, encoding="utf-8", errors="surrogatepass")
    status, answer = send(port, method, f"{path}?{encoded}" if encoded else path, body, head)
    assert status < 500, (status, answer[:300])
    assert recorder.bad == [], recorder.bad
