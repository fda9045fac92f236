"""rdn-train: config precedence, schedule, BN freeze, --init, resume after SIGKILL, torchrun DDP.

Runs are tiny (tiny preset, batch 2-4, 16x16 patches, a few steps) on the built-in images.
The CLI is run in-process through ``main(argv)`` where that suffices and as a real
subprocess where the process boundary is the point (SIGKILL, torchrun, stderr contract).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdn.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint
from rdn.distributed import state_sha256
from rdn.imaging import read_rgb
from rdn.model import RDN, RDNConfig, batchnorm_frozen, freeze_batchnorm
from rdn.resume import distill_teacher
from rdn.train import ema_decay, lr_at, main
from rdn.train_config import (
    DEFAULT_LR,
    TrainConfig,
    UsageError,
    default_bn_freeze_after,
    default_lr_half_every,
    make_train_config,
    read_toml_config,
)

BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--batch-size", "2", "--patch-size", "16", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread per test process: on 2 shared cores, more threads spin-wait on each other.

    OMP_NUM_THREADS also reaches in-process ``main()``, which honours it.
    """
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rdn-train"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def stats_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def params_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias"))}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- pure parts


def test_lr_halves_every_half_every_steps() -> None:
    assert lr_at(0, 1e-3, 100) == 1e-3
    assert lr_at(99, 1e-3, 100) == 1e-3
    assert lr_at(100, 1e-3, 100) == 5e-4
    assert lr_at(350, 1e-3, 100) == 1e-3 / 8
    assert lr_at(10**6, 1e-3, 0) == 1e-3


def test_default_bn_freeze_and_lr_halving_scale_with_steps() -> None:
    assert default_bn_freeze_after(300) == 150
    assert default_bn_freeze_after(1) == 0
    assert default_lr_half_every(300) == 100
    assert default_lr_half_every(2) == 1


def test_derived_defaults_and_explicit_values() -> None:
    cfg = make_train_config({"preset": "tiny", "steps": 300})
    assert cfg.lr == DEFAULT_LR["tiny"] and cfg.bn_freeze_after == 150
    assert cfg.lr_half_every == 100
    paper = make_train_config({})  # the paper's recipe: 1e-4 halved every 200k steps
    assert (paper.preset, paper.lr, paper.lr_half_every, paper.steps) == (
        "paper",
        1e-4,
        200_000,
        600_000,
    )
    assert paper == make_train_config(TrainConfig().to_dict())
    explicit = make_train_config({"preset": "tiny", "lr": 3e-4, "bn_freeze_after": 7})
    assert explicit.lr == 3e-4 and explicit.bn_freeze_after == 7
    with pytest.raises(UsageError, match="steps must be a positive integer"):
        make_train_config({"steps": 0})
    with pytest.raises(UsageError, match="unknown option"):
        make_train_config({"stepz": 3})


# ----------------------------------------------------------------------------- CLI contract


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["--steps", "0"], 2, "steps must be a positive integer"),
        (["--scale", "5"], 2, "--scale"),
        (["--lr", "-1"], 2, "lr must be a positive number"),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
        (["--data", "/no/such/folder"], 1, "/no/such/folder: no such directory"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code(
    argv: list[str], code: int, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([*argv, "--out", str(tmp_path / "run")]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_console_script_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--data", empty, "--out", tmp_path / "run")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{empty}: no images" in result.stderr


def test_corrupt_resume_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("--resume", "--out", run)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "last.pt: cannot be read" in result.stderr


def test_toml_config_is_overridden_by_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text(
        'preset = "tiny"\nsteps = 2\nbatch-size = 3\npatch_size = 16\nlr = 0.005\n'
        "save-every = 1\nseed = 4\nchannel-shuffle = false\n"
    )
    run = tmp_path / "run"
    assert main(["--config", str(config), "--batch-size", "2", "--out", str(run)]) == 0
    stored = load_checkpoint(run / "last.pt")["train_config"]
    assert stored["batch_size"] == 2  # flag beats file
    assert (stored["steps"], stored["patch_size"], stored["lr"], stored["seed"]) == (
        2,
        16,
        0.005,
        4,
    )
    assert stored["preset"] == "tiny" and stored["channel_shuffle"] is False
    (tmp_path / "bad.toml").write_text("batch_sise = 3\n")
    assert main(["--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r2")]) == 2


# ----------------------------------------------------------------------------- training


def test_bn_freezes_at_bn_freeze_after_and_stays_frozen_across_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*TINY, "--save-every", "1", "--out", str(run)]
    assert main([*common, "--steps", "3", "--bn-freeze-after", "3"]) == 0
    at3 = load_checkpoint(run / "last.pt")
    assert at3["step"] == 3 and at3["bn_frozen"] is False
    initial = stats_of(RDN(RDNConfig.from_preset("tiny")).state_dict())
    assert max_abs_diff(stats_of(at3["model"]), initial) > 1e-3  # calibration moved them

    assert main(["--resume", "--out", str(run), "--steps", "5"]) == 0
    at5 = load_checkpoint(run / "last.pt")
    assert at5["step"] == 5 and at5["bn_frozen"] is True
    # Frozen before step 3's forward pass: the statistics are exactly those after 3 steps.
    assert max_abs_diff(stats_of(at5["model"]), stats_of(at3["model"])) == 0.0

    assert main(["--resume", "--out", str(run), "--steps", "7"]) == 0
    at7 = load_checkpoint(run / "last.pt")
    assert at7["step"] == 7 and at7["bn_frozen"] is True
    assert max_abs_diff(stats_of(at7["model"]), stats_of(at3["model"])) == 0.0
    assert max_abs_diff(params_of(at7["model"]), params_of(at5["model"])) > 0.0
    model = model_from_checkpoint(at7)
    assert batchnorm_frozen(model.train())
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))
    assert [r["step"] for r in metrics_rows(run) if "loss" in r] == list(range(1, 8))


def test_resume_refuses_changed_settings_and_fresh_run_refuses_used_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["--resume", "--out", str(run), "--preset", "small"]) == 1
    assert "preset='tiny', now 'small'" in capsys.readouterr().err
    assert main(["--resume", "--out", str(run), "--lr", "0.5"]) == 1
    assert main([*TINY, "--steps", "1", "--out", str(run)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["--resume", "--out", str(tmp_path / "none")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_init_loads_matching_tensors_only(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fine-tune x4 from x2: everything but the second x2 upsampling stage comes across."""
    run = tmp_path / "x4"
    args = ["--preset", "tiny", "--scale", "4", "--steps", "1", "--lr", "1e-12"]
    with caplog.at_level(logging.INFO, logger="rdn.train"):
        assert main([*args, "--init", str(tiny_checkpoint), "--out", str(run)]) == 0
    source = load_checkpoint(tiny_checkpoint)["model"]
    result = load_checkpoint(run / "last.pt")["model"]
    skipped = {"upsample.body.2.weight", "upsample.body.2.bias"}
    assert skipped <= result.keys() and not skipped & source.keys()
    assert f"loaded {len(result) - 2} tensors, skipped 2" in caplog.text
    for name in result.keys() - skipped:
        torch.testing.assert_close(result[name], source[name], rtol=0, atol=1e-9)
    assert load_checkpoint(run / "last.pt")["bn_frozen"] is True  # frozen state came along


def test_resume_accepts_the_runs_own_init_and_refuses_another(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    """A config file with ``init`` (configs/default_x4.toml) must still resume after a kill."""
    run = tmp_path / "x4"
    args = [*TINY, "--scale", "4", "--init", str(tiny_checkpoint), "--out", str(run)]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 2
    capsys.readouterr()
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_checkpoint.read_bytes())
    assert main(["--init", str(other), "--out", str(run), "--resume", "--steps", "3"]) == 2
    assert "is not this run's --init" in capsys.readouterr().err


def test_validation_writes_metrics_and_best_checkpoint(tmp_path: Path, set5_dir: Path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    for name in ("bird", "head"):  # small crops keep validation fast
        Image.fromarray(read_rgb(set5_dir / f"{name}.png")[:64, :64]).save(val / f"{name}.png")
    run = tmp_path / "run"
    argv = [*TINY, "--steps", "2", "--val", str(val), "--val-every", "1", "--out", str(run)]
    assert main(argv) == 0
    rows = [r for r in metrics_rows(run) if "val_psnr_y" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(10 < r["val_psnr_y"] < 60 and 0 < r["val_ssim_y"] <= 1 for r in rows)
    best = load_checkpoint(run / "best.pt")
    best_row = max(rows, key=lambda r: r["val_psnr_y"])
    assert best["best"] == {"val_psnr_y": best_row["val_psnr_y"], "step": best_row["step"]}
    assert best["step"] == best_row["step"]


def test_validation_on_several_degradations_picks_best_by_their_mean(
    tmp_path: Path, set5_dir: Path
) -> None:
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(read_rgb(set5_dir / "bird.png")[:64, :64]).save(val / "bird.png")
    base = [*TINY, "--steps", "2", "--val", str(val), "--val-every", "1"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    config = tmp_path / "val.toml"
    config.write_text('val_degradation = ["bicubic", "jpeg:50"]\n')
    run = tmp_path / "run"
    assert main(["--config", str(config), *base, "--out", str(run)]) == 0
    plain = [r for r in metrics_rows(tmp_path / "plain") if "val_psnr_y" in r]
    rows = [r for r in metrics_rows(run) if "val_psnr_y" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row, alone in zip(rows, plain, strict=True):
        by = row["val_by_degradation"]
        assert list(by) == ["bicubic", "jpeg:50"]
        assert by["bicubic"] == alone["val_psnr_y"]  # the same weights, the same protocol
        assert by["jpeg:50"] != by["bicubic"]
        assert row["val_psnr_y"] == pytest.approx((by["bicubic"] + by["jpeg:50"]) / 2)
    best_row = max(rows, key=lambda r: r["val_psnr_y"])
    best = load_checkpoint(run / "best.pt")
    assert best["best"] == {"val_psnr_y": best_row["val_psnr_y"], "step": best_row["step"]}
    assert best["train_config"]["val_degradation"] == ("bicubic", "jpeg:50")
    result = run_cli(*TINY, "--val-degradation", "jpeg:500", "--out", tmp_path / "bad")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "jpeg" in result.stderr


def test_val_degradation_flags_replace_the_config_list_and_bad_lists_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(val / "grey.png")
    config = tmp_path / "val.toml"
    config.write_text('val_degradation = ["bicubic", "jpeg:50"]\nsteps = 1\n')
    run = tmp_path / "run"
    flags = ["--val-degradation", "noise:10", "--val-degradation", "JPEG:75"]
    assert main(["--config", str(config), *TINY, "--val", str(val), *flags, "--out", str(run)]) == 0
    stored = load_checkpoint(run / "last.pt")["train_config"]
    assert stored["val_degradation"] == ("noise:10", "jpeg:75")  # canonical specs, in order
    capsys.readouterr()
    assert main([*TINY, "--val", str(val), *flags[:2], *flags[:2], "--out", str(run / "x")]) == 2
    assert "val_degradation names a spec twice" in capsys.readouterr().err
    assert main([*TINY, *flags[:2], "--out", str(run / "y")]) == 2
    assert "val_degradation needs a --val folder" in capsys.readouterr().err


def test_resume_with_another_validation_restarts_the_choice_of_best(
    tmp_path: Path, set5_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(read_rgb(set5_dir / "bird.png")[:64, :64]).save(val / "bird.png")
    run = tmp_path / "run"
    shipped = Path(__file__).resolve().parents[2] / "server" / "models" / "default_x2.onnx"
    small = ["--preset", "small", "--batch-size", "2", "--patch-size", "16", "--lr", "1e-9"]
    base = [*small, "--init", str(shipped), "--val", str(val), "--val-every", "1"]
    base += ["--out", str(run)]
    assert main([*base, "--steps", "1"]) == 0
    caplog.set_level(logging.WARNING, logger="rdn.train")
    assert main([*base, "--resume", "--steps", "2", "--val-degradation", "dn"]) == 0
    first, second = [r for r in metrics_rows(run) if "val_psnr_y" in r]
    # sigma-30 noise scores far below clean inputs: compared with step 1's clean score, step 2
    # could never become best.pt; scored on another protocol, it must
    assert second["val_psnr_y"] < first["val_psnr_y"] - 1
    assert "validation changed since best.pt was chosen" in caplog.text
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == 2 and best["best"]["val_psnr_y"] == second["val_psnr_y"]


def test_without_val_best_is_the_final_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(run)]) == 0
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["step"] == last["step"] == 2
    assert max_abs_diff(best["model"], last["model"]) == 0.0


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    steps, kill_after = 40, 6
    args = [*TINY, "--steps", steps, "--save-every", "3", "--seed", "3"]
    args += ["--bn-freeze-after", "5", "--log-every", "1000"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli(*args, "--out", full).returncode == 0

    proc = subprocess.Popen(
        [str(BIN / "rdn-train"), *map(str, args), "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (killed / "last.pt").exists():
                step = load_checkpoint(killed / "last.pt")["step"]  # loadable at any moment
                if step >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = load_checkpoint(killed / "last.pt")["step"]
    assert kill_after <= at_kill < steps  # killed mid-run, after a checkpoint past kill_after

    resumed = run_cli("--resume", "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {at_kill} of {steps}" in resumed.stderr
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == steps
    assert max_abs_diff(a["model"], b["model"]) <= 1e-6
    loss_steps = [r["step"] for r in metrics_rows(killed) if "loss" in r]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == steps


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "rdn.train"]
    command += [*TINY, "--steps", "4", "--bn-freeze-after", "2", "--device", "cpu"]
    result = subprocess.run(
        [*command, "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # A rank's own error comes before torchrun's long report of it: show both ends.
    assert result.returncode == 0, result.stderr[:3000] + "\n...\n" + result.stderr[-1500:]
    end = metrics_rows(run)[-1]
    assert end["event"] == "end" and len(end["rank_state_sha256"]) == 2
    assert end["rank_state_sha256"][0] == end["rank_state_sha256"][1]
    last = load_checkpoint(run / "last.pt")
    assert last["world_size"] == 2 and last["step"] == 4 and last["bn_frozen"] is True
    assert [r["step"] for r in metrics_rows(run) if "loss" in r] == [1, 2, 3, 4]  # rank 0 only


def test_rank_state_hash_detects_a_single_changed_value(tmp_path: Path) -> None:
    """The hash the DDP test compares depends on every weight, and on BN buffers once frozen."""
    model = RDN(RDNConfig.from_preset("tiny"))
    before = state_sha256(model)
    with torch.no_grad():
        next(iter(model.rdbs[2].parameters())).view(-1)[5] += 1e-3
    changed = state_sha256(model)
    assert changed != before
    save_checkpoint(tmp_path / "m.pt", make_payload(model))
    assert state_sha256(model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))) == changed
    freeze_batchnorm(model)
    frozen = state_sha256(model)
    model.rdbs[0].lff_norm.running_mean[0] += 1e-3
    assert state_sha256(model) != frozen


def test_resume_of_a_run_stored_before_channel_shuffle_keeps_it_off(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--no-channel-shuffle", "--out", str(run)]) == 0
    old = load_checkpoint(run / "last.pt")
    del old["train_config"]["channel_shuffle"]  # as written before the option existed
    save_checkpoint(run / "last.pt", old)
    assert main(["--resume", "--out", str(run), "--steps", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["train_config"]["channel_shuffle"] is False


def test_photo_degradation_resumes_bit_exact(tmp_path: Path) -> None:
    """Degradation draws depend only on the sample key: 3 + 3 resumed steps equal 6 steps."""
    args = [*TINY, "--degradation", "photo", "--bn-freeze-after", "2", "--lr-half-every", "2"]
    args += ["--seed", "4"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*args, "--steps", "6", "--out", str(full)]) == 0
    assert main([*args, "--steps", "3", "--out", str(split)]) == 0
    assert main(["--resume", "--steps", "6", "--out", str(split)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["train_config"]["degradation"] == "photo"
    assert max_abs_diff(a["model"], b["model"]) == 0.0
    clean = tmp_path / "clean"  # and the degradation does change what is learned
    clean_args = [*TINY, "--bn-freeze-after", "2", "--lr-half-every", "2", "--seed", "4"]
    assert main([*clean_args, "--steps", "6", "--out", str(clean)]) == 0
    assert max_abs_diff(load_checkpoint(clean / "last.pt")["model"], a["model"]) > 0


def test_resume_refuses_another_degradation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--degradation", "jpeg:50", "--out", str(run)]) == 0
    result = run_cli("--resume", "--out", run, "--steps", "2", "--degradation", "noise:5")
    assert result.returncode == 1
    assert "degradation='jpeg:50', now 'noise:5'" in result.stderr


def test_photo_ranges_come_from_the_config_table_and_bad_ones_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "photo.toml"
    config.write_text(
        'degradation = "photo"\nsteps = 1\n'
        "[photo_ranges]\njpeg_prob = 1.0\njpeg_quality = [40, 60]\n"
    )
    run = tmp_path / "run"
    assert main(["--config", str(config), *TINY, "--out", str(run)]) == 0
    stored = load_checkpoint(run / "last.pt")["train_config"]["photo_ranges"]
    assert stored["jpeg_prob"] == 1.0 and tuple(stored["jpeg_quality"]) == (40, 60)
    config.write_text('degradation = "photo"\n[photo_ranges]\njpeg_quality = [60, 40]\n')
    result = run_cli("--config", config, *TINY, "--out", tmp_path / "bad")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rdn-train: error: photo range jpeg_quality must be 0 <= low <= high: (60.0, 40.0)"
    ]


@pytest.mark.parametrize(
    "config",
    sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml")),
    ids=lambda path: path.name,
)
def test_every_shipped_config_is_a_valid_training_config(config: Path) -> None:
    cfg = make_train_config(read_toml_config(config))
    runs = config.parent.parent / "runs"  # git-ignored: what the docs' commands write
    assert cfg.data is not None and cfg.val is not None
    assert Path(cfg.out).parent == runs
    # the chain starts from a shipped file or from what an earlier command of docs/models.md wrote
    assert cfg.init is None or Path(cfg.init).is_file() or runs in Path(cfg.init).parents


def test_init_from_a_shipped_onnx_model_starts_from_its_weights(tmp_path: Path) -> None:
    onnx_model = Path(__file__).resolve().parents[2] / "server" / "models" / "default_x2.onnx"
    run = tmp_path / "run"
    args = ["--preset", "small", "--batch-size", "2", "--patch-size", "16", "--lr", "1e-9"]
    assert main([*args, "--steps", "1", "--init", str(onnx_model), "--out", str(run)]) == 0
    from rdn.from_onnx import model_from_onnx

    want = model_from_onnx(onnx_model)[0].state_dict()
    got = load_checkpoint(run / "last.pt")["model"]
    assert max_abs_diff(params_of(got), params_of(want)) < 1e-6  # one step at lr 1e-9
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00" * 64)
    result = run_cli(*args, "--steps", "1", "--init", bad, "--out", tmp_path / "r2")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.onnx" in result.stderr


def test_cosine_schedule_decays_to_zero_at_the_last_step() -> None:
    assert lr_at(0, 1e-3, 100, "cosine", 1000) == 1e-3
    assert lr_at(500, 1e-3, 100, "cosine", 1000) == pytest.approx(5e-4)
    assert lr_at(1000, 1e-3, 100, "cosine", 1000) == pytest.approx(0.0)
    assert lr_at(250, 1e-3, 100, "cosine", 1000) > lr_at(750, 1e-3, 100, "cosine", 1000)


def test_ema_is_what_validation_scores_best_holds_and_resume_restores(tmp_path: Path) -> None:
    """--ema: best.pt holds the average (what rdn-export exports), last.pt the raw weights and
    the average; 3 + 3 resumed steps give exactly the average of 6 steps."""
    args = [*TINY, "--ema", "0.5", "--bn-freeze-after", "2", "--lr-half-every", "2", "--seed", "3"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*args, "--steps", "6", "--out", str(full)]) == 0
    assert main([*args, "--steps", "3", "--out", str(split)]) == 0
    assert main(["--resume", "--steps", "6", "--out", str(split)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(split / "last.pt")
    assert max_abs_diff(a["model"], b["model"]) == 0.0
    average, resumed = (
        {k[len("module.") :]: v for k, v in c["ema"].items() if k.startswith("module.")}
        for c in (a, b)
    )
    assert max_abs_diff(average, resumed) == 0.0
    assert max_abs_diff(average, a["model"]) > 0  # an average, not the last weights
    best = load_checkpoint(full / "best.pt")
    assert max_abs_diff(best["model"], average) == 0.0
    assert best["bn_frozen"] is True and a["schedule"]["ema"] == 0.5


def test_resume_refuses_another_ema_or_schedule(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--ema", "0.9", "--out", str(run)]) == 0
    result = run_cli("--resume", "--out", run, "--steps", "2", "--ema", "0.99")
    assert result.returncode == 1 and "ema=0.9, now 0.99" in result.stderr
    result = run_cli("--resume", "--out", run, "--steps", "2", "--schedule", "cosine")
    assert result.returncode == 1 and "schedule='step', now 'cosine'" in result.stderr


def test_ema_decay_warms_up_to_the_asked_decay() -> None:
    assert ema_decay(0.999, 0) == 0.1  # the first update is mostly the current weights
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999


def test_qat_fine_tunes_an_int8_twin_and_resumes_bit_exact(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """--qat: BatchNorm folded, ranges calibrated at the start and observed until
    qat_observe_steps, then fixed; 2 + 2 resumed steps equal 4 steps, ranges included."""
    args = [*TINY, "--qat", "--init", str(tiny_checkpoint), "--qat-observe-steps", "3"]
    args += ["--lr", "1e-3", "--lr-half-every", "0", "--seed", "2"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*args, "--steps", "4", "--out", str(full)]) == 0
    assert main([*args, "--steps", "2", "--out", str(split)]) == 0
    assert main(["--resume", "--steps", "4", "--out", str(split)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["config"]["quant"] == "int8" and a["config"]["norm"] == "none"
    assert max_abs_diff(a["model"], b["model"]) == 0.0
    counts = {k: int(v) for k, v in a["model"].items() if k.endswith(".count")}
    assert counts and set(counts.values()) == {16 + 3}  # calibration batches + observed steps
    start = load_checkpoint(tiny_checkpoint)
    moved = a["model"]["sfe2.weight"] - start["model"]["sfe2.weight"]
    assert moved.abs().max() > 0  # trained


def test_qat_without_init_is_a_usage_error() -> None:
    result = run_cli(*TINY, "--qat", "--steps", "1")
    assert result.returncode == 2 and "--qat fine-tunes a trained model" in result.stderr


def test_qat_distill_learns_the_float_model_and_resumes_bit_exact(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """--qat-distill: the target is the --init model's float output, not the HR image (the
    weights differ from a plain --qat run's), and 1 + 2 resumed steps equal 3 steps."""
    args = [*TINY, "--qat", "--init", str(tiny_checkpoint), "--lr", "1e-3", "--seed", "2"]
    args += ["--lr-half-every", "0", "--qat-observe-steps", "1"]
    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    assert main([*args, "--qat-distill", "--steps", "3", "--out", str(full)]) == 0
    assert main([*args, "--qat-distill", "--steps", "1", "--out", str(split)]) == 0
    assert main(["--resume", "--steps", "3", "--out", str(split)]) == 0
    assert main([*args, "--steps", "3", "--out", str(plain)]) == 0
    a, b, c = (load_checkpoint(run / "last.pt") for run in (full, split, plain))
    assert max_abs_diff(a["model"], b["model"]) == 0.0
    assert max_abs_diff(a["model"], c["model"]) > 0
    assert a["train_config"]["qat_distill"] is True


def test_the_distill_teacher_is_the_init_models_float_function(tiny_checkpoint: Path) -> None:
    options = {"preset": "tiny", "qat": True, "qat_distill": True, "init": str(tiny_checkpoint)}
    teacher = distill_teacher(make_train_config(options))
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    original = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(teacher(x), original(x), atol=1e-5)
    assert distill_teacher(make_train_config({"preset": "tiny"})) is None


def test_qat_distill_without_qat_is_a_usage_error() -> None:
    result = run_cli(*TINY, "--qat-distill", "--steps", "1")
    assert result.returncode == 2 and "--qat-distill needs --qat" in result.stderr
