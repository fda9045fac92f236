"""/v1/upscale with multipart/form-data (what ``curl -F``, HTML forms and most HTTP libraries
send), under the same budget as a raw body; other bodies are told what the endpoint accepts."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.background import BackgroundServer
from tests.server.loopback import loopback_config

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def web(tiny_onnx_factory: Callable[[int], Path]) -> Iterator[BackgroundServer]:
    with BackgroundServer(loopback_config(tiny_onnx_factory(2), http_port=0)) as bg:
        yield bg


def url(server: BackgroundServer, query: str = "") -> str:
    assert server.running.http is not None
    return f"http://127.0.0.1:{server.running.http.port}/v1/upscale{query}"


def size_of(data: bytes) -> tuple[int, int]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return image.shape[1], image.shape[0]


def form_body(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, payload in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post(server: BackgroundServer, body: bytes, content_type: str, query: str = "") -> tuple:
    import http.client

    assert server.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
    try:
        connection.request(
            "POST", f"/v1/upscale{query}", body=body, headers={"Content-Type": content_type}
        )
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_curl_form_upload_is_upscaled(
    web: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = tmp_path / "out.png"
    image = set5_dir / "baby.png"
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-F", f"file=@{image}", "-o", str(out), url(web)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr + out.read_text(errors="replace")
    width, height = size_of(image.read_bytes())
    assert size_of(out.read_bytes()) == (2 * width, 2 * height)


def test_form_with_other_fields_and_the_query_options(
    web: BackgroundServer, set5_dir: Path
) -> None:
    png = cv2.imencode(".png", cv2.imread(str(set5_dir / "bird.png"))[:30, :40])[1].tobytes()
    body = form_body([("note", None, b"hello"), ("file", "bird.png", png)])
    status, answer = post(web, body, "multipart/form-data; boundary=b0undary", "?format=jpeg")
    assert status == 200 and answer[:2] == b"\xff\xd8" and size_of(answer) == (80, 60)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (form_body([("a", "a.png", b"x"), ("b", "b.png", b"y")]), "boundary=b0undary", "2 file"),
        (form_body([("note", None, b"hello")]), "boundary=b0undary", "0 file"),
        (b"--b0undary\r\ngarbage", "boundary=b0undary", "multipart"),
        (b"whatever", "", "without a boundary"),
    ],
)
def test_malformed_forms_are_400_with_what_is_accepted(
    web: BackgroundServer, body: bytes, content_type: str, message: str
) -> None:
    status, answer = post(web, body, f"multipart/form-data; {content_type}".rstrip("; "))
    assert status == 400 and message in answer.decode(), answer
    assert b"curl -F file=@photo.png" in answer


def test_a_body_that_is_not_an_image_says_what_the_endpoint_accepts(
    web: BackgroundServer,
) -> None:
    status, answer = post(web, b"---- not an image ----", "application/octet-stream")
    assert status == 400 and b"first bytes" in answer and b"--data-binary" in answer
