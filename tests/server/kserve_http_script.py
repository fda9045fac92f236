"""Drive a KServe v2 REST server with the real ``tritonclient.http`` client; JSON in, JSON out.

Runs in the tritonclient interpreter (tests/tritonclient_env.py), not in the project's venv:
it imports nothing from this project. Usage::

    python kserve_http_script.py HOST:PORT < actions.json > results.json

ops: live, ready, model_ready {model}, server_metadata, model_metadata {model},
infer {model, npy, binary, out}, repository_index, model_config {model}, statistics {model},
load {model}, unload {model}. Each answer is ``{"value": ...}`` or ``{"error": {"status",
"message"}}`` when tritonclient raised.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 60.0


def infer(client: httpclient.InferenceServerClient, action: dict[str, Any]) -> dict[str, Any]:
    array = np.load(action["npy"])
    tensor = httpclient.InferInput("lr", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=action["binary"])
    output = httpclient.InferRequestedOutput("sr", binary_data=action["binary"])
    result = client.infer(action["model"], [tensor], outputs=[output], request_id="http-1")
    np.save(action["out"], result.as_numpy("sr"))
    return result.get_response()


def run(client: httpclient.InferenceServerClient, action: dict[str, Any]) -> Any:
    op = action["op"]
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(action["model"])
    if op == "server_metadata":
        return client.get_server_metadata()
    if op == "model_metadata":
        return client.get_model_metadata(action["model"])
    if op == "infer":
        return infer(client, action)
    if op == "repository_index":
        return client.get_model_repository_index()
    if op == "model_config":
        return client.get_model_config(action["model"])
    if op == "statistics":
        return client.get_inference_statistics(action.get("model", ""))
    if op == "load":
        client.load_model(action["model"])
        return True
    if op == "unload":
        client.unload_model(action["model"])
        return True
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    (address,) = argv
    actions = json.load(sys.stdin)
    results = []
    client = httpclient.InferenceServerClient(
        address, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S
    )
    try:
        for action in actions:
            try:
                results.append({"value": run(client, action)})
            except InferenceServerException as e:
                results.append({"error": {"status": e.status(), "message": e.message()}})
    finally:
        client.close()
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
