"""The access log as an operator reads it: ``rdn-serve --log-json`` as a real process, one JSON
object per request on stderr, for a good call and a refused one."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from server.client import RetryPolicy, UpscaleClient, UpscaleError

RDN_SERVE = Path(sys.executable).with_name("rdn-serve")
TIMEOUT = 60.0  # seconds for start-up, each call and each awaited log line
LISTENING = "listening on 127.0.0.1:"


class JsonLogServer:
    """rdn-serve with --log-json; a thread parses every stderr line as one JSON object."""

    def __init__(self, *args: str) -> None:
        base = [str(RDN_SERVE)] if RDN_SERVE.exists() else [sys.executable, "-m", "server.main"]
        self.process = subprocess.Popen(
            [*base, "--log-json", *args], stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.entries: queue.Queue[dict[str, Any]] = queue.Queue()
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.raw.append(line)
            self.entries.put(json.loads(line))  # a non-JSON line fails the test here

    def next_where(self, **match: object) -> dict[str, Any]:
        """The next entry whose fields equal ``match`` (a message prefix via ``message``)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            entry = self.entries.get(timeout=max(0.01, deadline - time.monotonic()))
            message = match.get("message")
            rest = {k: v for k, v in match.items() if k != "message"}
            if all(entry.get(k) == v for k, v in rest.items()) and (
                message is None or str(entry["message"]).startswith(str(message))
            ):
                return entry

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(tiny_onnx_x2: Path) -> Iterator[JsonLogServer]:
    process = JsonLogServer(
        "--model", str(tiny_onnx_x2), "--host", "127.0.0.1", "--port", "0",
        "--providers", "CPUExecutionProvider", "--tile", "32", "--tile-pad", "4", "--grace", "5",
    )  # fmt: skip
    yield process
    process.stop()


def test_json_access_lines_for_a_good_and_a_bad_request(server: JsonLogServer) -> None:
    started = server.next_where(message="listening on")
    assert str(started["message"]).startswith(LISTENING)
    port = int(str(started["message"])[len(LISTENING) :].split()[0])
    image = np.full((40, 70, 3), 90, np.uint8)  # one fitted tile on the CPU: the whole image
    ok_png = cv2.imencode(".png", image)[1].tobytes()
    with UpscaleClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1)) as client:
        result = client.upscale(ok_png, "png", request_id="log-ok", timeout=TIMEOUT)
        with pytest.raises(UpscaleError) as refused:
            client.upscale(b"JUNK, no image", request_id="log-bad", timeout=TIMEOUT)
    assert result.tiles == 1 and refused.value.code == grpc.StatusCode.INVALID_ARGUMENT

    ok = server.next_where(logger="rdn.access", request_id="log-ok")
    assert ok["level"] == "INFO" and ok["message"] == "request"
    assert (ok["method"], ok["status"]) == ("Upscale", "OK")
    assert (ok["width"], ok["height"], ok["channels"], ok["tiles"]) == (70, 40, 3, 1)
    assert (ok["image_pixels"], ok["computed_pixels"], ok["waste"]) == (2800, 2800, 1.0)
    assert (ok["source"], ok["format"], ok["bytes_in"]) == ("png", "png", len(ok_png))
    assert ok["bytes_out"] == len(result.image)
    for key in ("queue_ms", "compute_ms", "total_ms"):
        assert isinstance(ok[key], int | float) and ok[key] >= 0, key
    assert ok["compute_ms"] > 0 and ok["total_ms"] >= ok["queue_ms"] + ok["compute_ms"]
    assert ok["time"].endswith("+00:00")  # UTC, ISO 8601

    bad = server.next_where(logger="rdn.access", request_id="log-bad")
    assert bad["level"] == "WARNING"
    assert (bad["method"], bad["status"]) == ("Upscale", "INVALID_ARGUMENT")
    assert "tiles" not in bad and "queue_ms" not in bad  # it never reached the batcher
    assert bad["total_ms"] >= 0

    assert server.stop() == 0
    access = [json.loads(line) for line in server.raw if '"rdn.access"' in line]
    assert sorted(e["request_id"] for e in access) == ["log-bad", "log-ok"]  # one line each
    assert all(len(line) < 1000 for line in server.raw)  # no image bytes in any line
