"""The code's architecture, checked from its imports: each layer imports only the layers below
it, no import cycle, and no module of rdn/, export/ or server/ over 500 lines (generated code
aside). docs/design.md draws the same layers.

Layers, bottom to top: rdn (the model, torch-free constants and ONNX opening) < export <
the server's base (config, wire constants, shipped models, generated stubs) < imaging (image
files) < core (the serving core and the compute under it) < ops (auth, TLS, metrics, health,
logging) < doors (rdn.v1 gRPC, KServe gRPC, HTTP) < local (the in-process API) and app (the
assembly) < client and lifecycle < main (rdn-serve).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rdn", "export", "server")
MAX_LINES = 500
SERVER_LAYERS = {
    "": 2,  # server/__init__.py
    "config": 2,
    "wire": 2,
    "models": 2,
    "pb": 2,
    "protogen": 2,
    "imaging": 3,
    "core": 4,
    "ops": 5,
    "doors": 6,
    "local": 7,
    "app": 7,
    "client": 8,
    "lifecycle": 8,
    "main": 9,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "rdn":
        return 0
    if parts[0] == "export":
        return 1
    return SERVER_LAYERS[parts[1] if len(parts) > 1 else ""]


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every project module each module imports (function-level imports included)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name.startswith("server.pb"):
            continue
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges[name] = {t for t in targets if t.split(".")[0] in PACKAGES}
    return edges


def test_every_layer_imports_only_the_layers_below_it() -> None:
    modules = _modules()
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in _imports(modules).items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    edges = _imports(_modules())
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for target in sorted(edges.get(name, ())):
            if seen.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target in edges and target not in seen:
                visit(target, [*path, target])
        seen[name] = 2

    for name in sorted(edges):
        if name not in seen:
            visit(name, [name])
    assert cycles == []


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(REPO)): n
        for name, path in _modules().items()
        if not name.startswith("server.pb")
        and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
