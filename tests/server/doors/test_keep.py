"""Files come back as sent through every door: rdn.v1 gRPC (unary and stream), HTTP
/v1/upscale and the local API keep the profile, EXIF (orientation 1, pixels turned), XMP and
16 bits; strip and to_srgb work; malformed profiles are refused with INVALID_ARGUMENT / 400;
a 16-bit input's answer is computed from its 16 bits (the whole-image float reference)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from server.client import ImageOptions, UpscaleClient, UpscaleError
from server.core.engine import Engine
from server.local import LocalUpscaler
from tests.background import BackgroundServer
from tests.server.imaging.files import (
    BAD_ICC,
    MAKE,
    ORIENTATION,
    XMP,
    exif_with,
    make_file,
    png16,
    read_back,
    swapped_profile,
    tiff_file,
    xmp_of,
)
from tests.server.loopback import CPU, loopback_config

TIMEOUT = 60.0
DOORS = ("grpc", "stream", "http", "local")


@pytest.fixture(scope="module")
def server(tiny_onnx_factory: Callable[[int], Path]) -> Iterator[BackgroundServer]:
    config = loopback_config(tiny_onnx_factory(2), http_port=0)
    with BackgroundServer(config) as bg:
        yield bg


@pytest.fixture(scope="module")
def local(tiny_onnx_factory: Callable[[int], Path]) -> LocalUpscaler:
    return LocalUpscaler(tiny_onnx_factory(2))


@pytest.fixture(scope="module")
def photo(set5_dir: Path) -> np.ndarray:
    bgr = cv2.imread(str(set5_dir / "butterfly.png"), cv2.IMREAD_COLOR)[60:80, 50:78]
    return np.ascontiguousarray(bgr[:, :, ::-1])  # 20 x 28 RGB


def upscale(
    door: str,
    server: BackgroundServer,
    local: LocalUpscaler,
    data: bytes,
    fmt: str = "png",
    image: ImageOptions | None = None,
) -> tuple[bytes, tuple[str, ...]]:
    """(answer, notes) of one door; raises UpscaleError (gRPC) or HttpFailed (HTTP)."""
    image = image or ImageOptions()
    if door == "local":
        done = local.upscale_bytes(
            data, fmt, convert_to_srgb=image.convert_to_srgb,
            strip_metadata=image.strip_metadata, alpha=image.alpha,
        )  # fmt: skip
        return done.image, done.notes
    if door == "http":
        query = f"format={fmt}&to_srgb={int(image.convert_to_srgb)}"
        query += f"&strip={int(image.strip_metadata)}&alpha={image.alpha}"
        assert server.running.http is not None
        connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
        try:
            connection.request("POST", f"/v1/upscale?{query}", body=data)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        if answer.status != 200:
            raise HttpFailed(answer.status, json.loads(body)["error"])
        notes = answer.getheader("X-Notes")
        return body, tuple(notes.split("; ")) if notes else ()
    with UpscaleClient(f"127.0.0.1:{server.port}") as client:
        result = client.upscale(data, fmt, timeout=TIMEOUT, stream=door == "stream", image=image)
    return result.image, result.notes


class HttpFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_profile_exif_and_xmp_come_back_with_the_image_turned(
    server: BackgroundServer, local: LocalUpscaler, photo: np.ndarray, door: str, fmt: str
) -> None:
    icc = swapped_profile()
    data = make_file(photo, fmt.upper(), icc=icc, exif=exif_with(orientation=8), xmp=XMP)
    answer, notes = upscale(door, server, local, data, fmt)
    pixels, info, exif = read_back(answer)
    assert pixels.shape[:2] == (56, 40) and notes == ()  # 20 x 28 turned, then x2
    assert info.get("icc_profile") == icc
    assert (exif[MAKE], exif[ORIENTATION]) == ("RDN Camera", 1) and 0x8825 in exif
    assert b"dc:creator" in xmp_of(info) and b'tiff:Orientation="1"' in xmp_of(info)

    stripped, _ = upscale(door, server, local, data, fmt, ImageOptions(strip_metadata=True))
    _, info, exif = read_back(stripped)
    assert info.get("icc_profile") == icc and len(exif) == 0 and not xmp_of(info)


@pytest.mark.parametrize("door", DOORS)
def test_a_sixteen_bit_tiff_comes_back_a_sixteen_bit_tiff_with_what_it_carries(
    server: BackgroundServer, local: LocalUpscaler, photo: np.ndarray, door: str
) -> None:
    rgb16 = photo.astype(np.uint16) * 257 + 77
    icc = swapped_profile()
    answer, notes = upscale(door, server, local, tiff_file(rgb16, icc, 6, XMP), "tiff")
    pixels, info, exif = read_back(answer)
    assert answer[:4] in (b"II*\x00", b"MM\x00*") and notes == ()
    assert pixels.dtype == np.uint16 and pixels.shape == (56, 40, 3)  # turned, then x2
    assert info.get("icc_profile") == icc
    assert (exif[MAKE], exif[ORIENTATION]) == ("RDN Camera", 1)
    assert b'tiff:Orientation="1"' in xmp_of(info)


@pytest.mark.parametrize("door", DOORS)
def test_to_srgb_converts_and_sixteen_bits_stay_sixteen(
    server: BackgroundServer, local: LocalUpscaler, photo: np.ndarray, door: str
) -> None:
    data = make_file(photo, "PNG", icc=swapped_profile())
    kept, _ = upscale(door, server, local, data)
    converted, _ = upscale(door, server, local, data, image=ImageOptions(convert_to_srgb=True))
    kept_px, kept_info, _ = read_back(kept)
    srgb_px, srgb_info, _ = read_back(converted)
    assert "icc_profile" in kept_info and "icc_profile" not in srgb_info
    # red and green traded places before the model (exact check: tests/server/imaging/test_keep)
    assert (kept_px != srgb_px).any(axis=2).mean() > 0.3

    rgb16 = photo.astype(np.uint16) * 257 + 77
    answer, notes = upscale(door, server, local, png16(rgb16))
    assert read_back(answer)[0].dtype == np.uint16 and notes == ()
    answer, notes = upscale(door, server, local, png16(rgb16), "jpeg")
    assert answer[:2] == b"\xff\xd8" and any(
        "16-bit image answered with 8 bits" in n for n in notes
    )


@pytest.mark.parametrize("door", ["grpc", "stream", "http"])
def test_an_unparseable_profile_is_invalid_argument_naming_it(
    server: BackgroundServer, local: LocalUpscaler, photo: np.ndarray, door: str
) -> None:
    data = make_file(photo, "PNG", icc=BAD_ICC)
    with pytest.raises((UpscaleError, HttpFailed)) as raised:
        upscale(door, server, local, data)
    if door == "http":
        assert raised.value.status == 400  # type: ignore[union-attr]
    else:
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[union-attr]
    assert "ICC colour profile" in str(raised.value) and "cannot be parsed" in str(raised.value)


def test_a_huge_declared_png_with_a_profile_is_still_refused_from_its_header(
    server: BackgroundServer, local: LocalUpscaler, photo: np.ndarray
) -> None:
    data = bytearray(make_file(photo, "PNG", icc=swapped_profile(), exif=exif_with()))
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR: 100000 x 100000 (CRC not checked)
    with pytest.raises(UpscaleError) as raised:
        upscale("grpc", server, local, bytes(data))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_sixteen_bit_answer_is_computed_from_sixteen_bits(
    local: LocalUpscaler, tiny_onnx_factory: Callable[[int], Path]
) -> None:
    """The 16-bit answer differs from the 8-bit input's (the low bits reach the model) and
    lies within 257 (one 8-bit level) of the whole image run in float and rounded to 16 bits."""
    y, x = np.mgrid[0:24, 0:30]
    rgb16 = np.stack([x * 2000 + y * 37, y * 2500 + x * 11, (x * y * 97) % 65536], -1)
    rgb16 = rgb16.clip(0, 65535).astype(np.uint16)
    rgb8 = np.rint(rgb16 / 257.0).astype(np.uint8)
    answer16 = cv2.imdecode(
        np.frombuffer(local.upscale_bytes(png16(rgb16)).image, np.uint8), cv2.IMREAD_UNCHANGED
    )[:, :, ::-1]
    answer8 = local.upscale(rgb8).astype(np.int64) * 257
    engine = Engine(tiny_onnx_factory(2), CPU)
    planar = (rgb16.transpose(2, 0, 1)[None] / np.float32(65535)).astype(np.float32)
    reference = np.clip(engine.run(planar)[0].transpose(1, 2, 0) * 65535 + 0.5, 0, 65535)
    reference = reference.astype(np.int64)
    assert answer16.dtype == np.uint16
    assert np.abs(answer16.astype(np.int64) - reference).max() <= 257
    assert np.abs(answer16.astype(np.int64) - answer8).max() > 257 // 2
    assert (answer16.astype(np.int64) != answer8).mean() > 0.5


@pytest.mark.parametrize(
    "query, fragment",
    [("alpha=blur", "choose one of model, bicubic"), ("to_srgb=yes", "must be 1 (yes) or 0")],
)
def test_bad_options_are_400_naming_the_choices(
    server: BackgroundServer, photo: np.ndarray, query: str, fragment: str
) -> None:
    assert server.running.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=30)
    try:
        connection.request("POST", f"/v1/upscale?{query}", body=make_file(photo, "PNG"))
        answer = connection.getresponse()
        status, body = answer.status, answer.read()
    finally:
        connection.close()
    assert status == 400 and fragment in json.loads(body)["error"]


def test_rdn_client_flags_strip_and_keep(photo: np.ndarray, tmp_path: Path) -> None:
    from tests.server.cli import run_cli

    source, icc = tmp_path / "in.jpg", swapped_profile()  # made once: lcms stamps the time
    source.write_bytes(make_file(photo, "JPEG", icc=icc, exif=exif_with(6)))
    for flags, has_exif in (((), True), (("--strip-metadata",), False)):
        out = tmp_path / f"out{len(flags)}.jpg"
        done = run_cli("upscale", str(source), "-o", str(out), "--local", "rdn_x2", *flags)
        assert done.returncode == 0, done.stderr
        pixels, info, exif = read_back(out.read_bytes())
        assert pixels.shape[:2] == (56, 40) and info.get("icc_profile") == icc
        assert (ORIENTATION in exif) == has_exif


def test_rdn_client_writes_each_file_of_a_folder_in_its_own_kind(
    photo: np.ndarray, tmp_path: Path
) -> None:
    from tests.server.cli import run_cli

    folder, out, icc = tmp_path / "in", tmp_path / "out", swapped_profile()
    folder.mkdir()
    rgb16 = photo.astype(np.uint16) * 257 + 77
    (folder / "scan.tif").write_bytes(tiff_file(rgb16, icc, 1, XMP))
    (folder / "shot.png").write_bytes(make_file(photo, "PNG", icc=icc))
    done = run_cli("upscale", str(folder), "-o", str(out), "--local", "rdn_x2")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["scan_x2.tiff", "shot_x2.png"]
    pixels, info, _ = read_back((out / "scan_x2.tiff").read_bytes())
    assert pixels.dtype == np.uint16 and info.get("icc_profile") == icc and xmp_of(info)
    pixels, info, _ = read_back((out / "shot_x2.png").read_bytes())
    assert pixels.dtype == np.uint8 and info.get("icc_profile") == icc
