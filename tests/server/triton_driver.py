"""Runs the tritonclient drivers (real tritonclient, its own interpreter) against a server.

Shared by the KServe and model repository tests: ``tritonclient(python, port, actions)``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("kserve_client_script.py")  # tritonclient.grpc
HTTP_SCRIPT = Path(__file__).with_name("kserve_http_script.py")  # tritonclient.http
CALL_TIMEOUT = 60.0  # the script bounds each call by this; the whole run by twice


def tritonclient(
    python: str, port: int, actions: list[dict[str, Any]], script: Path = SCRIPT
) -> list[dict[str, Any]]:
    """Run ``actions`` with tritonclient (``script``: the gRPC or the HTTP driver) in a
    subprocess; one result object per action."""
    done = subprocess.run(
        [python, str(script), f"127.0.0.1:{port}"],
        input=json.dumps(actions),
        capture_output=True,
        text=True,
        timeout=2 * CALL_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(actions)
    return results


def value(result: dict[str, Any]) -> Any:
    assert "error" not in result, result
    return result["value"]
