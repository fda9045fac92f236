"""Progress of one image through UpscaleStream: Progress messages (asked for in the header)
count its tiles as they complete, through a real server on loopback; a client that does not
ask gets the answer it always got; rdn-client draws a bar of them for a single file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from server.client import AsyncUpscaleClient, make_payload, stream_messages
from server.client import main as client_main
from server.client import progress as client_progress
from server.core.progress import TileProgress
from server.pb.rdn.v1 import upscale_pb2_grpc
from tests.background import BackgroundServer
from tests.server.loopback import NO_RETRY, TILE

CALL_TIMEOUT = 60.0  # seconds per call
HEIGHT, WIDTH = 5 * TILE, 7 * TILE  # 35 grid tiles


@pytest.fixture(scope="module")
def image_png(set5_dir: Path) -> bytes:
    bgr = cv2.imread(str(set5_dir / "baby.png"), cv2.IMREAD_COLOR)[:HEIGHT, :WIDTH]
    return cv2.imencode(".png", bgr)[1].tobytes()


def test_progress_messages_count_the_tiles_of_a_multi_tile_image(
    server: BackgroundServer, image_png: bytes
) -> None:
    seen: list[tuple[int, int]] = []

    async def call() -> tuple[bytes, bytes, int, bool]:
        target = f"127.0.0.1:{server.port}"
        async with AsyncUpscaleClient(target, retry=NO_RETRY) as client:
            followed = await client.upscale(
                image_png, "png", timeout=CALL_TIMEOUT, progress=lambda *p: seen.append(p)
            )
            plain = await client.upscale(image_png, "png", timeout=CALL_TIMEOUT)
        return followed.image, plain.image, followed.tiles, followed.streamed

    followed, plain, tiles, streamed = asyncio.run(call())
    assert streamed and followed == plain  # progress changes how it is told, not the answer
    assert tiles == 35
    assert seen[0] == (0, 35) and seen[-1] == (35, 35)
    assert len(seen) >= 3, seen  # 35 tiles in batches of 4: reported as they complete
    assert all(total == 35 for _, total in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) == len(done)


def test_a_stream_that_does_not_ask_gets_no_progress_messages(
    server: BackgroundServer, image_png: bytes
) -> None:
    """Clients built before Progress existed read the result first, as they always did."""
    payload = make_payload(image_png)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = upscale_pb2_grpc.UpscalerStub(channel)
        messages = stream_messages(payload, "png", 0, "old-client", 2**20)
        kinds = [m.WhichOneof("kind") for m in stub.UpscaleStream(messages, timeout=CALL_TIMEOUT)]
    assert kinds[0] == "result" and set(kinds[1:]) == {"data"}


def test_updates_that_arrive_while_the_consumer_is_busy_are_merged() -> None:
    async def scenario() -> list[tuple[int, int]]:
        progress = TileProgress()
        work: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        got: list[tuple[int, int]] = []
        follower = progress.follow(work)
        progress.update(0, 10)
        got.append(await anext(follower))
        for done in (3, 6, 9):  # while the consumer is busy
            progress.update(done, 10)
        got.append(await anext(follower))
        progress.update(10, 10)
        work.set_result(None)
        got += [p async for p in follower]  # the last change still comes, then the end
        return got

    assert asyncio.run(scenario()) == [(0, 10), (9, 10), (10, 10)]


def test_rdn_client_draws_a_tile_bar_for_one_file(
    server: BackgroundServer,
    image_png: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(client_progress, "BAR_DELAY_S", 0.0)  # at once instead of after 2 s
    monkeypatch.setattr(client_progress, "BAR_INTERVAL_S", 0.0)  # every update redrawn
    source = tmp_path / "photo.png"
    source.write_bytes(image_png)
    target = f"127.0.0.1:{server.port}"
    code = client_main(
        ["upscale", str(source), "-o", str(tmp_path / "out.png"), "--target", target]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"{source} -> {tmp_path / 'out.png'}"
    assert "photo.png" in err and "35/35" in err and "tile" in err
    image = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_COLOR)
    assert image.shape == (2 * HEIGHT, 2 * WIDTH, 3) and image.dtype == np.uint8
