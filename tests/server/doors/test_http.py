"""The HTTP front door on a real server (127.0.0.1): /v1/upscale, KServe v2 REST through
tritonclient.http, errors, auth, metrics, and the page in a real headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from PIL import ImageCms

from server.config import LimitsConfig, MetricsConfig, SecurityConfig, UploadConfig
from server.core.batch_types import QueueFull
from server.core.errors import NotServing, RequestTooLarge
from server.doors.cross_site import EXPOSE_HEADERS
from server.doors.http import http_status
from server.imaging.metadata import png_with_metadata
from server.pb.inference import grpc_service_pb2 as kpb
from server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.background import BackgroundServer
from tests.server.browser import chromium_driver, drive_page, tour_page
from tests.server.imaging.files import png16, read_back, swapped_profile
from tests.server.loopback import loopback_config
from tests.server.triton_driver import HTTP_SCRIPT, tritonclient
from tests.tritonclient_env import tritonclient_python

CALL_TIMEOUT = 60.0
TOKEN = "http-door-secret-0123456789"


@pytest.fixture(scope="module")
def web(tiny_onnx_factory: Callable[[int], Path]) -> Iterator[BackgroundServer]:
    config = loopback_config(
        tiny_onnx_factory(2),
        models=(tiny_onnx_factory(4),),
        http_port=0,
        metrics=MetricsConfig(port=0),
    )
    with BackgroundServer(config) as bg:
        yield bg


def call(
    server: BackgroundServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    assert server.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def png(set5_dir: Path, width: int, height: int) -> bytes:
    image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:height, :width]
    return cv2.imencode(".png", image)[1].tobytes()


def size_of(data: bytes) -> tuple[int, int]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return image.shape[1], image.shape[0]


# ---------------------------------------------------------------------------- /v1/upscale


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_upscale_answers_the_image_with_its_content_type(
    web: BackgroundServer, set5_dir: Path, method: str
) -> None:
    status, headers, body = call(
        web, method, "/v1/upscale?format=webp&width=100", png(set5_dir, 60, 40)
    )
    assert status == 200, body
    assert headers["Content-Type"] == "image/webp" and body[8:12] == b"WEBP"
    assert size_of(body) == (100, 67)
    assert (headers["X-Model"], headers["X-Width"], headers["X-Height"]) == ("rdn_x2", "100", "67")


def test_upscale_with_scale_and_model(web: BackgroundServer, set5_dir: Path) -> None:
    data = png(set5_dir, 30, 20)
    status, headers, body = call(web, "POST", "/v1/upscale?scale=4", data)
    assert (status, headers["Content-Type"], size_of(body)) == (200, "image/png", (120, 80))
    status, headers, body = call(web, "POST", "/v1/upscale?model=rdn_x2&outscale=1.5", data)
    assert (status, headers["X-Model"], size_of(body)) == (200, "rdn_x2", (45, 30))


def deep_png(set5_dir: Path) -> tuple[bytes, bytes]:
    """(a 16-bit PNG with a non-sRGB profile, the profile)."""
    rgb = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:48, :64, ::-1]
    icc = swapped_profile()
    return png_with_metadata(png16(rgb.astype(np.uint16) * 257 + 5), icc, None, None), icc


def test_upscale_says_the_inputs_profile_bits_and_frames(
    web: BackgroundServer, set5_dir: Path
) -> None:
    data, icc = deep_png(set5_dir)
    status, headers, body = call(web, "POST", "/v1/upscale", data)
    assert status == 200, body
    description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    assert headers["X-Source-Profile"] == description.strip() and description.strip()
    assert (headers["X-Source-Bits"], headers["X-Frames"]) == ("16", "1")
    pixels, info, _ = read_back(body)
    assert pixels.dtype == np.uint16 and info.get("icc_profile") == icc  # what the page saves
    status, headers, _ = call(web, "POST", "/v1/upscale", png(set5_dir, 30, 20))
    assert (headers["X-Source-Profile"], headers["X-Source-Bits"]) == ("none", "8")
    for name in ("X-Source-Profile", "X-Source-Bits", "X-Frames", "X-Notes"):
        assert name in EXPOSE_HEADERS  # a page of another origin (--http-cors-origin) reads it


def test_http_and_grpc_answers_are_the_same_pixels(web: BackgroundServer, set5_dir: Path) -> None:
    from server.client import UpscaleClient

    data = png(set5_dir, 50, 30)
    _, _, body = call(web, "POST", "/v1/upscale", data)
    with UpscaleClient(f"127.0.0.1:{web.port}") as client:
        assert client.upscale(data, timeout=CALL_TIMEOUT).image == body


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/upscale", b"not an image", 400, "image data is not"),
        ("/v1/upscale", b"", 400, "the body is empty"),
        ("/v1/upscale?outscale=9", None, 400, "each axis must lie in [1, 4]"),
        ("/v1/upscale?model=nope", None, 404, "unknown model 'nope'"),
        ("/v1/upscale?format=bmp", None, 400, "choose png, jpeg, webp, avif, gif or tiff"),
        ("/v1/upscale?width=abc", None, 400, "must be a whole number"),
        ("/v1/upscale?width=%C2%B2", None, 400, "must be a whole number"),
        ("/v1/upscale?width=10&outscale=2", None, 400, "at most one sizing option"),
        ("/v2/models/nope", None, 404, "unknown model 'nope'"),
        ("/no/such/path", None, 404, "Not Found"),
    ],
)
def test_errors_are_json_with_the_matching_status(
    web: BackgroundServer, set5_dir: Path, path: str, body: bytes | None, status: int, fragment: str
) -> None:
    data = png(set5_dir, 20, 20) if body is None else body
    method = "GET" if path.startswith(("/v2/models", "/no")) else "POST"
    got, headers, answer = call(web, method, path, data if method == "POST" else None)
    assert got == status, answer
    assert headers["Content-Type"].startswith("application/json")
    assert fragment in json.loads(answer)["error"]


def test_a_body_over_the_request_limit_is_413_before_it_is_read(
    tiny_onnx_x2: Path, set5_dir: Path
) -> None:
    config = loopback_config(tiny_onnx_x2, http_port=0, limits=LimitsConfig(max_request_bytes=1000))
    data = png(set5_dir, 60, 60)
    with BackgroundServer(config) as bg:
        announced = call(bg, "POST", "/v1/upscale", data)
        connection = http.client.HTTPConnection("127.0.0.1", bg.running.http.port, timeout=30)
        connection.request("POST", "/v1/upscale", body=iter([data[:600], data[600:]]),
                           encode_chunked=True)  # fmt: skip
        chunked = connection.getresponse()
        chunked_body = chunked.read()
        connection.close()
        held = bg.running.uploads.held_bytes
    assert announced[0] == 413
    assert "over the limit of 1000 bytes" in json.loads(announced[2])["error"]
    assert chunked.status == 413 and "over the limit of 1000" in json.loads(chunked_body)["error"]
    assert held == 0


def test_a_stalled_upload_times_out_and_frees_its_bytes(tiny_onnx_x2: Path, set5_dir: Path) -> None:
    config = loopback_config(
        tiny_onnx_x2, http_port=0, uploads=UploadConfig(idle_timeout_s=0.5, deadline_s=5)
    )
    with BackgroundServer(config) as bg:
        connection = http.client.HTTPConnection("127.0.0.1", bg.running.http.port, timeout=30)
        connection.putrequest("POST", "/v1/upscale")
        connection.putheader("Content-Length", "5000")
        connection.endheaders(b"\x89PNG")  # 4 of 5000 bytes, then silence
        answer = connection.getresponse()
        body = json.loads(answer.read())
        connection.close()
        held, uploads = bg.running.uploads.held_bytes, bg.running.uploads.uploads
    assert answer.status == 408 and "--upload-idle-timeout" in body["error"]
    assert (held, uploads) == (0, 0)


def lr_input(side: int = 2, **extra: Any) -> dict[str, Any]:
    """One KServe JSON input tensor named lr, zeros, [1, 3, side, side], plus ``extra``."""
    shape = [1, 3, side, side]
    return {
        "name": "lr",
        "datatype": "FP32",
        "shape": shape,
        "data": [0] * (3 * side * side),
        **extra,
    }


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"inputs": [lr_input(parameters="x")]}, "parameters must be a JSON object"),
        (
            {"inputs": [lr_input(parameters={"shared_memory_region": "r"})]},
            "does not support",
        ),
        ({"inputs": [lr_input(200)]}, "request it as binary data"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 2, 2]}]}, "expected one"),
        ({"inputs": [lr_input()], "outputs": [{"name": "y"}]}, "unknown output"),
    ],
)
def test_bad_inference_requests_are_400_or_413(
    web: BackgroundServer, body: dict[str, Any], fragment: str
) -> None:
    status, _, answer = call(web, "POST", "/v2/models/rdn_x2/infer", json.dumps(body).encode())
    assert status in (400, 413) and fragment in json.loads(answer)["error"], answer


def test_statuses_map_like_grpc() -> None:
    assert http_status(QueueFull("queue full"))[0::2] == (429, {"Retry-After": "1"})
    assert http_status(RequestTooLarge("too big"))[0] == 413
    assert http_status(NotServing("draining"))[0] == 503
    assert http_status(RuntimeError("boom"))[:2] == (
        500, "internal error; the server logged the details",
    )  # fmt: skip


def test_health_probes_and_kubernetes_readiness(web: BackgroundServer) -> None:
    assert call(web, "GET", "/v2/health/live")[0] == 200
    status, _, body = call(web, "GET", "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    status, _, body = call(web, "GET", "/v1/models")
    names = [m["name"] for m in json.loads(body)["models"]]
    assert (status, names) == (200, ["rdn_x2", "rdn_x4"])


def test_token_guards_everything_but_probes_and_the_page(
    tiny_onnx_x2: Path, set5_dir: Path
) -> None:
    config = loopback_config(tiny_onnx_x2, http_port=0, security=SecurityConfig(auth_token=TOKEN))
    with BackgroundServer(config) as bg:
        refused = call(bg, "POST", "/v1/upscale", png(set5_dir, 20, 20))
        wrong = call(
            bg, "POST", "/v1/upscale", png(set5_dir, 20, 20), {"Authorization": "Bearer x"}
        )
        allowed = call(
            bg, "POST", "/v1/upscale", png(set5_dir, 20, 20), {"Authorization": f"Bearer {TOKEN}"}
        )
        probe = call(bg, "GET", "/v2/health/ready")
        page = call(bg, "GET", "/")
    assert (refused[0], json.loads(refused[2])["error"]) == (401, "missing bearer token")
    assert refused[1]["WWW-Authenticate"] == "Bearer"
    assert (wrong[0], json.loads(wrong[2])["error"]) == (401, "invalid bearer token")
    assert allowed[0] == 200 and size_of(allowed[2]) == (40, 40)
    assert probe[0] == 200 and page[0] == 200


def test_http_calls_are_logged_and_counted_with_a_protocol_label(
    web: BackgroundServer, set5_dir: Path
) -> None:
    metrics = web.running.metrics
    assert metrics is not None
    labels = {"protocol": "http", "method": "HTTP POST /v1/upscale", "code": "OK"}
    before = metrics.registry.get_sample_value("rdn_requests_total", labels) or 0.0
    assert call(web, "POST", "/v1/upscale", png(set5_dir, 20, 20))[0] == 200
    deadline = time.monotonic() + 10
    while (metrics.registry.get_sample_value("rdn_requests_total", labels) or 0) == before:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert metrics.registry.get_sample_value("rdn_requests_total", labels) == before + 1


# -------------------------------------------------------------------- tritonclient.http


@pytest.fixture(scope="session")
def triton_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python interpreter that imports tritonclient.http."""
    return tritonclient_python(request.config, tmp_path_factory)


def http_client(python: str, port: int, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return tritonclient(python, port, actions, HTTP_SCRIPT)


def test_tritonclient_http_infers_and_manages_the_repository(
    web: BackgroundServer, triton_python: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 12, 10), dtype=np.float32)
    np.save(tmp_path / "in.npy", images)
    actions = [
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "model": "rdn_x4"},
        {"op": "server_metadata"},
        {"op": "model_metadata", "model": "rdn_x4"},
        {"op": "infer", "model": "rdn_x4", "npy": str(tmp_path / "in.npy"), "binary": True,
         "out": str(tmp_path / "binary.npy")},
        {"op": "infer", "model": "rdn_x4", "npy": str(tmp_path / "in.npy"), "binary": False,
         "out": str(tmp_path / "json.npy")},
        {"op": "repository_index"},
        {"op": "model_config", "model": "rdn_x2"},
        {"op": "statistics", "model": "rdn_x4"},
        {"op": "infer", "model": "nope", "npy": str(tmp_path / "in.npy"), "binary": True,
         "out": str(tmp_path / "never.npy")},
    ]  # fmt: skip
    results = http_client(triton_python, web.running.http.port, actions)  # type: ignore[union-attr]
    values = [r.get("value") for r in results]
    assert values[:3] == [True, True, True]
    assert values[3]["extensions"] == ["model_repository", "model_configuration", "statistics"]
    assert values[4]["inputs"][0]["shape"] == [-1, 3, -1, -1]
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        request = kpb.ModelInferRequest(model_name="rdn_x4")
        request.inputs.add(name="lr", datatype="FP32", shape=list(images.shape))
        request.raw_input_contents.append(images.astype("<f4").tobytes())
        answer = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    expected = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 3, 48, 40)
    assert np.array_equal(np.load(tmp_path / "binary.npy"), expected)
    assert np.array_equal(np.load(tmp_path / "json.npy"), expected)
    assert [m["name"] for m in values[7]] == ["rdn_x2", "rdn_x4"]
    assert values[8]["name"] == "rdn_x2" and values[8]["platform"] == "onnxruntime_onnx"
    assert int(values[9]["model_stats"][0]["inference_count"]) >= 4
    assert "unknown model 'nope'" in results[10]["error"]["message"]


def test_tritonclient_http_unloads_and_reloads(
    tiny_onnx_factory: Callable[[int], Path], triton_python: str, tmp_path: Path
) -> None:
    shutil.copy(tiny_onnx_factory(2), tmp_path / "x2.onnx")
    shutil.copy(tiny_onnx_factory(4), tmp_path / "x4.onnx")
    config = loopback_config(None, model_dir=tmp_path, http_port=0)
    with BackgroundServer(config) as bg:
        actions = [
            {"op": "unload", "model": "rdn_x4"},
            {"op": "model_ready", "model": "rdn_x4"},
            {"op": "load", "model": "rdn_x4"},
            {"op": "model_ready", "model": "rdn_x4"},
        ]
        results = http_client(triton_python, bg.running.http.port, actions)  # type: ignore[union-attr]
        version = bg.running.repository.snapshot.models["rdn_x4"].version
    assert [r.get("value") for r in results] == [True, False, True, True]
    assert version == 2


# ------------------------------------------------------------------------ the page


@pytest.mark.skipif(
    chromium_driver() is None,
    reason="no Chromium: install Debian's chromium and chromium-driver (make install does)",
)
def test_page_upscales_an_image_in_a_real_browser(
    web: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "bird.png"
    image = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:96, :128]
    cv2.imwrite(str(source), image)
    shot = tmp_path / "page.png"
    page = drive_page(web.running.http.port, source, shot, models=2)  # type: ignore[union-attr]
    assert page.result == "256x192" and page.status == "done"
    assert "rdn_x2" in page.facts and "256 x 192" in page.facts
    assert "none (sRGB assumed)" in page.facts and "8 bits per sample" in page.facts
    assert "1 (still image)" in page.facts and page.download == "bird_x2.png"
    assert page.console_errors == []
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(
    chromium_driver() is None,
    reason="no Chromium: install Debian's chromium and chromium-driver (make install does)",
)
def test_page_sizes_zooms_names_and_clears_its_result(
    web: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "bird.png"
    cv2.imwrite(str(source), cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:96, :128])
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"these are notes, not a picture\n" * 4)
    tour = tour_page(web.running.http.port, source, not_image, models=2, width=200)  # type: ignore[union-attr]
    assert not tour.label_on_empty_page  # the "before | after" label waits for a result
    assert (tour.sized_result, tour.sized_download) == ("200x150", "bird_200x150.png")
    assert (tour.result, tour.download) == ("256x192", "bird_x2.png")
    assert tour.shown_width == 256 and tour.zoom_text == "100%"  # its real size, not shrunk
    view_width, view_height = tour.view_size
    assert tour.fit_width <= view_width + 1 and tour.fit_height <= view_height + 1
    assert max(tour.fit_width - view_width, tour.fit_height - view_height) > -2  # fills one side
    assert tour.zoomed_in_width > tour.fit_width
    assert tour.error_status_class == "error" and tour.error_status.startswith("400")
    assert not tour.result_after_error and not tour.label_after_error
    assert tour.console_errors == [] or all("400" in str(e["message"]) for e in tour.console_errors)


@pytest.mark.skipif(
    chromium_driver() is None,
    reason="no Chromium: install Debian's chromium and chromium-driver (make install does)",
)
def test_page_shows_the_inputs_profile_and_depth_and_saves_the_answer_as_it_came(
    web: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    data, icc = deep_png(set5_dir)
    source = tmp_path / "deep.png"
    source.write_bytes(data)
    description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    port = web.running.http.port  # type: ignore[union-attr]
    for fmt, name in (("png", "deep_x2.png"), ("tiff", "deep_x2.tiff")):
        page = drive_page(port, source, tmp_path / f"{fmt}.png", models=2, output_format=fmt)
        assert f"{description.strip()} (kept)" in page.facts, page.facts
        assert "16 bits per sample" in page.facts and page.result == "128x96"
        assert page.download == name and page.console_errors == []
        _, _, answer = call(web, "POST", f"/v1/upscale?format={fmt}", data)
        assert page.saved == answer  # the server's bytes: profile, 16 bits and all
        pixels, info, _ = read_back(page.saved)
        assert pixels.dtype == np.uint16 and info.get("icc_profile") == icc
    assert page.status.startswith("done: this browser cannot show image/tiff")
