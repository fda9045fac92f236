"""rdn-eval and the evaluation loop: real checkpoints, real ONNX sessions, real subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from rdn.checkpoint import load_model
from rdn.eval_cli import main
from rdn.eval_pictures import COMPARISON_GAP, comparison_box, comparison_image
from rdn.evaluate import SCALES as evaluate_scales
from rdn.evaluate import (
    EvalResult,
    evaluate,
    evaluate_model,
    same_device,
)
from rdn.imaging import downscale, modcrop, read_rgb, upscale_bicubic
from rdn.metrics import psnr_y
from rdn.model import RDN, SCALES, RDNConfig

RDN_EVAL = Path(sys.executable).with_name("rdn-eval")  # the installed console script
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread
SET5_BICUBIC_PSNR = {2: 33.66, 3: 30.39, 4: 28.42}  # published, dB
JSON_KEYS = {
    "model_psnr_y",
    "model_ssim_y",
    "bicubic_psnr_y",
    "bicubic_ssim_y",
    "scale",
    "images",
    "self_ensemble",
    "model",
    "per_image",
}
PER_IMAGE_KEYS = {
    "name",
    "model_psnr_y",
    "model_ssim_y",
    "bicubic_psnr_y",
    "bicubic_ssim_y",
    "greyscale",
}
SET14 = Path(__file__).resolve().parents[3] / "shared" / "data" / "Set14"  # not in the repo


def run_main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, expected_code: int, *words: str) -> None:
    assert code == expected_code, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rdn-eval: error: ")
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory, set5_dir: Path) -> Path:
    """Three real crops, one greyscale, odd sizes so modcrop matters: a fast benchmark folder."""
    folder = tmp_path_factory.mktemp("small_set")
    Image.fromarray(read_rgb(set5_dir / "butterfly.png")[60:201, 40:171]).save(folder / "a.png")
    grey = Image.fromarray(read_rgb(set5_dir / "head.png")[40:130, 30:119]).convert("L")
    grey.save(folder / "b_grey.png")
    Image.fromarray(read_rgb(set5_dir / "bird.png")[100:180, 90:171]).save(folder / "c.png")
    return folder


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Other engineers' jobs share the 2 cores; two spinning thread pools slow each other 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export_onnx(model: RDN, path: Path, scale_metadata: str | None = None) -> Path:
    """A real ONNX file of ``model`` (TorchScript exporter), optionally with ``rdn.scale``."""
    dynamic = {"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "sh", 3: "sw"}}
    torch.onnx.export(
        model.eval(),
        torch.rand(1, 3, 16, 16),
        str(path),
        dynamo=False,
        input_names=["lr"],
        output_names=["sr"],
        dynamic_axes=dynamic,
    )
    if scale_metadata is not None:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {"rdn.scale": scale_metadata})
        onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's weights as ONNX, without metadata (scale measured by a probe)."""
    model, _ = load_model(tiny_checkpoint)
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def bicubic_upscaler(scale: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda lr: upscale_bicubic(lr, scale)


@pytest.mark.parametrize("scale", [3, 4])
def test_evaluate_reproduces_published_set5_bicubic(set5_dir: Path, scale: int) -> None:
    result = evaluate(bicubic_upscaler(scale), set5_dir, scale)
    assert len(result.images) == 5
    assert result.bicubic_psnr_y == pytest.approx(SET5_BICUBIC_PSNR[scale], abs=0.05)
    assert result.model_psnr_y == result.bicubic_psnr_y  # the "model" is bicubic here
    assert result.model_ssim_y == result.bicubic_ssim_y


def test_greyscale_files_are_scored_on_grey_values(small_set: Path) -> None:
    result = evaluate(bicubic_upscaler(2), small_set, 2)
    assert [image.greyscale for image in result.images] == [False, True, False]
    grey = result.images[1]
    # The bicubic upscale of a grey image is grey, so its error in grey levels is the Y error
    # scaled by 255 / 219: PSNR on grey values = PSNR on Y - 20 log10(255 / 219).
    hr = modcrop(read_rgb(small_set / "b_grey.png"), 2)
    bicubic = upscale_bicubic(downscale(hr, 2), 2)
    on_y = psnr_y(bicubic, hr, shave=2)
    assert grey.bicubic_psnr_y == pytest.approx(on_y - 20 * math.log10(255 / 219), abs=1e-9)


@pytest.mark.skipif(not SET14.is_dir(), reason="../shared/data/Set14 is not on this machine")
def test_evaluate_reproduces_published_set14_bicubic() -> None:
    # Set14 holds one single-channel file (bridge): its grey values, not Y of RGB, are scored.
    result = evaluate(bicubic_upscaler(2), SET14, 2)
    assert [image.name for image in result.images if image.greyscale] == ["bridge"]
    assert result.bicubic_psnr_y == pytest.approx(30.24, abs=0.05)
    assert result.bicubic_ssim_y == pytest.approx(0.8688, abs=0.002)


def test_cli_subprocess_json_on_set5(tiny_checkpoint: Path, set5_dir: Path) -> None:
    proc = subprocess.run(
        [
            RDN_EVAL,
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            set5_dir,
            "--json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert report.keys() >= JSON_KEYS
    assert report["bicubic_psnr_y"] == pytest.approx(SET5_BICUBIC_PSNR[2], abs=0.05)
    assert report["bicubic_ssim_y"] == pytest.approx(0.9299, abs=0.002)
    assert report["scale"] == 2  # from the checkpoint's config
    assert report["images"] == 5
    assert report["self_ensemble"] is False
    assert report["model"] == str(tiny_checkpoint)
    assert [r["name"] for r in report["per_image"]] == [
        "baby",
        "bird",
        "butterfly",
        "head",
        "woman",
    ]
    for row in report["per_image"]:
        assert row.keys() == PER_IMAGE_KEYS
    # An untrained model is far below bicubic, and its mean is the mean of its rows.
    assert report["model_psnr_y"] < report["bicubic_psnr_y"] - 10
    rows = [r["model_psnr_y"] for r in report["per_image"]]
    assert report["model_psnr_y"] == pytest.approx(np.mean(rows), abs=1e-9)


def test_cli_text_table(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, small_set: Path
) -> None:
    code, out, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--data", small_set)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["image", "model", "PSNR"]
    assert [line.split()[0] for line in lines[1:4]] == ["a", "b_grey", "c"]
    assert lines[4].startswith("mean (3)")
    assert lines[5].startswith("x2, LR bicubic, torch cpu")


def test_onnx_matches_torch_within_a_hundredth_of_a_db(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tiny_onnx: Path, small_set: Path
) -> None:
    code, out, err = run_main(
        capsys, "--checkpoint", tiny_checkpoint, "--data", small_set, "--json", "--device", "cpu"
    )
    assert code == 0, err
    torch_report = json.loads(out)
    # A fresh process that must not import torch on the ONNX path (exit 3 if it does).
    code = (
        "import sys; from rdn.eval_cli import main; "
        f"rc = main(['--onnx', {str(tiny_onnx)!r}, '--data', {str(small_set)!r}, '--json']); "
        "sys.exit(3 if 'torch' in sys.modules else rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    onnx_report = json.loads(proc.stdout)
    assert onnx_report.keys() >= JSON_KEYS
    assert onnx_report["scale"] == 2  # measured: the file has no rdn.scale metadata
    assert onnx_report["model"] == str(tiny_onnx)
    assert onnx_report["bicubic_psnr_y"] == torch_report["bicubic_psnr_y"]
    for ours, theirs in zip(onnx_report["per_image"], torch_report["per_image"], strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["model_psnr_y"] == pytest.approx(theirs["model_psnr_y"], abs=0.01)
        assert ours["model_ssim_y"] == pytest.approx(theirs["model_ssim_y"], abs=1e-4)


def test_self_ensemble_runs_on_both_backends_and_agrees(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tiny_onnx: Path, small_set: Path
) -> None:
    reports = {}
    for flag, path in (("--checkpoint", tiny_checkpoint), ("--onnx", tiny_onnx)):
        for ensemble in (False, True):
            extra = ["--self-ensemble"] if ensemble else []
            code, out, err = run_main(capsys, flag, path, "--data", small_set, "--json", *extra)
            assert code == 0, err
            reports[flag, ensemble] = json.loads(out)
    assert reports["--checkpoint", True]["self_ensemble"] is True
    plain = reports["--checkpoint", False]["model_psnr_y"]
    ensembled = reports["--checkpoint", True]["model_psnr_y"]
    assert ensembled != pytest.approx(plain, abs=1e-3)  # the ensemble changed the output
    onnx_ensembled = reports["--onnx", True]["model_psnr_y"]
    assert onnx_ensembled == pytest.approx(ensembled, abs=0.01)


def test_onnx_scale_metadata_is_used(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, small_set: Path, tmp_path: Path
) -> None:
    model, _ = load_model(tiny_checkpoint)
    good = export_onnx(model, tmp_path / "x2.onnx", scale_metadata="2")
    code, out, err = run_main(capsys, "--onnx", good, "--data", small_set, "--json")
    assert code == 0, err
    assert json.loads(out)["scale"] == 2
    code, out, err = run_main(capsys, "--onnx", good, "--data", small_set, "--scale", "3")
    assert_one_line_error(code, out, err, 2, "--scale 3", "x2")
    # The probe checks the metadata (rdn.onnx_session's rule, the server's too): a x2 network
    # labelled x3 is refused when it is opened, before any image.
    lying = export_onnx(model, tmp_path / "lying.onnx", scale_metadata="3")
    code, out, err = run_main(capsys, "--onnx", lying, "--data", small_set, "--json")
    assert_one_line_error(code, out, err, 1, "rdn.scale=3", "upscales x2")
    broken = export_onnx(model, tmp_path / "broken.onnx", scale_metadata="seven")
    code, out, err = run_main(capsys, "--onnx", broken, "--data", small_set)
    assert_one_line_error(code, out, err, 1, "rdn.scale", "rdn-export")


def test_save_comparison_writes_pngs_of_the_expected_size(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, small_set: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["--checkpoint", tiny_checkpoint, "--data", small_set, "--save-comparison", out_dir]
    code, _, err = run_main(capsys, *argv, "--comparison-limit", "2")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_x2.png", "b_grey_x2.png"]
    with Image.open(out_dir / "a_x2.png") as image:
        # a.png is 131x141: three 128-pixel crops enlarged x2 to 256, two 4-pixel gaps
        assert image.size == (3 * 256 + 2 * COMPARISON_GAP, 256)
        assert image.mode == "RGB"
    with Image.open(out_dir / "b_grey_x2.png") as image:
        # b_grey.png is 89x90, modcropped to 88x90, shown whole and enlarged x3
        assert image.size == (3 * 88 * 3 + 2 * COMPARISON_GAP, 90 * 3)


def test_comparison_image_picks_the_named_image(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, small_set: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["--checkpoint", tiny_checkpoint, "--data", small_set, "--save-comparison", out_dir]
    code, _, err = run_main(capsys, *argv, "--comparison-image", "b_grey")
    assert code == 0, err
    assert [p.name for p in out_dir.iterdir()] == ["b_grey_x2.png"]


def test_comparison_image_layout_and_crop_choice() -> None:
    hr = np.full((200, 300, 3), 128, np.uint8)
    texture = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    hr[120:160, 200:240] = texture  # the only detail in the image
    top, left, h, w = comparison_box(hr, size=64)
    assert (h, w) == (64, 64)
    assert top <= 120 and top + 64 >= 160 and left <= 200 and left + 64 >= 240
    assert top % 8 == 0 and left % 8 == 0

    bicubic, sr = np.zeros_like(hr), np.full_like(hr, 60)
    canvas = comparison_image(hr, bicubic, sr, size=64)
    zoom = 4  # 64-pixel crops are enlarged to 256
    assert canvas.shape == (256, 3 * 256 + 2 * COMPARISON_GAP, 3)
    assert (canvas[:, :256] == 0).all()  # bicubic first
    assert (canvas[:, 256 : 256 + COMPARISON_GAP] == 255).all()  # white gap
    assert (canvas[:, 260:516] == 60).all()  # then the model
    crop = hr[top : top + 64, left : left + 64]
    np.testing.assert_array_equal(canvas[::zoom, 520::zoom], crop)  # then the ground truth


def test_evaluate_model_keeps_the_training_mode_and_batchnorm_state(
    tiny_checkpoint: Path, small_set: Path
) -> None:
    model, _ = load_model(tiny_checkpoint)
    reference = evaluate_model(model, small_set)
    assert isinstance(reference, EvalResult)
    assert not model.training

    # An unfrozen BN model in train mode: evaluation must use running statistics and leave
    # both the mode and those statistics as they were.
    torch.manual_seed(1)
    fresh = RDN(RDNConfig.from_preset("tiny", scale=2)).train()
    with torch.no_grad():
        fresh(torch.rand(2, 3, 16, 16))
    stats = {k: v.clone() for k, v in fresh.state_dict().items() if "running" in k}
    in_train = evaluate_model(fresh, small_set, scale=2)
    assert fresh.training and all(m.training for m in fresh.modules())
    for key, value in fresh.state_dict().items():
        if "running" in key:
            assert torch.equal(value, stats[key]), key
    fresh.eval()
    in_eval = evaluate_model(fresh, small_set)
    assert in_train.to_dict() == in_eval.to_dict()
    assert in_eval.model_psnr_y != reference.model_psnr_y
    summary = in_eval.summary()
    assert summary["images"] == 3 and summary["scale"] == 2
    assert math.isfinite(summary["model_psnr_y"])


def test_evaluate_model_rejects_wrong_scale_or_device(
    tiny_checkpoint: Path, small_set: Path
) -> None:
    model, _ = load_model(tiny_checkpoint)
    with pytest.raises(ValueError, match="x3"):
        evaluate_model(model, small_set, scale=3)
    with pytest.raises(ValueError, match=r"model\.to"):
        evaluate_model(model, small_set, device="meta")
    assert evaluate_model(model, small_set, device="cpu").scale == 2


def test_same_device_treats_a_missing_index_as_any() -> None:
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cuda:1"), torch.device("cuda"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda:0"))


def test_folder_errors(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    code, out, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--data", missing)
    assert_one_line_error(code, out, err, 1, str(missing), "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, out, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--data", empty)
    assert_one_line_error(code, out, err, 1, str(empty), "no images")


def test_unreadable_image_is_named(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, small_set: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes((small_set / "a.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--data", folder, "--json")
    assert_one_line_error(code, out, err, 1, "broken.png", "cannot be decoded")


def test_model_file_errors(
    capsys: pytest.CaptureFixture[str], small_set: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pt"
    code, out, err = run_main(capsys, "--checkpoint", missing, "--data", small_set)
    assert_one_line_error(code, out, err, 1, str(missing), "no such file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a torch file")
    code, out, err = run_main(capsys, "--checkpoint", corrupt, "--data", small_set)
    assert_one_line_error(code, out, err, 1, str(corrupt), "cannot be read")
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    code, out, err = run_main(capsys, "--onnx", not_onnx, "--data", small_set)
    assert_one_line_error(code, out, err, 1, str(not_onnx), "not a loadable ONNX model")
    code, out, err = run_main(capsys, "--onnx", tmp_path / "none.onnx", "--data", small_set)
    assert_one_line_error(code, out, err, 1, "none.onnx", "no such file")


def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tiny_onnx: Path, small_set: Path
) -> None:
    cases = [
        (["--checkpoint", tiny_checkpoint], "--data"),
        (["--data", small_set], "--checkpoint"),
        (
            ["--checkpoint", tiny_checkpoint, "--onnx", tiny_onnx, "--data", small_set],
            "not allowed",
        ),
        (["--checkpoint", tiny_checkpoint, "--data", small_set, "--scale", "5"], "invalid choice"),
        (["--checkpoint", tiny_checkpoint, "--data", small_set, "--scale", "3"], "x2"),
        (["--checkpoint", tiny_checkpoint, "--data", small_set, "--providers", "cpu"], "--onnx"),
        (["--onnx", tiny_onnx, "--data", small_set, "--device", "cpu"], "--checkpoint"),
        (["--onnx", tiny_onnx, "--data", small_set, "--providers", "warp"], "warp"),
        (["--checkpoint", tiny_checkpoint, "--data", small_set, "--comparison-limit", "1"], "DIR"),
        (["--checkpoint", tiny_checkpoint, "--data", small_set, "--comparison-image", "a"], "DIR"),
        (["--onnx", tiny_onnx, "--data", small_set, "--degradation", "blur"], "allowed: bicubic"),
        (["--onnx", tiny_onnx, "--data", small_set, "--degradation", "jpeg:0"], "1..100"),
    ]
    for argv, word in cases:
        code, out, err = run_main(capsys, *argv)
        assert_one_line_error(code, out, err, 2, word)


def test_cli_subprocess_error_has_no_traceback(small_set: Path, tmp_path: Path) -> None:
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x08\x07 truncated protobuf")
    proc = subprocess.run(
        [RDN_EVAL, "--onnx", not_onnx, "--data", small_set, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr
    assert str(not_onnx) in proc.stderr


def test_scales_match_the_model() -> None:
    assert evaluate_scales == SCALES


def test_unusable_gpu_provider_is_one_error_line_not_a_silent_cpu_run(
    capfd: pytest.CaptureFixture[str], tiny_onnx: Path, small_set: Path
) -> None:
    """onnxruntime falls back to CPU when CUDA libraries are missing; rdn-eval refuses that."""
    session = ort.InferenceSession(str(tiny_onnx), providers=["CUDAExecutionProvider"])
    cuda_works = "CUDAExecutionProvider" in session.get_providers()
    capfd.readouterr()  # drop what onnxruntime itself printed for that probe
    code = main(["--onnx", str(tiny_onnx), "--data", str(small_set), "--providers", "cuda"])
    out, err = capfd.readouterr()  # file-descriptor level: onnxruntime's C++ logs included
    if cuda_works:
        assert code == 0, err
    else:
        assert_one_line_error(code, out, err, 1, "CUDAExecutionProvider", "--providers cpu")


def test_exact_match_is_null_in_strict_json(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A flat image survives bicubic exactly (PSNR = inf); strict JSON has no Infinity."""
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "flat.png")
    code, out, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--data", tmp_path, "--json")
    assert code == 0, err

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads(out, parse_constant=reject)
    assert report["bicubic_psnr_y"] is None
    assert report["per_image"][0]["bicubic_psnr_y"] is None
    assert report["bicubic_ssim_y"] == pytest.approx(1.0)
    assert math.isfinite(report["model_psnr_y"])


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "--self-ensemble" in out and "--save-comparison" in out


SHIPPED_X2 = Path(__file__).resolve().parents[2] / "server" / "models" / "default_x2.onnx"


def eval_json(*args: object) -> dict:
    proc = subprocess.run(
        [RDN_EVAL, *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_degradation_scores_model_and_bicubic_on_the_same_degraded_lr(set5_dir: Path) -> None:
    """JPEG 50 costs bicubic about 2.9 dB on Set5 x2 (33.67 -> 30.77, measured when the
    degradation was written); the report names the spec and its seed."""
    clean = eval_json("--onnx", SHIPPED_X2, "--data", set5_dir)
    jpeg = eval_json("--onnx", SHIPPED_X2, "--data", set5_dir, "--degradation", "jpeg:50")
    assert (clean["degradation"], jpeg["degradation"], jpeg["seed"]) == ("bicubic", "jpeg:50", 0)
    assert jpeg["bicubic_psnr_y"] == pytest.approx(30.77, abs=0.05)
    assert jpeg["model_psnr_y"] < clean["model_psnr_y"] - 3


def test_random_degradations_repeat_with_their_seed_and_change_with_another(
    set5_dir: Path,
) -> None:
    runs = [
        eval_json("--onnx", SHIPPED_X2, "--data", set5_dir, "--degradation", "noise:10", *seed)
        for seed in ([], ["--seed", "0"], ["--seed", "1"])
    ]
    assert runs[0]["per_image"] == runs[1]["per_image"]
    assert runs[2]["seed"] == 1 and runs[2]["per_image"] != runs[0]["per_image"]
    assert runs[2]["bicubic_psnr_y"] == pytest.approx(runs[0]["bicubic_psnr_y"], abs=0.1)
