"""The three doors are translators of one serving core: the same image sent through rdn.v1
Upscale, UpscaleStream and HTTP ``POST /v1/upscale`` comes back as the same bytes, and the same
tensor through KServe ModelInfer over gRPC and over REST as the same float32 values, which
round to the pixels of the Upscale answer (the same tiles, the same batches)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from server.client import UpscaleClient
from server.core.chunked import to_uint8
from server.core.sizing import SizeOptions
from server.pb.inference import grpc_service_pb2 as kpb
from server.pb.inference import grpc_service_pb2_grpc as kpb_grpc
from server.pb.rdn.v1 import upscale_pb2, upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.loopback import NO_RETRY, loopback_config

TIMEOUT_S = 60.0
HEIGHT, WIDTH = 37, 53  # not a multiple of the tile: edge tiles included


@pytest.fixture(scope="module")
def server(tiny_onnx_factory: Callable[[int], Path]) -> Iterator[BackgroundServer]:
    config = loopback_config(tiny_onnx_factory(2), http_port=0)
    with BackgroundServer(config) as bg:
        yield bg


@pytest.fixture(scope="module")
def rgb(set5_dir: Path) -> np.ndarray:
    bgr = cv2.imread(str(set5_dir / "butterfly.png"), cv2.IMREAD_COLOR)[:HEIGHT, :WIDTH]
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()


def _http(bg: BackgroundServer, method: str, path: str, body: bytes, **headers: str) -> bytes:
    assert bg.running is not None and bg.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", bg.running.http.port, timeout=TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"Host": "localhost", **headers})
        answer = connection.getresponse()
        data = answer.read()
        assert answer.status == 200, data[:300]
        return data
    finally:
        connection.close()


def test_an_image_is_answered_byte_for_byte_alike_by_every_upscale_door(
    server: BackgroundServer, rgb: np.ndarray
) -> None:
    image = _png(rgb)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        unary = stub.Upscale(
            upscale_pb2.UpscaleRequest(encoded=image, scale=2, request_id="same"), timeout=TIMEOUT_S
        )
    with UpscaleClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client:
        streamed = client.upscale(
            image, request_id="same", stream=True, options=SizeOptions(scale=2)
        )
    over_http = _http(server, "POST", "/v1/upscale?scale=2", image, **{"X-Request-Id": "same"})
    assert (unary.width, unary.height, unary.model) == (2 * WIDTH, 2 * HEIGHT, "rdn_x2")
    assert streamed.image == unary.image
    assert over_http == unary.image


def test_a_tensor_is_answered_alike_by_both_kserve_doors_and_rounds_to_the_upscale_answer(
    server: BackgroundServer, rgb: np.ndarray
) -> None:
    planes = (rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255).astype("<f4")
    request = kpb.ModelInferRequest(model_name="rdn_x2", id="same")
    request.inputs.add(name="lr", datatype="FP32", shape=list(planes.shape))
    request.raw_input_contents.append(planes.tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT_S)
        upscaled = upscale_pb2_grpc.UpscalerStub(channel).Upscale(
            upscale_pb2.UpscaleRequest(encoded=_png(rgb), scale=2, output_format=4),
            timeout=TIMEOUT_S,
        )
    over_grpc = np.frombuffer(answer.raw_output_contents[0], "<f4")
    header = json.dumps(
        {
            "id": "same",
            "inputs": [
                {
                    "name": "lr",
                    "datatype": "FP32",
                    "shape": list(planes.shape),
                    "parameters": {"binary_data_size": planes.nbytes},
                }
            ],
            "outputs": [{"name": "sr", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = _http(
        server,
        "POST",
        "/v2/models/rdn_x2/infer",
        header + planes.tobytes(),
        **{"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/json"},
    )
    over_rest = np.frombuffer(body[-over_grpc.nbytes :], "<f4")
    assert over_rest.tobytes() == over_grpc.tobytes()
    pixels = np.frombuffer(upscaled.image, np.uint8).reshape(2 * HEIGHT, 2 * WIDTH, 3)
    rounded = to_uint8(over_grpc.reshape(3, 2 * HEIGHT, 2 * WIDTH)).transpose(1, 2, 0)
    assert np.array_equal(rounded, pixels)
