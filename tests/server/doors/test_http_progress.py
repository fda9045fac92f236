"""Progress of one upscale over HTTP: ``X-Progress: 1`` on ``POST /v1/upscale``, then
``GET /v1/progress?id=REQUEST_ID`` (what the page polls while its image is computed)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest

from tests.background import BackgroundServer
from tests.server.loopback import TILE, loopback_config


@pytest.fixture(scope="module")
def web(tiny_onnx_factory: Callable[[int], Path]) -> Iterator[BackgroundServer]:
    with BackgroundServer(loopback_config(tiny_onnx_factory(2), http_port=0)) as bg:
        yield bg


def call(server: BackgroundServer, method: str, path: str, **kwargs: object) -> tuple[int, bytes]:
    assert server.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=60)
    try:
        connection.request(method, path, **kwargs)  # type: ignore[arg-type]
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_progress_counts_the_tiles_of_an_upscale_by_its_request_id(
    web: BackgroundServer, set5_dir: Path
) -> None:
    image = cv2.imread(str(set5_dir / "baby.png"))[: 5 * TILE, : 6 * TILE]
    body = cv2.imencode(".png", image)[1].tobytes()
    headers = {"X-Request-Id": "progress-test-1", "X-Progress": "1"}
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            status, answer = call(web, "GET", "/v1/progress?id=progress-test-1")
            if status == 200:
                counts = json.loads(answer)
                seen.append((counts["done"], counts["total"]))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        status, _ = call(web, "POST", "/v1/upscale", body=body, headers=headers)
    finally:
        done.set()
        poller.join(30)
    assert status == 200
    status, answer = call(web, "GET", "/v1/progress?id=progress-test-1")
    final = json.loads(answer)
    assert status == 200 and final["done"] == final["total"] == 30  # 6 x 5 grid tiles
    assert all(d <= t for d, t in seen) and seen == sorted(seen)  # never goes back


def test_progress_of_an_unknown_or_untracked_request_is_404(
    web: BackgroundServer, set5_dir: Path
) -> None:
    body = cv2.imencode(".png", cv2.imread(str(set5_dir / "bird.png"))[:20, :20])[1].tobytes()
    status, _ = call(web, "POST", "/v1/upscale", body=body, headers={"X-Request-Id": "plain-1"})
    assert status == 200
    for request_id in ("plain-1", "never-sent"):
        status, answer = call(web, "GET", f"/v1/progress?id={request_id}")
        assert status == 404 and b"X-Progress" in answer
