"""A quiet start: rdn-serve with its default providers (CUDA first) prints no onnxruntime error
or warning line where CUDA cannot run, neither at start-up nor at a reload, and says once which
provider runs and why; the CUDA probe agrees with what onnxruntime itself does."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rdn.constants import CUDA
from rdn.providers import cuda_probe, usable_providers

RDN_SERVE = Path(sys.executable).with_name("rdn-serve")
TIMEOUT = 60.0  # seconds for start-up and for each awaited log line
ORT_NOISE = re.compile(r"\[[EW]:onnxruntime|EP Error|Failed to create CUDAExecutionProvider")
FAST_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--tile", "32", "--tile-pad", "4")


class TextLogServer:
    """rdn-serve with its plain-text stderr collected line by line (onnxruntime's own lines are
    not JSON, so --log-json would hide nothing and parse nothing)."""

    def __init__(self, *args: str) -> None:
        base = [str(RDN_SERVE)] if RDN_SERVE.exists() else [sys.executable, "-m", "server.main"]
        self.process = subprocess.Popen(
            [*base, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {needle!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> tuple[int, str]:
        """Exit code and stdout after SIGTERM."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = self.process.communicate(timeout=TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(TIMEOUT)
        return self.process.returncode, stdout


def test_default_providers_start_and_reload_without_onnxruntime_noise(
    tiny_onnx_factory: Callable[[int], Path], tmp_path: Path
) -> None:
    shutil.copy(tiny_onnx_factory(2), tmp_path / "x2.onnx")
    shutil.copy(tiny_onnx_factory(3), tmp_path / "x3.onnx")
    server = TextLogServer("--model-dir", str(tmp_path), *FAST_FLAGS, "--threads", "1")
    try:
        server.wait_for("listening on 127.0.0.1:")
        shutil.copy(tiny_onnx_factory(4), tmp_path / "x4.onnx")  # a reload opens a session
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("model repository re-scanned: 3 models served")
    finally:
        code, stdout = server.stop()
    assert code == 0, "\n".join(server.lines)
    noise = [line for line in [*server.lines, *stdout.splitlines()] if ORT_NOISE.search(line)]
    assert noise == [], "\n".join(noise)
    chosen = [line for line in server.lines if "onnxruntime runs on" in line]
    assert len(chosen) == 1, "\n".join(server.lines)  # once per process, not once per model
    probe = cuda_probe()
    provider = CUDA if probe.usable else "CPUExecutionProvider"
    assert f"onnxruntime runs on {provider}: " in chosen[0] and probe.reason in chosen[0]


def test_the_probe_agrees_with_the_provider_onnxruntime_activates(
    tiny_onnx_factory: Callable[[int], Path],
) -> None:
    ort.set_default_logger_severity(4)  # this test asks for CUDA on purpose: no noise from it
    try:
        session = ort.InferenceSession(
            str(tiny_onnx_factory(2)), providers=[CUDA, "CPUExecutionProvider"]
        )
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default, WARNING
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 3, 16, 16)
    assert cuda_probe().usable == (session.get_providers()[0] == CUDA), cuda_probe().reason


def test_usable_providers_drops_cuda_only_where_it_cannot_run() -> None:
    cpu = "CPUExecutionProvider"
    assert usable_providers([cpu]) == (cpu,)
    expected = (CUDA, cpu) if cuda_probe().usable else (cpu,)
    assert usable_providers([CUDA, cpu]) == expected
