"""The model repository: several models on one port, per-request model / scale / output size,
Triton's repository calls, and hot reload under load (real servers on 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import onnx
import pytest

from rdn.metadata import KEY_NAME, read_metadata
from server.config import TilingConfig
from server.core.errors import RequestError
from server.core.repository import (
    LoadFailed,
    RepositoryConfig,
    RepositoryError,
    choose_defaults,
    discover,
)
from server.core.sizing import (
    SizeOptions,
    check_options,
    needed_factor,
    output_size,
    resize_filter,
    smallest_scale,
)
from server.local import LocalUpscaler
from server.pb.rdn.v1 import upscale_pb2 as pb
from server.pb.rdn.v1 import upscale_pb2_grpc as pb_grpc
from tests.background import BackgroundServer
from tests.server.cli import run_cli
from tests.server.loopback import PAD, TILE, loopback_config
from tests.server.triton_driver import tritonclient, value
from tests.tritonclient_env import tritonclient_python

CALL_TIMEOUT = 60.0


def named_copy(source: Path, folder: Path, name: str, file_name: str | None = None) -> Path:
    """``source`` saved in ``folder`` with ``rdn.name`` = ``name`` (the weights unchanged)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, KEY_NAME: name})
    path = folder / (file_name or f"{name}.onnx")
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(
    tiny_onnx_factory: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """tiny x2 (rdn_x2), an alternative x2 (tiny_x2_alt), and tiny x4 (rdn_x4)."""
    folder = tmp_path_factory.mktemp("repo")
    named_copy(tiny_onnx_factory(2), folder, "rdn_x2", "a.onnx")
    named_copy(tiny_onnx_factory(2), folder, "tiny_x2_alt")
    named_copy(tiny_onnx_factory(4), folder, "rdn_x4", "b.onnx")
    return folder


@pytest.fixture(scope="module")
def repo_server(model_dir: Path) -> Iterator[BackgroundServer]:
    config = loopback_config(None, model_dir=model_dir)
    with BackgroundServer(config) as bg:
        yield bg


@pytest.fixture(scope="module")
def stub(repo_server: BackgroundServer) -> Iterator[pb_grpc.UpscalerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{repo_server.port}") as channel:
        yield pb_grpc.UpscalerStub(channel)


def png(set5_dir: Path, width: int, height: int) -> bytes:
    image = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:height, :width]
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def decoded_size(data: bytes) -> tuple[int, int]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return image.shape[1], image.shape[0]


# ---------------------------------------------------------------------------- pure rules


def test_output_size_keeps_the_aspect_ratio_when_one_side_is_given() -> None:
    assert output_size(SizeOptions(target_width=100), 60, 40) == (100, 67)
    assert output_size(SizeOptions(target_height=100), 60, 40) == (150, 100)
    assert output_size(SizeOptions(target_width=90, target_height=50), 60, 40) == (90, 50)
    assert output_size(SizeOptions(outscale=1.5), 61, 41) == (92, 62)
    assert output_size(SizeOptions(scale=4), 60, 40) is None


def test_factor_outside_1_to_the_largest_scale_names_the_range() -> None:
    assert needed_factor(60, 40, (240, 160), 4) == 4
    for size in ((30, 20), (300, 200), (60, 161)):
        with pytest.raises(RequestError, match=r"must lie in \[1, 4\]"):
            needed_factor(60, 40, size, 4)


def test_smallest_scale_that_reaches_the_factor() -> None:
    assert [smallest_scale(f, (2, 3, 4)) for f in (1.0, 1.5, 2.0, 2.01, 3.5)] == [2, 2, 2, 3, 4]
    assert smallest_scale(2.0000000001, (2, 4)) == 2  # a float's rounding is not a scale


def test_the_resize_only_shrinks_with_the_area_filter() -> None:
    assert resize_filter((120, 80), (120, 80)) is None
    assert resize_filter((120, 80), (90, 60)) == cv2.INTER_AREA
    assert resize_filter((120, 80), (120, 50)) == cv2.INTER_AREA
    with pytest.raises(ValueError, match="larger than the model's output"):
        resize_filter((120, 80), (130, 80))


@pytest.mark.parametrize(
    "options, fragment",
    [
        (SizeOptions(outscale=1.5, target_width=10), "at most one sizing option"),
        (SizeOptions(outscale=float("nan")), "finite number above 0"),
        (SizeOptions(outscale=-2), "finite number above 0"),
        (SizeOptions(scale=5), "use 2, 3 or 4"),
    ],
)
def test_contradicting_options_are_refused(options: SizeOptions, fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment):
        check_options(options)


def test_two_files_with_one_name_are_an_error_naming_both(model_dir: Path, tmp_path: Path) -> None:
    first = named_copy(model_dir / "a.onnx", tmp_path, "same", "one.onnx")
    second = named_copy(model_dir / "a.onnx", tmp_path, "same", "two.onnx")
    with pytest.raises(RepositoryError) as error:
        discover(RepositoryConfig(model_dir=tmp_path))
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_names_come_from_metadata_else_the_file_stem(model_dir: Path, tmp_path: Path) -> None:
    model = onnx.load(str(model_dir / "a.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    found = discover(RepositoryConfig(model_dir=model_dir, models=(tmp_path / "plain.onnx",)))
    assert sorted(found) == ["plain", "rdn_x2", "rdn_x4", "tiny_x2_alt"]
    assert read_metadata(model_dir / "b.onnx")[KEY_NAME] == "rdn_x4"


class _Scaled:
    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.metadata = None  # float32, as a model without precision metadata


def test_default_per_scale_prefers_the_chosen_then_rdn_x_then_the_first_name() -> None:
    models: dict[str, Any] = {
        "a_x2": _Scaled(2), "rdn_x2": _Scaled(2), "z_x2": _Scaled(2), "b_x4": _Scaled(4),
    }  # fmt: skip
    assert choose_defaults(models, ()) == {2: "rdn_x2", 4: "b_x4"}
    assert choose_defaults(models, ("z_x2",)) == {2: "z_x2", 4: "b_x4"}


# ------------------------------------------------------------------- through a real server


def test_list_models_and_model_info_describe_every_model(stub: pb_grpc.UpscalerStub) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT).models
    assert [(m.name, m.scale, m.is_default, m.server_default) for m in listed] == [
        ("rdn_x2", 2, True, True),
        ("tiny_x2_alt", 2, False, False),
        ("rdn_x4", 4, True, False),
    ]
    assert [m.file for m in listed] == ["a.onnx", "tiny_x2_alt.onnx", "b.onnx"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="rdn_x4"), timeout=CALL_TIMEOUT)
    assert (info.name, info.scale, info.version) == ("rdn_x4", 4, 1)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=CALL_TIMEOUT).name == "rdn_x2"


@pytest.mark.parametrize(
    "options, model, size, resized",
    [
        ({}, "rdn_x2", (120, 80), False),
        ({"scale": 4}, "rdn_x4", (240, 160), False),
        ({"model": "tiny_x2_alt"}, "tiny_x2_alt", (120, 80), False),
        ({"target_width": 100}, "rdn_x2", (100, 67), True),
        ({"target_height": 150}, "rdn_x4", (225, 150), True),
        ({"target_width": 200, "target_height": 90}, "rdn_x4", (200, 90), True),
        ({"outscale": 1.5}, "rdn_x2", (90, 60), True),
        ({"outscale": 2.5}, "rdn_x4", (150, 100), True),
        ({"scale": 4, "target_width": 70}, "rdn_x4", (70, 47), True),
    ],
)
def test_requested_model_and_size_are_exactly_what_comes_back(
    stub: pb_grpc.UpscalerStub,
    set5_dir: Path,
    options: dict[str, Any],
    model: str,
    size: tuple[int, int],
    resized: bool,
) -> None:
    request = pb.UpscaleRequest(encoded=png(set5_dir, 60, 40), **options)
    answer = stub.Upscale(request, timeout=CALL_TIMEOUT)
    assert (answer.model, (answer.width, answer.height), answer.resized) == (model, size, resized)
    assert decoded_size(answer.image) == size


def test_resizing_the_model_output_matches_cv2_on_the_unresized_answer(
    stub: pb_grpc.UpscalerStub, set5_dir: Path
) -> None:
    """The resize is the last step: area filter from the x2 answer to the requested size."""
    data = png(set5_dir, 60, 40)
    whole = stub.Upscale(pb.UpscaleRequest(encoded=data), timeout=CALL_TIMEOUT)
    small = stub.Upscale(pb.UpscaleRequest(encoded=data, outscale=1.5), timeout=CALL_TIMEOUT)
    full = cv2.imdecode(np.frombuffer(whole.image, np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.resize(full, (90, 60), interpolation=cv2.INTER_AREA)
    got = cv2.imdecode(np.frombuffer(small.image, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(got, expected)


def test_stream_takes_the_same_options(stub: pb_grpc.UpscalerStub, set5_dir: Path) -> None:
    data = png(set5_dir, 60, 40)
    header = pb.UpscaleStreamHeader(total_bytes=len(data), target_width=150)
    messages = [
        pb.UpscaleChunk(header=header),
        pb.UpscaleChunk(data=pb.DataChunk(offset=0, data=data)),
    ]
    answers = list(stub.UpscaleStream(iter(messages), timeout=CALL_TIMEOUT))
    result = answers[0].result
    image = b"".join(a.data.data for a in answers[1:])
    assert (result.model, result.width, result.height) == ("rdn_x4", 150, 100)
    assert decoded_size(image) == (150, 100)


@pytest.mark.parametrize(
    "options, code, fragment",
    [
        ({"outscale": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "each axis must lie in [1, 4]"),
        ({"outscale": 4.5}, grpc.StatusCode.INVALID_ARGUMENT, "each axis must lie in [1, 4]"),
        ({"target_width": 300}, grpc.StatusCode.INVALID_ARGUMENT, "largest served model scale"),
        ({"model": "rdn_x2", "outscale": 3}, grpc.StatusCode.INVALID_ARGUMENT, "scale of rdn_x2"),
        ({"model": "rdn_x2", "scale": 4}, grpc.StatusCode.INVALID_ARGUMENT, "drop one of the two"),
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "models served: rdn_x2, rdn_x4, tiny"),
        ({"scale": 3}, grpc.StatusCode.NOT_FOUND, "scales served: x2, x4"),
        ({"outscale": 2, "target_height": 9}, grpc.StatusCode.INVALID_ARGUMENT, "at most one"),
    ],
)
def test_impossible_requests_say_what_is_allowed(
    stub: pb_grpc.UpscalerStub,
    set5_dir: Path,
    options: dict[str, Any],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Upscale(pb.UpscaleRequest(encoded=png(set5_dir, 60, 40), **options), timeout=30)
    assert error.value.code() == code
    assert fragment in error.value.details()


# --------------------------------------------------------------------- Triton's calls


@pytest.fixture(scope="session")
def triton_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python interpreter that imports tritonclient.grpc."""
    return tritonclient_python(request.config, tmp_path_factory)


def test_tritonclient_lists_unloads_reloads_and_reads_config_and_statistics(
    model_dir: Path, set5_dir: Path, triton_python: str, tmp_path: Path
) -> None:
    for path in model_dir.glob("*.onnx"):
        shutil.copy(path, tmp_path / path.name)
    config = loopback_config(None, model_dir=tmp_path)
    with BackgroundServer(config) as bg:
        with grpc.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            pb_grpc.UpscalerStub(channel).Upscale(
                pb.UpscaleRequest(encoded=png(set5_dir, 60, 40), scale=4), timeout=CALL_TIMEOUT
            )
        actions = [
            {"op": "repository_index"},
            {"op": "model_config", "model": "rdn_x4"},
            {"op": "statistics", "model": "rdn_x4"},
            {"op": "unload", "model": "tiny_x2_alt"},
            {"op": "repository_index"},
            {"op": "model_ready", "model": "tiny_x2_alt"},
            {"op": "load", "model": "tiny_x2_alt"},
            {"op": "model_ready", "model": "tiny_x2_alt"},
            {"op": "load", "model": "no_such_model"},
            {"op": "statistics"},
        ]
        results = tritonclient(triton_python, bg.port, actions)
    index = value(results[0])
    assert [(m["name"], m["state"]) for m in index] == [
        ("rdn_x2", "READY"), ("rdn_x4", "READY"), ("tiny_x2_alt", "READY"),
    ]  # fmt: skip
    config_json = value(results[1])["config"]
    assert (config_json["name"], config_json["platform"]) == ("rdn_x4", "onnxruntime_onnx")
    assert config_json["input"][0]["dims"] == ["-1", "3", "-1", "-1"]
    assert config_json["input"][0]["data_type"] == "TYPE_FP32"
    (stats,) = value(results[2])["model_stats"]
    assert (stats["name"], stats["inference_count"], stats["execution_count"]) == (
        "rdn_x4", "1", "1",
    )  # fmt: skip
    assert int(stats["inference_stats"]["success"]["ns"]) > 0
    assert value(results[3]) is True
    after_unload = {m["name"]: m for m in value(results[4])}
    assert after_unload["tiny_x2_alt"]["state"] == "UNAVAILABLE"
    assert after_unload["tiny_x2_alt"]["reason"] == "unloaded"
    assert value(results[5]) is False
    assert value(results[6]) is True
    assert value(results[7]) is True
    assert "no model file is named 'no_such_model'" in results[8]["error"]["message"]
    assert [s["name"] for s in value(results[9])["model_stats"]] == [
        "rdn_x2", "tiny_x2_alt", "rdn_x4",
    ]  # fmt: skip


# --------------------------------------------------------------------------- hot reload


def test_reload_under_load_loses_nothing(model_dir: Path, set5_dir: Path, tmp_path: Path) -> None:
    """8 clients upscale without pause while the x2 model is reloaded, the folder re-scanned
    (SIGHUP's path) and another model unloaded and loaded: every answer arrives, sized right."""
    for path in model_dir.glob("*.onnx"):
        shutil.copy(path, tmp_path / path.name)
    config = loopback_config(None, model_dir=tmp_path)
    data = png(set5_dir, 40, 30)
    stop = threading.Event()
    answers: list[tuple[str, int, int]] = []
    failures: list[str] = []

    def client(port: int, index: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.UpscalerStub(channel)
            options = [{}, {"scale": 4}, {"outscale": 1.5}][index % 3]
            expected = {0: (80, 60), 1: (160, 120), 2: (60, 45)}[index % 3]
            while not stop.is_set():
                try:
                    r = stub.Upscale(pb.UpscaleRequest(encoded=data, **options), timeout=30)
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                    continue
                if (r.width, r.height) != expected or decoded_size(r.image) != expected:
                    failures.append(f"wrong size {(r.width, r.height)} for {options}")
                answers.append((r.model, r.width, r.height))

    with BackgroundServer(config) as bg:
        repository = bg.running.repository
        threads = [threading.Thread(target=client, args=(bg.port, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            versions = []
            for _ in range(3):
                versions.append(bg.call(repository.load("rdn_x2"), timeout=60).version)
                bg.call(repository.unload("tiny_x2_alt"), timeout=60)
                time.sleep(0.2)
                bg.call(repository.load("tiny_x2_alt"), timeout=60)
                bg.call(repository.rescan(), timeout=60)
                time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        final = repository.snapshot.models["rdn_x2"].version
    assert failures == []
    assert len(answers) >= 24, len(answers)
    assert versions == [2, 4, 6] and final == 7  # each rescan reloads every file too
    assert {m for m, _, _ in answers} == {"rdn_x2", "rdn_x4"}


def test_a_file_that_fails_to_load_leaves_the_old_version_serving(
    model_dir: Path, set5_dir: Path, tmp_path: Path
) -> None:
    for path in model_dir.glob("*.onnx"):
        shutil.copy(path, tmp_path / path.name)
    config = loopback_config(None, model_dir=tmp_path)
    with BackgroundServer(config) as bg:
        repository = bg.running.repository
        (tmp_path / "b.onnx").write_bytes(b"not an onnx file")
        bg.call(repository.rescan(), timeout=60)  # b.onnx unreadable: the x4 model stays
        assert repository.snapshot.models["rdn_x4"].version == 1
        assert repository.snapshot.models["rdn_x2"].version == 2  # the others were reloaded
        assert "b.onnx" in {e.name: e for e in repository.index()}["rdn_x4"].reason
        channel = grpc.insecure_channel(f"127.0.0.1:{bg.port}")
        stub = pb_grpc.UpscalerStub(channel)
        r = stub.Upscale(pb.UpscaleRequest(encoded=png(set5_dir, 20, 20), scale=4), timeout=30)
        assert (r.model, r.width) == ("rdn_x4", 80)
        (tmp_path / "a.onnx").write_bytes((tmp_path / "a.onnx").read_bytes()[:5000])
        with pytest.raises(LoadFailed, match=r"failed to load from a\.onnx"):
            bg.call(repository.load("rdn_x2"), timeout=60)
        entry = {e.name: e for e in repository.index()}["rdn_x2"]
        assert (entry.state, entry.version) == ("READY", 2)  # the old version serves on
        r = stub.Upscale(pb.UpscaleRequest(encoded=png(set5_dir, 20, 20)), timeout=30)
        assert (r.model, r.width) == ("rdn_x2", 40)
        channel.close()


# ----------------------------------------------------------------- rdn-client and local API


def test_cli_sizes_by_scale_width_and_outscale(
    repo_server: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(set5_dir, 60, 40))
    target = f"127.0.0.1:{repo_server.port}"
    sizes = {}
    for flags, name in (
        (["--scale", "4"], "s4.png"),
        (["--width", "100"], "w100.webp"),
        (["--outscale", "1.5"], "o15.jpg"),
        (["--model", "tiny_x2_alt", "--height", "70"], "alt.png"),
    ):
        done = run_cli(
            "upscale", str(source), "-o", str(tmp_path / name), "--target", target, *flags
        )
        assert done.returncode == 0, done.stderr
        sizes[name] = decoded_size((tmp_path / name).read_bytes())
    assert sizes == {
        "s4.png": (240, 160), "w100.webp": (100, 67), "o15.jpg": (90, 60), "alt.png": (105, 70),
    }  # fmt: skip
    assert (tmp_path / "w100.webp").read_bytes()[8:12] == b"WEBP"


def test_cli_upscales_a_folder_recursively_and_lists_models(
    repo_server: BackgroundServer, set5_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "in" / "deeper").mkdir(parents=True)
    (tmp_path / "in" / "a.png").write_bytes(png(set5_dir, 20, 10))
    (tmp_path / "in" / "deeper" / "b.png").write_bytes(png(set5_dir, 10, 20))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    target = f"127.0.0.1:{repo_server.port}"
    out = tmp_path / "out"
    flat = run_cli("upscale", str(tmp_path / "in"), "-o", str(out), "--target", target)
    assert flat.returncode == 0, flat.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a_x2.png"]
    deep = run_cli(
        "upscale", str(tmp_path / "in"), "--recursive", "-o", str(out), "--target", target,
        "--outscale", "2",
    )  # fmt: skip
    assert deep.returncode == 0, deep.stderr
    assert decoded_size((out / "deeper" / "b_x2.png").read_bytes()) == (20, 40)
    listed = run_cli("models", "--target", target)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [
        ["rdn_x2", "x2"], ["tiny_x2_alt", "x2"], ["rdn_x4", "x4"],
    ]  # fmt: skip
    assert "server default" in listed.stdout.splitlines()[0]
    info = run_cli("info", "--model", "rdn_x4", "--target", target)
    assert info.returncode == 0 and '"scale": 4' in info.stdout


def test_cli_refuses_conflicting_sizes_in_one_line(tmp_path: Path, set5_dir: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(set5_dir, 20, 20))
    done = run_cli("upscale", str(source), "-o", str(tmp_path / "o.png"), "--width", "30",
                   "--outscale", "1.5")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--outscale cannot be combined with --width" in done.stderr


def test_local_api_matches_the_server_bit_for_bit(
    repo_server: BackgroundServer, stub: pb_grpc.UpscalerStub, model_dir: Path, set5_dir: Path
) -> None:
    """Same model, same tiling: the in-process pipeline gives the server's pixels, sized the
    same way, without a server."""
    data = png(set5_dir, 50, 35)
    local = LocalUpscaler(
        model_dir / "b.onnx", tiling=TilingConfig(mode="grid", tile=TILE, pad=PAD)
    )
    for options in ({}, {"width": 130}):
        mine = local.upscale_bytes(data, "png", **options)
        request = pb.UpscaleRequest(encoded=data, scale=4)
        if options:
            request.target_width = 130
        theirs = stub.Upscale(request, timeout=CALL_TIMEOUT)
        assert (mine.width, mine.height) == (theirs.width, theirs.height)
        assert decoded_size(mine.image) == decoded_size(theirs.image)
        assert mine.image == theirs.image


def test_local_cli_and_no_torch_import(model_dir: Path, set5_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(set5_dir, 30, 20))
    done = run_cli("upscale", str(source), "-o", str(tmp_path / "out.png"), "--local",
                   str(model_dir / "b.onnx"), "--width", "100")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert decoded_size((tmp_path / "out.png").read_bytes()) == (100, 67)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, server.local; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "False"
