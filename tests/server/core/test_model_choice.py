"""model=auto through a real server (127.0.0.1): a request that names only a scale (or
nothing) gets its scale's clean model or photo model by what the input shows, on every door
(rdn.v1 Upscale and UpscaleStream, HTTP), says which and why (response field, X-Model-Reason,
access log), and a request that names a model keeps exactly that model. The local API makes the
same choice with the shipped models."""

from __future__ import annotations

import http.client
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from server.client import SizeOptions, UpscaleClient
from server.local import LocalUpscaler
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.core.test_repository import named_copy
from tests.server.imaging.test_input_kind import noisy, scene
from tests.server.loopback import NO_RETRY, loopback_config

TIMEOUT_S = 60.0
SIDE = 128


def _encode(rgb: np.ndarray, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **save)
    return buffer.getvalue()


def _resaved(data: bytes) -> bytes:
    """A JPEG decoded and saved again as PNG: its 8x8 blocks remain, its tables are gone."""
    return _encode(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), "PNG")


INPUTS: dict[str, tuple[Callable[[], bytes], str, str]] = {
    # kind: (the file, the model auto must choose, a part of the reason)
    "clean png": (lambda: _encode(scene(SIDE), "PNG"), "rdn_x2", "clean"),
    "jpeg 50": (lambda: _encode(scene(SIDE), "JPEG", quality=50), "rdn_x2_photo", "quality 50"),
    "jpeg 95": (lambda: _encode(scene(SIDE), "JPEG", quality=95), "rdn_x2", "clean"),
    "noise 12 png": (lambda: _encode(noisy(scene(SIDE), 12), "PNG"), "rdn_x2_photo", "noise"),
    "jpeg 50 as png": (
        lambda: _resaved(_encode(scene(SIDE), "JPEG", quality=50)),
        "rdn_x2_photo",
        "block",
    ),
}


@pytest.fixture(scope="module")
def server(
    tiny_onnx_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    folder = tmp_path_factory.mktemp("auto")
    named_copy(tiny_onnx_factory(2), folder, "rdn_x2")
    named_copy(tiny_onnx_factory(2), folder, "rdn_x2_photo")
    named_copy(tiny_onnx_factory(4), folder, "rdn_x4")
    with BackgroundServer(loopback_config(None, model_dir=folder, http_port=0)) as bg:
        yield bg


def _upscale(bg: BackgroundServer, data: bytes, **fields: object) -> upscale_pb2.UpscaleResponse:
    with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
        request = upscale_pb2.UpscaleRequest(encoded=data, **fields)
        return upscale_pb2_grpc.UpscalerStub(channel).Upscale(request, timeout=TIMEOUT_S)


def _http(bg: BackgroundServer, data: bytes, query: str) -> dict[str, str]:
    assert bg.running is not None and bg.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", bg.running.http.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", f"/v1/upscale?{query}", body=data, headers={"Host": "localhost"})
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200
        return dict(answer.getheaders())
    finally:
        connection.close()


@pytest.mark.parametrize("kind", list(INPUTS))
def test_auto_chooses_by_the_input_on_every_door(
    server: BackgroundServer, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, expected, because = INPUTS[kind]
    data = make()
    caplog.set_level(logging.INFO, logger="rdn.access")
    by_scale = _upscale(server, data, scale=2, request_id=f"auto-{kind}")
    by_word = _upscale(server, data, model="auto")
    assert (by_scale.model, by_word.model) == (expected, expected), by_scale.model_reason
    assert because in by_scale.model_reason and by_word.model_reason == by_scale.model_reason
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client:
        streamed = client.upscale(data, stream=True, options=SizeOptions(scale=2))
    assert (streamed.model, streamed.model_reason) == (expected, by_scale.model_reason)
    headers = _http(server, data, "scale=2")
    assert (headers["X-Model"], headers["X-Model-Reason"]) == (expected, by_scale.model_reason)
    logged = [
        r.fields
        for r in caplog.records
        if getattr(r, "fields", {}).get("request_id") == f"auto-{kind}"
    ]
    assert logged and logged[0]["model_reason"] == by_scale.model_reason


def test_a_named_model_is_kept_whatever_the_input(server: BackgroundServer) -> None:
    jpeg = _encode(scene(SIDE), "JPEG", quality=50)
    named = _upscale(server, jpeg, model="rdn_x2")
    assert (named.model, named.model_reason) == ("rdn_x2", "named in the request")
    photo = _upscale(server, _encode(scene(SIDE), "PNG"), model="rdn_x2_photo")
    assert (photo.model, photo.model_reason) == ("rdn_x2_photo", "named in the request")


def test_a_scale_without_a_photo_model_keeps_its_default(server: BackgroundServer) -> None:
    answer = _upscale(server, _encode(scene(SIDE), "JPEG", quality=50), scale=4)
    assert answer.model == "rdn_x4" and "no photo model" in answer.model_reason


def test_raw_pixels_are_measured_without_a_file(server: BackgroundServer) -> None:
    rgb = noisy(scene(SIDE), 12)
    raw = upscale_pb2.RawImage(
        data=rgb.tobytes(), shape=upscale_pb2.ImageShape(height=SIDE, width=SIDE, channels=3)
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = upscale_pb2_grpc.UpscalerStub(channel).Upscale(
            upscale_pb2.UpscaleRequest(raw=raw, scale=2), timeout=TIMEOUT_S
        )
    assert answer.model == "rdn_x2_photo" and "noise" in answer.model_reason


def test_the_local_api_chooses_as_the_server_does_with_the_shipped_models() -> None:
    upscaler = LocalUpscaler("auto", scale=2)
    jpeg = upscaler.upscale_bytes(_encode(scene(48), "JPEG", quality=50))
    clean = upscaler.upscale_bytes(_encode(scene(48), "PNG"))
    assert jpeg.model.startswith("rdn_x2_photo") and "quality 50" in jpeg.model_reason
    assert (clean.model, clean.model_reason) == ("rdn_x2", "clean")
    named = LocalUpscaler("rdn_x2").upscale_bytes(_encode(scene(48), "JPEG", quality=50))
    assert (named.model, named.model_reason) == ("rdn_x2", "named in the request")


def test_an_rgba_avif_goes_through_the_model_with_its_alpha(server: BackgroundServer) -> None:
    """AVIF's header is not read for alpha: its tiles are reserved as if it had one."""
    rgba = np.dstack([scene(SIDE), np.full((SIDE, SIDE), 200, np.uint8)])
    answer = _upscale(server, _encode(rgba, "AVIF", quality=90), scale=2)
    assert (answer.width, answer.height, answer.channels) == (2 * SIDE, 2 * SIDE, 4)


def test_a_long_thin_strip_is_measured_without_failing(server: BackgroundServer) -> None:
    strip = np.ascontiguousarray(np.tile(scene(16), (1, 256, 1)))  # 16 x 4096
    answer = _upscale(server, _encode(strip, "PNG"), scale=2)
    assert answer.model in ("rdn_x2", "rdn_x2_photo") and answer.model_reason


def test_an_int8_photo_model_alone_is_the_photo_model(
    tiny_onnx_factory: Callable[[int], Path], tmp_path: Path
) -> None:
    named_copy(tiny_onnx_factory(2), tmp_path, "rdn_x2")
    named_copy(tiny_onnx_factory(2), tmp_path, "rdn_x2_photo_int8")
    with BackgroundServer(loopback_config(None, model_dir=tmp_path)) as bg:
        answer = _upscale(bg, _encode(scene(SIDE), "JPEG", quality=50), scale=2)
    assert answer.model == "rdn_x2_photo_int8" and "quality 50" in answer.model_reason
