"""The stub generator reproduces the committed stubs and notices when they drift."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.protogen import ROOT, ProtogenError, compare, find_protos, generate

COMMITTED = ROOT / "server" / "pb"
PROBE_PROTO = """syntax = "proto3";
package probe;
service ProbeService {
  rpc Ping(PingRequest) returns (PingResponse);
}
message PingRequest {}
message PingResponse { bool ok = 1; }
"""


def copy_repo(dest: Path) -> Path:
    """A minimal repository (protos/ and server/pb/) to break without touching the real one."""
    shutil.copytree(ROOT / "protos", dest / "protos")
    shutil.copytree(COMMITTED, dest / "server" / "pb", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.protogen", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_regenerating_reproduces_committed_stubs_byte_for_byte(tmp_path: Path) -> None:
    stubs = generate(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in stubs}
    assert {
        "server/pb/rdn/v1/upscale_pb2.py",
        "server/pb/rdn/v1/upscale_pb2.pyi",
        "server/pb/rdn/v1/upscale_pb2_grpc.py",
    } <= names
    for stub in stubs:
        committed = ROOT / stub.relative_to(tmp_path)
        assert filecmp.cmp(stub, committed, shallow=False), f"{committed} differs"
    assert compare(tmp_path) == []
    for package in ("server/pb", "server/pb/rdn", "server/pb/rdn/v1"):
        assert (tmp_path / package / "__init__.py").is_file()
    grpc_stub = (tmp_path / "server/pb/rdn/v1/upscale_pb2_grpc.py").read_text()
    assert "from server.pb.rdn.v1 import upscale_pb2" in grpc_stub


def test_check_passes_on_the_committed_tree() -> None:
    done = run_cli("--check")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stderr


def test_check_names_a_stub_that_drifted(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    stub = repo / "server/pb/rdn/v1/upscale_pb2.pyi"
    stub.write_text(stub.read_text() + "# edited by hand\n")
    done = run_cli("--check", "--root", str(repo))
    assert done.returncode == 1
    assert "server/pb/rdn/v1/upscale_pb2.pyi" in done.stderr
    assert "upscale_pb2.py," not in done.stderr  # only the edited file is named
    # Regenerating in place repairs it.
    assert run_cli("--root", str(repo)).returncode == 0
    assert filecmp.cmp(stub, COMMITTED / "rdn/v1/upscale_pb2.pyi", shallow=False)
    assert run_cli("--check", "--root", str(repo)).returncode == 0


def test_new_proto_packages_are_found_and_get_init_files(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    (repo / "protos/probe/v9").mkdir(parents=True)
    (repo / "protos/probe/v9/probe.proto").write_text(PROBE_PROTO)
    protos = find_protos(repo)
    assert "protos/probe/v9/probe.proto" in protos and "protos/rdn/v1/upscale.proto" in protos
    assert protos == sorted(protos)
    fresh = tmp_path / "fresh"
    generate(fresh, repo)
    for package in ("probe", "probe/v9"):
        assert (fresh / "server/pb" / package / "__init__.py").is_file()
    grpc_stub = (fresh / "server/pb/probe/v9/probe_pb2_grpc.py").read_text()
    assert "from server.pb.probe.v9 import probe_pb2" in grpc_stub
    # The committed tree lacks the new stubs: the check names each of them.
    assert compare(fresh, repo) == [
        "server/pb/probe/__init__.py",
        "server/pb/probe/v9/__init__.py",
        "server/pb/probe/v9/probe_pb2.py",
        "server/pb/probe/v9/probe_pb2.pyi",
        "server/pb/probe/v9/probe_pb2_grpc.py",
    ]


def test_stale_stub_without_proto_is_reported(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    (repo / "server/pb/rdn/v1/old_pb2.py").write_text("# left over\n")
    fresh = tmp_path / "fresh"
    generate(fresh, repo)
    assert compare(fresh, repo) == ["server/pb/rdn/v1/old_pb2.py"]


def test_broken_proto_and_empty_tree_are_reported(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    with pytest.raises(ProtogenError, match=r"no \.proto files"):
        generate(tmp_path / "out", tmp_path)
    (tmp_path / "protos/bad.proto").write_text('syntax = "proto3";\nmessage {\n')
    with pytest.raises(ProtogenError, match="protoc failed"):
        generate(tmp_path / "out", tmp_path)
    done = run_cli("--check", "--root", str(tmp_path))
    assert done.returncode == 2 and "bad.proto" in done.stderr
