"""The README's quick start, run command by command as printed, against a real server.

The quick start is the code blocks that follow a `<!-- quickstart -->` line in README.md. Its
first command (`make serve ...`) starts the server; every later shell line runs in its own
shell, and a `python` block runs with `.venv/bin/python -c`. What the test changes, and nothing
else:
- the ports: 50051 (gRPC) and 8080 (HTTP) become free ports, wherever they are printed; the
  server command gets `--host 127.0.0.1 --port <free port>` added to its SERVE_ARGS, since the
  printed command leaves gRPC at rdn-serve's defaults (0.0.0.0:50051);
- make runs with `-o .venv/.installed`: the set-up is taken as done (this test never installs);
- the commands run in a fresh folder whose entries link to the repository's top level, with
  `.venv/bin` first on PATH, so `.venv/bin/...`, `tests/data/...` and `Makefile` resolve as in
  the repository and `out/` starts empty.
Every command must exit 0, and every file it writes under `out/` must be an image of the format
and size listed in EXPECTED (which must name exactly the files the quick start writes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- quickstart -->"
GRPC_PORT, HTTP_PORT = "50051", "8080"  # as printed; replaced by free ports
START_TIMEOUT_S = 120.0  # loading and warming up every shipped model on a busy 2-core machine
COMMAND_TIMEOUT_S = 120.0

# What the quick start writes (Set5 butterfly is 256x256): format and (width, height).
EXPECTED = {
    "out/butterfly_x2.png": ("PNG", (512, 512)),
    "out/butterfly_1000.webp": ("WEBP", (1000, 1000)),
    "out/butterfly_x4.png": ("PNG", (1024, 1024)),
    "out/butterfly_x3.png": ("PNG", (768, 768)),
}
OUT_PATH = re.compile(r"\bout/[\w.-]+")


@dataclass(frozen=True)
class Step:
    language: str  # "sh" or "python"
    text: str  # one shell command (continuations joined) or one whole Python block

    @property
    def outputs(self) -> list[str]:
        return OUT_PATH.findall(self.text)


def quickstart_steps(markdown: str) -> list[Step]:
    """The commands of the code blocks marked as the quick start, in order."""
    lines = markdown.splitlines()
    steps: list[Step] = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1].strip()
        assert fence.startswith("```"), f"README.md:{i + 2}: {MARKER} must precede a code block"
        language = fence[3:].strip() or "sh"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        body = lines[i + 2 : end]
        if language == "python":
            steps.append(Step("python", "\n".join(body) + "\n"))
            continue
        assert language in ("sh", "bash", "shell"), f"README.md:{i + 2}: language {language!r}"
        command = ""
        for text in body:
            command += text[:-1] + " " if text.endswith("\\") else text
            if not text.endswith("\\"):
                if command.strip() and not command.lstrip().startswith("#"):
                    steps.append(Step("sh", command.strip()))
                command = ""
    return steps


def quickstart_section(markdown: str) -> str:
    start = markdown.index("## Quick start")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end > 0 else None]


STEPS = quickstart_steps(README.read_text(encoding="utf-8"))
SERVER, CALLS = STEPS[0], STEPS[1:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Served:
    workdir: Path
    ports: dict[str, str]  # printed port -> the free port used instead
    env: dict[str, str]

    def substitute(self, text: str) -> str:
        for printed, real in self.ports.items():
            text = re.sub(rf"\b{printed}\b", real, text)
        return text


def server_argv(command: str, grpc_port: str) -> list[str]:
    """The printed `make serve ...` as argv, with its gRPC address made loopback and free."""
    argv = shlex.split(command)
    assert argv[:2] == ["make", "serve"], f"the quick start must begin with make serve: {command}"
    loopback = f"--host 127.0.0.1 --port {grpc_port}"
    for i, arg in enumerate(argv):
        if arg.startswith("SERVE_ARGS="):
            argv[i] = f"{arg} {loopback}"
            break
    else:
        argv.append(f"SERVE_ARGS={loopback}")
    return ["make", "-o", ".venv/.installed", *argv[1:]]


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"not ready within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if not (ROOT / ".venv" / "bin" / "rdn-serve").exists() or shutil.which("make") is None:
        pytest.skip("needs the set-up of `make install` (.venv) and make")
    workdir = tmp_path_factory.mktemp("quickstart")
    for entry in ROOT.iterdir():
        if entry.name not in ("out", ".git"):
            (workdir / entry.name).symlink_to(entry)
    ports = {GRPC_PORT: str(free_port()), HTTP_PORT: str(free_port())}
    env = dict(os.environ, PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("VIRTUAL_ENV", None)
    result = Served(workdir, ports, env)
    log = workdir / "server.log"
    argv = server_argv(result.substitute(SERVER.text), ports[GRPC_PORT])
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{ports[HTTP_PORT]}/v2/health/ready", server, log)
        yield result
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_quick_start_is_marked_and_expected() -> None:
    assert SERVER.language == "sh" and SERVER.text.startswith("make serve")
    assert "--http-port 8080" in SERVER.text, "the page needs the HTTP door"
    languages = {step.language for step in CALLS}
    assert languages == {"sh", "python"}, languages
    assert any(step.text.startswith("curl ") for step in CALLS)
    assert any(".venv/bin/rdn-client " in step.text for step in CALLS)
    written = {path for step in CALLS for path in step.outputs}
    assert written == set(EXPECTED), "EXPECTED must name exactly the files the quick start writes"


@pytest.mark.parametrize(
    "step", CALLS, ids=[f"{i}-{s.text.split()[0].rsplit('/', 1)[-1]}" for i, s in enumerate(CALLS)]
)
def test_quick_start_command_runs_as_printed(step: Step, served: Served) -> None:
    if step.text.startswith("curl ") and shutil.which("curl") is None:
        pytest.skip("curl is not installed (`which curl` finds nothing): its command is not run")
    for path in step.outputs:
        (served.workdir / path).unlink(missing_ok=True)
    text = served.substitute(step.text)
    argv = [".venv/bin/python", "-c", text] if step.language == "python" else ["sh", "-c", text]
    done = subprocess.run(
        argv, cwd=served.workdir, env=served.env, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, f"{text}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    for path in step.outputs:
        with Image.open(served.workdir / path) as image:
            assert (image.format, image.size) == EXPECTED[path], path
    if " models" in text:
        assert "rdn_x2" in done.stdout, done.stdout


def test_the_page_the_quick_start_ends_in(served: Served) -> None:
    urls = re.findall(r"<(http://localhost:8080/[^>]*)>", quickstart_section(README.read_text()))
    assert urls, "the quick start names the page's address"
    for url in urls:
        with urllib.request.urlopen(served.substitute(url), timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers.get_content_type() == "text/html"
