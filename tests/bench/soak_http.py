"""The HTTP half of the hostile soak (tests/bench/hostile_soak.py): valid clients of the HTTP
door and its attackers, each one call of a time-bounded loop.

Valid calls: ``POST /v1/upscale`` with a PNG (answer PNG) or a JPEG (answer JPEG) and KServe v2
REST infer with a JSON tensor (JSON answer) or a binary one (binary answer). An answer is
correct when it has the right size and is identical to the answer the idle server gave the
same request before the soak began. Busy answers (429, 503 with ``Retry-After``) are retried.

Attacks, each with the one answer it may get:

- abandoned uploads: a head announcing 16 MiB, then 1 KiB or 4 MiB of it and a close (no
  answer), or 1 KiB and a stall until the server's upload idle timeout ends it (408);
- gzip bodies (1 MiB inflated, 1 KiB sent) to ``/v1/upscale`` and infer: 415;
- JSON over the 8 MiB cap: 413; JSON nested 100 000 deep: 400;
- slow heads: half a request head, then nothing: closed, unanswered, after the idle timeout;
- cross-site POSTs (``Origin`` or ``Sec-Fetch-Site`` of another site): 403;
- malformed query options (``outscale=nan``, ``width=`` a full-width digit ...): 400.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import cv2
import numpy as np

from server.core.kserve_rules import INPUT_NAME, OUTPUT_NAME
from server.doors.kserve_rest import HEADER_LENGTH, JSON_TENSOR_BYTES
from tests.bench.common import encode_png, photo

CALL_TIMEOUT_S = 120.0  # a valid call, queueing included, on a busy machine
MAX_ATTEMPTS = 50  # per valid call: busy answers are retried after their Retry-After
ABANDONED_BYTES = 16 * 2**20  # announced by an abandoned upload
ABANDONED_SENT = (2**10, 4 * 2**20, 2**10)  # what it sends before it closes, closes, stalls
ABANDONED_PAUSE_S = 0.3  # between its few bytes and its close: the server reads and holds
SLOW_HEAD = b"POST /v1/upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
ATTACK_PAUSE_S = 0.05  # between two attacks of one kind
OTHER_SITE = "https://attacker.example"
MALFORMED_QUERIES = (
    "outscale=nan",
    "outscale=inf",
    "outscale=1e308",
    "outscale=1_5",
    "outscale=%D9%A1",  # an Arabic-Indic digit
    "width=99999999999999999999",
    "width=%EF%BC%91",  # a full-width digit
    "quality=-1",
    "format=%00",
    "scale=two",
)


@dataclass(frozen=True)
class HttpDoor:
    """Where the soak's HTTP clients go: ``http://127.0.0.1:PORT`` and the model to infer on."""

    session: aiohttp.ClientSession
    host: str
    port: int
    model: str

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class HttpValid:
    """A valid HTTP call: what to send, and how to read its answer as comparable bytes."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    read: Callable[[bytes, dict[str, str]], bytes | None]  # the answer's image, or None: wrong


def _decoded(size: tuple[int, int, int]) -> Callable[[bytes, dict[str, str]], bytes | None]:
    """An encoded image answer of ``size`` (height, width, channels): its pixels."""

    def read(body: bytes, headers: dict[str, str]) -> bytes | None:
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or image.shape != size:
            return None
        return image.tobytes()

    return read


def _tensor(shape: list[int]) -> Callable[[bytes, dict[str, str]], bytes | None]:
    """A KServe answer (JSON or binary) whose output ``sr`` has ``shape``: its float32 bytes."""

    def read(body: bytes, headers: dict[str, str]) -> bytes | None:
        split = int(headers.get(HEADER_LENGTH, len(body)))
        head = json.loads(body[:split])
        (output,) = head["outputs"]
        if output["name"] != OUTPUT_NAME or output["shape"] != shape:
            return None
        if split < len(body):
            data = np.frombuffer(body[split:], "<f4")
        else:
            data = np.asarray(output["data"], np.float32)
        return data.tobytes() if data.size == np.prod(shape) else None

    return read


def http_valid_mix(model: str, scale: int) -> list[HttpValid]:
    """Two uploads (PNG in, PNG out; JPEG in, JPEG out) and two KServe infers (a 16x16 JSON
    tensor, a 64x64 binary one)."""
    rgb = photo(48)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    big = (scale * 48, scale * 48, 3)
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    small = (photo(16).transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
    json_request = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": list(small.shape),
                "data": small.ravel().tolist(),
            }
        ]
    }
    tensor = (photo(64).transpose(2, 0, 1)[None] / 255.0).astype("<f4")
    binary_head = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "datatype": "FP32",
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": tensor.nbytes},
                }
            ],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
        }
    ).encode()
    infer = f"/v2/models/{model}/infer"
    octets = {"Content-Type": "application/octet-stream"}
    return [
        HttpValid("upscale png", "/v1/upscale", encode_png(rgb), octets, _decoded(big)),
        HttpValid(
            "upscale jpeg", "/v1/upscale?format=jpeg&quality=90", jpeg, octets, _decoded(big)
        ),
        HttpValid(
            "infer json",
            infer,
            json.dumps(json_request).encode(),
            {"Content-Type": "application/json"},
            _tensor([1, 3, 16 * scale, 16 * scale]),
        ),
        HttpValid(
            "infer binary",
            infer,
            binary_head + tensor.tobytes(),
            {**octets, HEADER_LENGTH: str(len(binary_head))},
            _tensor([1, 3, 64 * scale, 64 * scale]),
        ),
    ]


async def http_answer(door: HttpDoor, job: HttpValid, retried: Counter[str]) -> bytes | str:
    """One valid call, retried while the server is busy: the answer's comparable bytes, or
    what went wrong (``HTTP_500``, ``WRONG_ANSWER``, ``BUSY``)."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    for _ in range(MAX_ATTEMPTS):
        async with door.session.post(
            door.base + job.path, data=job.body, headers=job.headers, timeout=timeout
        ) as answer:
            body = await answer.read()
            if answer.status in (429, 503) and "Retry-After" in answer.headers:
                retried["http"] += 1
                await asyncio.sleep(float(answer.headers["Retry-After"]))
                continue
            if answer.status != 200:
                return f"HTTP_{answer.status}"
            try:
                image = job.read(body, dict(answer.headers))
            except (ValueError, KeyError, TypeError):
                image = None
            return "WRONG_ANSWER" if image is None else image
    return "BUSY"


# ---------------------------------------------------------------------------- attacks


def tally_attack(tally: Counter[str], what: str, got: str, expected: str) -> None:
    """Count ``got`` for the attack ``what``, and as unexpected unless it is ``expected``."""
    tally[f"{what} {got}"] += 1
    if got != expected:
        tally["unexpected attack answers"] += 1


def _status(answer: bytes) -> str:
    """``HTTP 403``, from the first bytes of an answer; ``unanswered`` for none."""
    if not answer:
        return "unanswered"
    found = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return f"HTTP {found.group(1).decode()}" if found else "garbage"


class HttpAttacks:
    """The HTTP attackers; each method is one attack, for a loop to repeat."""

    def __init__(
        self, door: HttpDoor, tally: Counter[str], idle_timeout_s: float, upload_idle_s: float
    ) -> None:
        self.door = door
        self.tally = tally
        self.idle_timeout_s = idle_timeout_s  # --http-idle-timeout: for a complete head
        self.upload_idle_s = upload_idle_s  # --upload-idle-timeout: between body bytes
        self.gzipped = gzip.compress(bytes(2**20), compresslevel=9)
        self.oversized_json = b'{"inputs": [' + b"{}," * (JSON_TENSOR_BYTES // 3) + b"{}]}"
        self.deep_json = b"[" * 100_000 + b"]" * 100_000
        self.png = encode_png(photo(32))
        self.infer = f"/v2/models/{door.model}/infer"

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with self.door.session.post(
            self.door.base + path, data=body, headers=headers, timeout=timeout
        ) as answer:
            await answer.read()
            return f"HTTP {answer.status}"

    async def abandoned_upload(self, k: int) -> None:
        sent = ABANDONED_SENT[k % len(ABANDONED_SENT)]
        stall = k % len(ABANDONED_SENT) == len(ABANDONED_SENT) - 1
        reader, writer = await asyncio.open_connection(self.door.host, self.door.port)
        try:
            head = (
                f"POST /v1/upscale HTTP/1.1\r\nHost: {self.door.host}\r\n"
                f"Content-Type: image/png\r\nContent-Length: {ABANDONED_BYTES}\r\n\r\n"
            )
            writer.write(head.encode() + self.png[:sent] + bytes(max(0, sent - len(self.png))))
            await writer.drain()
            wait = 3 * self.upload_idle_s if stall else ABANDONED_PAUSE_S
            try:
                answer = await asyncio.wait_for(reader.read(64), wait)
            except TimeoutError:
                answer = b""
        finally:
            writer.close()
            await writer.wait_closed()
        if stall:
            tally_attack(self.tally, "http stalled upload", _status(answer), "HTTP 408")
        else:
            tally_attack(self.tally, "http abandoned upload", _status(answer), "unanswered")

    async def gzip_body(self, k: int) -> None:
        path = self.infer if k % 2 else "/v1/upscale"
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
        got = await self._post(path, self.gzipped, headers)
        tally_attack(self.tally, "http gzip", got, "HTTP 415")
        await asyncio.sleep(ATTACK_PAUSE_S)

    async def bad_json(self, k: int) -> None:
        headers = {"Content-Type": "application/json"}
        if k % 2:
            got = await self._post(self.infer, self.oversized_json, headers)
            tally_attack(self.tally, "http oversized json", got, "HTTP 413")
        else:
            got = await self._post(self.infer, self.deep_json, headers)
            tally_attack(self.tally, "http deep json", got, "HTTP 400")
        await asyncio.sleep(ATTACK_PAUSE_S)

    async def slow_head(self, k: int) -> None:
        reader, writer = await asyncio.open_connection(self.door.host, self.door.port)
        try:
            writer.write(SLOW_HEAD)
            await writer.drain()
            try:  # the server closes it after its idle timeout; a reply would be wrong
                answer = await asyncio.wait_for(reader.read(), 3 * self.idle_timeout_s)
                got = _status(answer)
            except TimeoutError:
                got = "still open"
            except ConnectionResetError:
                got = "unanswered"
        finally:
            writer.close()
            await writer.wait_closed()
        tally_attack(self.tally, "http slow head", got, "unanswered")

    async def cross_site(self, k: int) -> None:
        if k % 2:
            got = await self._post(
                "/v1/upscale", self.png, {"Origin": OTHER_SITE, "Content-Type": "image/png"}
            )
        else:
            headers = {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}
            got = await self._post(self.infer, b"{}", headers)
        tally_attack(self.tally, "http cross-site", got, "HTTP 403")
        await asyncio.sleep(ATTACK_PAUSE_S)

    async def malformed_query(self, k: int) -> None:
        query = MALFORMED_QUERIES[k % len(MALFORMED_QUERIES)]
        got = await self._post(f"/v1/upscale?{query}", self.png, {"Content-Type": "image/png"})
        tally_attack(self.tally, "http malformed query", got, "HTTP 400")
        await asyncio.sleep(ATTACK_PAUSE_S)
