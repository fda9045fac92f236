"""Every failure: one line on stderr, non-zero exit, no traceback, no output file, no litter."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export.cli import main
from export.to_onnx import ExportError, ExportOptions, export_onnx
from rdn.checkpoint import load_checkpoint, save_checkpoint


def make_bad_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle_persistent_id":  # pickle's error for it spans two lines
        path.write_bytes(b"Pabc\n.")
    elif kind == "plain_dict":
        torch.save({"model": {}, "epoch": 3}, path)
    elif kind == "wrong_weights":  # right format, weights of another architecture
        data = load_checkpoint(good)
        payload = {k: v for k, v in data.items() if k not in ("format", "version")}
        payload["config"] = {**data["config"], "G": 8}
        save_checkpoint(path, payload)
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    return path


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rdn-export: error: ") and "Traceback" not in stderr
    return lines[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


BAD_KINDS = (
    "truncated",
    "random_bytes",
    "pickle_persistent_id",
    "plain_dict",
    "wrong_weights",
    "missing",
    "directory",
)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint(
    kind: str, tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = make_bad_checkpoint(kind, tiny_checkpoint, tmp_path)
    before = files_under(tmp_path)
    output = tmp_path / "out.onnx"
    assert main(["--checkpoint", str(bad), "--output", str(output)]) == 1
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    assert f"checkpoint {bad}" in line
    assert captured.out == ""
    assert files_under(tmp_path) == before  # no output, no temp file


def test_bad_checkpoint_subprocess(
    cli: Callable[..., subprocess.CompletedProcess[str]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    bad = make_bad_checkpoint("truncated", tiny_checkpoint, tmp_path)
    result = cli("--checkpoint", bad, "--output", tmp_path / "out.onnx")
    assert result.returncode == 1
    assert "cannot be read" in one_error_line(result.stderr)
    assert result.stdout == ""
    assert files_under(tmp_path) == ["truncated.pt"]


@pytest.mark.parametrize("opset", ("16", "24", "x"))
def test_unsupported_opset_is_a_usage_error(
    opset: str, tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--output",
                str(tmp_path / "o.onnx"),
                "--opset",
                opset,
            ]
        )
    assert exit_info.value.code == 2
    assert "opset" in one_error_line(capfd.readouterr().err)
    assert files_under(tmp_path) == []


def test_unsupported_opset_subprocess(
    cli: Callable[..., subprocess.CompletedProcess[str]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    result = cli("--checkpoint", tiny_checkpoint, "--output", tmp_path / "o.onnx", "--opset", "99")
    assert result.returncode == 2
    assert "opset 99 not supported: choose 17..23" in one_error_line(result.stderr)
    assert files_under(tmp_path) == []


def test_unsupported_opset_library(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 16 not supported"):
        export_onnx(tiny_checkpoint, tmp_path / "o.onnx", ExportOptions(opset=16))


@pytest.mark.parametrize("case", ("parent_is_a_file", "output_is_a_directory"))
def test_unwritable_output(
    case: str, tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    if case == "parent_is_a_file":
        blocker.write_text("not a folder")
        output = blocker / "sub" / "model.onnx"
    else:
        blocker.mkdir()
        output = blocker
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(output)]) == 1
    expected = {"parent_is_a_file": "is not a directory", "output_is_a_directory": "is a directory"}
    assert expected[case] in one_error_line(capfd.readouterr().err)
    assert files_under(tmp_path) == ["blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(folder / "m.onnx")]) == 1
        assert "cannot write" in one_error_line(capfd.readouterr().err)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    "extra",
    (["--model-name", "x"], ["--max-batch", "4"], ["--triton-repo", "r", "--model-name", "a b"],
     ["--triton-repo", "r", "--max-batch", "0"]),
)  # fmt: skip
def test_triton_usage_errors(
    extra: list[str], tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "o.onnx"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    one_error_line(capfd.readouterr().err)
    assert files_under(tmp_path) == []


def test_unreadable_verification_image(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(b"not a png")
    output = tmp_path / "o.onnx"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(output),
        "--verify-image",
        str(image),
    ]
    assert main(args) == 1
    assert "verification image" in one_error_line(capfd.readouterr().err)
    assert not output.exists()
