"""Regenerate the committed gRPC stubs in server/pb/ from every .proto under protos/.

    python -m server.protogen           # rewrite server/pb/**/*_pb2*.py(i)
    python -m server.protogen --check   # exit 1 if the committed stubs differ from a fresh build

protos/ is mapped onto server/pb (``-Iserver/pb=protos``), so protos/rdn/v1/upscale.proto
becomes server/pb/rdn/v1/upscale_pb2.py and the stubs import ``server.pb.rdn.v1...``, which
cannot collide with the top-level ``rdn`` package. The output depends on the grpcio-tools
version (pinned in pyproject's dev extra): a fresh build must reproduce the committed files.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("server.protogen")

ROOT = Path(__file__).resolve().parent.parent  # repository root
PROTO_DIR = "protos"  # relative to the root
PACKAGE_DIR = "server/pb"  # where protos/ lands, relative to an output root
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtogenError(RuntimeError):
    """protoc failed or found nothing to compile."""


def find_protos(root: Path = ROOT) -> list[str]:
    """Every .proto under ``root``/protos, as sorted paths relative to ``root``."""
    protos = sorted(p.relative_to(root).as_posix() for p in (root / PROTO_DIR).rglob("*.proto"))
    if not protos:
        raise ProtogenError(f"no .proto files under {root / PROTO_DIR}")
    return protos


def generate(out: Path, root: Path = ROOT) -> list[Path]:
    """Compile every proto of ``root`` into ``out``/server/pb/...; return the stub files written.

    Package directories that receive stubs get an empty ``__init__.py`` if they have none.
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    protos = find_protos(root)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    log.info("running %s", " ".join(command))
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ProtogenError(f"cannot run grpc_tools.protoc: {e}") from e
    if done.returncode != 0:
        hint = "; install it with pip install -e '.[dev]'" if "No module" in done.stderr else ""
        raise ProtogenError(f"protoc failed (exit {done.returncode}): {done.stderr.strip()}{hint}")
    stubs = sorted(p for p in (out / PACKAGE_DIR).rglob("*") if p.name.endswith(STUB_SUFFIXES))
    for folder in sorted({p.parent for p in stubs}):
        while folder != out:
            init = folder / "__init__.py"
            if not init.exists():
                init.touch()
            folder = folder.parent
            if folder == out / "server":  # server/__init__.py is the package, not generated
                break
    return stubs


def compare(fresh: Path, root: Path = ROOT) -> list[str]:
    """Paths (relative to the root) where ``root``'s committed stubs differ from ``fresh``.

    Covers stubs that differ, are missing, or are committed without a proto behind them, and
    generated package directories without an ``__init__.py``.
    """
    fresh_pkg, committed_pkg = fresh / PACKAGE_DIR, root / PACKAGE_DIR
    new = {p.relative_to(fresh_pkg) for p in fresh_pkg.rglob("*") if p.is_file()}
    old = {
        p.relative_to(committed_pkg)
        for p in committed_pkg.rglob("*")
        if p.is_file() and p.name.endswith(STUB_SUFFIXES)
    }
    differing = []
    for rel in sorted(new | old):
        mine, theirs = committed_pkg / rel, fresh_pkg / rel
        if rel.name == "__init__.py":
            same = mine.is_file()  # content is ours to choose; it only has to exist
        else:
            same = mine.is_file() and theirs.is_file() and filecmp.cmp(mine, theirs, shallow=False)
        if not same:
            differing.append(f"{PACKAGE_DIR}/{rel.as_posix()}")
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate server/pb/ from protos/.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="build into a temporary directory and exit 1 if the committed stubs differ",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root holding protos/ and server/pb/"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.check:
            with tempfile.TemporaryDirectory(prefix="protogen-") as tmp:
                generate(Path(tmp), root)
                differing = compare(Path(tmp), root)
            if differing:
                log.error(
                    "committed stubs differ from protos/ (run python -m server.protogen): %s",
                    ", ".join(differing),
                )
                return 1
            log.info("server/pb is up to date with protos/")
            return 0
        stubs = generate(root, root)
    except ProtogenError as e:
        log.error("%s", e)
        return 2
    log.info("wrote %d stub files under %s", len(stubs), root / PACKAGE_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
