"""Drive a KServe v2 gRPC server with the real ``tritonclient.grpc`` client; JSON in, JSON out.

Runs in the tritonclient interpreter (tests/tritonclient_env.py), not in the project's venv:
it imports nothing from this project. Usage::

    python kserve_client_script.py HOST:PORT < actions.json > results.json

``actions.json`` is a list of objects with an ``op`` key; the answer is one object per action,
``{"value": ...}`` or, when tritonclient raised, ``{"error": {"status": ..., "message": ...}}``.
Tensors travel as .npy files named in the actions (``npy`` in, ``out`` for the result).

ops: live, ready, model_ready {model, version}, server_metadata, model_metadata {model,
version}, infer {model, version, id, input: {name, datatype, npy, shape?}, outputs?, out},
describe {messages}: the wire layout of tritonclient's own messages, for a contract check;
repository_index {ready?}, load {model}, unload {model}, model_config {model},
statistics {model?}: Triton's repository, configuration and statistics calls.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pool
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: F401 (they fill the pool)
from tritonclient.utils import InferenceServerException

CALL_TIMEOUT_S = 60.0  # bound on every call; a hung server fails the test instead of hanging it


def describe(names: list[str]) -> dict[str, Any]:
    """name -> fields (name, number, type, repeated, message type) of each message, nested too."""
    layout: dict[str, Any] = {}

    def add(descriptor: Any) -> None:
        layout[descriptor.full_name] = [
            [
                f.name,
                f.number,
                f.type,
                f.is_repeated,
                f.message_type.full_name if f.message_type else "",
            ]
            for f in descriptor.fields
        ]
        for nested in descriptor.nested_types:
            add(nested)

    pool = descriptor_pool.Default()  # service_pb2 and model_config_pb2 are both in it
    for name in names:
        add(pool.FindMessageTypeByName(f"inference.{name}"))
    return layout


def infer(client: grpcclient.InferenceServerClient, action: dict[str, Any]) -> dict[str, Any]:
    spec = action["input"]
    array = np.load(spec["npy"])
    tensor = grpcclient.InferInput(spec["name"], list(array.shape), spec["datatype"])
    tensor.set_data_from_numpy(array)
    if "shape" in spec:  # a shape that disagrees with the data, to test the server's check
        tensor.set_shape(spec["shape"])
    outputs = action.get("outputs")
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
    result = client.infer(
        action["model"],
        [tensor],
        model_version=action.get("version", ""),
        outputs=requested,
        request_id=action.get("id", ""),
        client_timeout=CALL_TIMEOUT_S,
    )
    response = result.get_response()
    answer = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
            for o in response.outputs
        ],
    }
    if "out" in action and response.outputs:
        np.save(action["out"], result.as_numpy(response.outputs[0].name))
    return answer


def run(client: grpcclient.InferenceServerClient, action: dict[str, Any]) -> Any:
    op = action["op"]
    t = CALL_TIMEOUT_S
    if op == "live":
        return client.is_server_live(client_timeout=t)
    if op == "ready":
        return client.is_server_ready(client_timeout=t)
    if op == "model_ready":
        return client.is_model_ready(action["model"], action.get("version", ""), client_timeout=t)
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True, client_timeout=t)
    if op == "model_metadata":
        return client.get_model_metadata(
            action["model"], action.get("version", ""), as_json=True, client_timeout=t
        )
    if op == "infer":
        return infer(client, action)
    if op == "describe":
        return describe(action["messages"])
    if op == "repository_index":
        index = client.get_model_repository_index(as_json=True, client_timeout=t)
        models = index.get("models", [])
        return [m for m in models if m.get("state") == "READY"] if action.get("ready") else models
    if op == "load":
        client.load_model(action["model"], client_timeout=t)
        return True
    if op == "unload":
        client.unload_model(action["model"], client_timeout=t)
        return True
    if op == "model_config":
        return client.get_model_config(action["model"], as_json=True, client_timeout=t)
    if op == "statistics":
        return client.get_inference_statistics(
            action.get("model", ""), as_json=True, client_timeout=t
        )
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    (address,) = argv
    actions = json.load(sys.stdin)
    results = []
    with grpcclient.InferenceServerClient(address) as client:
        for action in actions:
            try:
                results.append({"value": run(client, action)})
            except InferenceServerException as e:
                results.append({"error": {"status": e.status(), "message": e.message()}})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
