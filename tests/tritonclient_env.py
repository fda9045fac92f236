"""A Python interpreter that imports ``tritonclient[grpc]``, for tests that run it in a subprocess.

tritonclient pins protobuf < 7 while this project runs protobuf 7, so it cannot live in the
project's venv. In order: ``$RDN_TRITON_PYTHON`` (the Makefile's prebuilt ``.venv-triton``),
this interpreter if it happens to import tritonclient, else a venv built once from PyPI into
pytest's cache folder (``.pytest_cache/d/tritonclient-venv``) and reused by later runs. Tests
skip when that venv cannot be built (no network); a ``$RDN_TRITON_PYTHON`` that does not work
fails them instead, since someone chose it.

Each test module wraps ``tritonclient_python`` in a session fixture of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRITONCLIENT = "tritonclient[grpc,http]"
ENV_VAR = "RDN_TRITON_PYTHON"
PROBE = "import tritonclient.grpc, tritonclient.grpc.model_config_pb2, tritonclient.http"
PROBE_TIMEOUT_S = 120
INSTALL_TIMEOUT_S = 600


def _probe(python: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
    )


def _imports_tritonclient(python: str) -> bool:
    return Path(python).exists() and _probe(python).returncode == 0


def tritonclient_python(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a Python that imports tritonclient.grpc (see the module docstring for which)."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        if not Path(chosen).exists():
            pytest.fail(f"{ENV_VAR}={chosen}: no such interpreter; unset it or run make install")
        probe = _probe(chosen)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            pytest.fail(f"{ENV_VAR}={chosen} cannot import tritonclient.grpc: {last}")
        return chosen
    if _imports_tritonclient(sys.executable):
        return sys.executable
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("tritonclient-venv") if cache else tmp_path_factory.mktemp("tc")
    venv, ready = folder / "venv", folder / "ready"
    python = str(venv / "bin" / "python")
    if ready.exists() and _imports_tritonclient(python):
        return python
    shutil.rmtree(venv, ignore_errors=True)
    steps = (
        [sys.executable, "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TRITONCLIENT],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"cannot build a venv with {TRITONCLIENT} from PyPI: {last}")
    ready.write_text(TRITONCLIENT + "\n")
    return python
