"""rdn-export as a real subprocess: output, one line per fact, Triton repository layout."""

from __future__ import annotations

from export.cli import build_parser
from export.triton import MODEL_FILENAME
from rdn.metadata import read_model_metadata

# What the exporter may say on stderr, one fact per line; anything else (exporter chatter,
# warnings, onnxruntime log lines) fails the test.
FACT_PREFIXES = ("loaded ", "fold: ", "exported with ", "verify: ", "wrote ", "serve it with: ")


def test_cli_export_succeeds_with_one_line_per_fact(cli_x2) -> None:
    result = cli_x2.result
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if not line.startswith(FACT_PREFIXES)] == []
    assert [p for p in FACT_PREFIXES if not any(line.startswith(p) for line in lines)] == []
    (serve,) = [line for line in lines if line.startswith("serve it with: ")]
    assert f"{cli_x2.triton_repo.resolve()}:/models" in serve
    assert serve.endswith("tritonserver --model-repository=/models")
    (verify,) = [line for line in lines if line.startswith("verify: ")]
    assert "astronaut" in verify and "<= 0.0001" in verify
    (summary,) = result.stdout.strip().splitlines()
    assert summary.startswith(f"{cli_x2.output} x2 float32 opset 18 max |diff| ")
    assert float(summary.rsplit(" ", 1)[1]) <= 1e-4


def test_cli_writes_only_the_model_and_the_triton_repository(cli_x2) -> None:
    assert cli_x2.result.returncode == 0, cli_x2.result.stderr
    assert [p.name for p in cli_x2.output.parent.iterdir()] == [cli_x2.output.name]
    folder = cli_x2.triton_repo / cli_x2.model_name
    found = sorted(str(p.relative_to(cli_x2.triton_repo)) for p in cli_x2.triton_repo.rglob("*"))
    name = cli_x2.model_name
    assert found == [name, f"{name}/1", f"{name}/1/{MODEL_FILENAME}", f"{name}/config.pbtxt"]
    assert (folder / "1" / MODEL_FILENAME).read_bytes() == cli_x2.output.read_bytes()
    text = (folder / "config.pbtxt").read_text()
    assert f'name: "{name}"' in text and f"max_batch_size: {cli_x2.max_batch}" in text
    assert read_model_metadata(folder / "1" / MODEL_FILENAME).scale == 2


def test_help_names_every_option() -> None:
    text = build_parser().format_help()
    for option in ("--checkpoint", "--output", "--opset", "--fp16", "--no-verify",
                   "--verify-image", "--triton-repo", "--model-name", "--max-batch"):  # fmt: skip
        assert option in text
