"""The HTTP front door (``--http-port``): KServe v2 REST, ``POST /v1/upscale`` and a page at ``/``.

A third door to the same serving core (``server.core.serving``): it runs on the server's event loop
(aiohttp) and translates HTTP requests into the core's calls, so every protocol shares batches,
limits, the token and the access log / metrics. The KServe rules are ``server.core.kserve_rules``'s,
as for gRPC. Errors map from their kind (``server.core.failures``) to HTTP statuses with one table,
HTTP_STATUS: INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 413 (too large) or 429
with ``Retry-After`` (transient), UNAVAILABLE 503, DEADLINE_EXCEEDED 408 (the upload was too
slow), INTERNAL 500 (and 401 for a missing token, 415 for a compressed body); the body is
``{"error": "..."}`` as KServe's REST protocol has it.

Request bodies are read chunk by chunk into one growing buffer, after their announced size was
checked against ``--max-request-bytes`` and held in the upload budget (server/doors/http_body.py):
an upload never sits in memory twice. Connections are capped and timed
(server/doors/http_limits.py).
Health probes (``/v2/health/*``) and the page need no token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from server.core.access import AccessRecord, check_request_id
from server.core.errors import NotFound, RequestError, RequestTooLarge, check_name
from server.core.failures import classify
from server.core.kserve_rules import (
    EXTENSIONS,
    SERVER_NAME,
    model_config,
    model_metadata,
    model_statistics,
    package_version,
    refuse_load_parameters,
)
from server.core.pipeline import Pipeline
from server.core.progress import ProgressBoard
from server.core.serving import ServingCore
from server.core.uploads import Hold
from server.core.upscaling import ImageSource
from server.doors.cross_site import CrossSitePolicy, http_bind_host
from server.doors.http_body import (
    ClientGone,
    UnsupportedEncoding,
    check_encoding,
    json_cost,
    one_line,
    parse_json,
    read_body,
)
from server.doors.http_form import ACCEPTS, form_file, is_form
from server.doors.http_limits import (
    ConnectionGate,
    GatedSite,
    HeadErrorLog,
    connection_cap,
    open_file_limit,
)
from server.doors.http_query import (
    CONTENT_TYPES,
    http_request_id,
    image_query,
    upscale_options,
)
from server.doors.kserve_rest import (
    HEADER_LENGTH,
    JSON_BYTES_PER_VALUE,
    JSON_TENSOR_BYTES,
    header_length,
    infer_answer,
    infer_request_id,
    parse_infer_input,
    wants_binary,
)
from server.imaging.headers import NotAnImage
from server.imaging.profiles import DESCRIPTION_CHARS
from server.ops.auth import token_digest, token_problem
from server.ops.security import AUTH_METADATA_KEY
from server.wire import HTTP_METHODS

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parents[1] / "static" / "index.html"
CONTROL_BODY_BYTES = 64 * 2**10  # the JSON body of a repository call
PROGRESS_HEADER = "X-Progress"  # "1": /v1/progress?id=REQUEST_ID follows the upscale's tiles
METHODS = HTTP_METHODS  # others are counted as OTHER in metrics
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (never delivered)
HTTP_STATUS = {  # failure kind (server.core.failures) -> HTTP status (one table)
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 413,  # 429 with Retry-After when the refusal is transient
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 408,  # the client's upload was too slow
    "INTERNAL": 500,
}
TRANSIENT = 429
OPEN_PATHS = ("/", "/v2/health/live", "/v2/health/ready")  # no token needed
RECORD = web.RequestKey("record", AccessRecord)  # the request's access record


def http_status(error: BaseException) -> tuple[int, str, dict[str, str]]:
    """The HTTP status, message and extra headers for a handler error."""
    if isinstance(error, UnsupportedEncoding):
        return 415, str(error), {}
    failure = classify(error)
    if failure.retry_after_ms is not None:
        seconds = max(1, math.ceil(failure.retry_after_ms / 1e3))
        return TRANSIENT, failure.message, {"Retry-After": str(seconds)}
    return HTTP_STATUS[failure.kind], failure.message, {}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class HttpFrontDoor:
    """The aiohttp application and its listening site."""

    def __init__(self, core: ServingCore) -> None:
        self._core = core
        config = self._config = core.config
        access_observer = core.access_observer
        token = config.security.auth_token
        self._expected = token_digest(token) if token else None
        self._cross_site = CrossSitePolicy(
            config.cross_site,
            bind_host=http_bind_host(config),
            token=bool(token),
            observer=access_observer,
        )
        self._page = PAGE.read_bytes()
        self._progress_board = ProgressBoard()
        self._runner: web.AppRunner | None = None
        self.gate = ConnectionGate(
            connection_cap(config.http_limits.max_connections, open_file_limit())
        )
        self.port = 0

    # -- lifetime ---------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=self._config.limits.max_request_bytes,
            middlewares=[self._cross_site.middleware, self._guard],  # preflights need no token
        )
        get, post = web.get, web.post
        app.add_routes(
            [
                get("/", self._index),
                get("/v1/models", self._list_models),
                post("/v1/upscale", self._upscale),
                get("/v1/progress", self._progress),
                web.put("/v1/upscale", self._upscale),  # curl -T uploads with PUT
                get("/v2/health/live", self._live),
                get("/v2/health/ready", self._ready),
                get("/v2", self._server_metadata),
                get("/v2/models/stats", self._statistics),
                get("/v2/models/{model}", self._model_metadata),
                get("/v2/models/{model}/versions/{version}", self._model_metadata),
                get("/v2/models/{model}/ready", self._model_ready),
                get("/v2/models/{model}/versions/{version}/ready", self._model_ready),
                get("/v2/models/{model}/config", self._model_config),
                get("/v2/models/{model}/stats", self._statistics),
                post("/v2/models/{model}/infer", self._infer),
                post("/v2/models/{model}/versions/{version}/infer", self._infer),
                post("/v2/repository/index", self._repository_index),
                post("/v2/repository/models/{model}/load", self._load),
                post("/v2/repository/models/{model}/unload", self._unload),
            ]
        )
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on ``host:port`` (0 = any free port); the bound port."""
        idle = self._config.http_limits.idle_timeout_s
        self._runner = web.AppRunner(
            self.application(),
            access_log=None,
            shutdown_timeout=self._config.grace_s,
            keepalive_timeout=idle,  # slow heads and idle connections (server/doors/http_limits.py)
            handler_cancellation=True,  # a client that goes away cancels its request
            logger=HeadErrorLog(logging.getLogger("aiohttp.server"), {}),
        )
        await self._runner.setup()
        site = GatedSite(
            self._runner, host, port, self.gate, ssl_context=ssl_context, handshake_timeout_s=idle
        )
        await site.start()
        if self.gate.cap < self._config.http_limits.max_connections:
            log.warning(
                "HTTP connections capped at %d, under --http-max-connections %d, to keep file "
                "descriptors for gRPC (open-file limit %d)",
                self.gate.cap,
                self._config.http_limits.max_connections,
                open_file_limit(),
            )
        self.port = site.port
        return self.port

    async def stop(self) -> None:
        """Stop accepting, give requests in flight ``--grace`` seconds, close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the guard: token, access record, errors ---------------------------------------------
    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        probe = request.path.startswith("/v2/health/") or request.path == "/"
        verb = request.method if request.method in METHODS else "OTHER"  # bounded label values
        record = None if probe else self._core.record(f"HTTP {verb} {name}")
        if record is not None:
            record.set(protocol="http")
            request[RECORD] = record
        try:
            if self._expected is not None and request.path not in OPEN_PATHS:
                header = request.headers.get("Authorization")
                problem = token_problem(
                    [(AUTH_METADATA_KEY, header)] if header else [], self._expected
                )
                if problem is not None:
                    if record is not None:
                        record.set(status="UNAUTHENTICATED")
                    return error_response(401, problem, {"WWW-Authenticate": "Bearer"})
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: 404 route, 405 method, 413 body
            if record is not None:
                record.set(status=f"HTTP_{e.status}")
            return error_response(e.status, e.reason)
        except ClientGone as e:  # logged by the access record, CANCELLED, as gRPC has it
            if record is not None:
                record.set(status="CANCELLED")
            return error_response(CLIENT_CLOSED, str(e))
        except asyncio.CancelledError:
            if record is not None:
                record.set(status="CANCELLED")
            raise
        except Exception as e:
            status, message, headers = http_status(e)
            if record is not None:
                record.set(status=classify(e).kind)
            if status == 500:
                log.error("%s failed", name, exc_info=e)
            return error_response(status, message, headers)
        finally:
            if record is not None:
                record.log()

    def _record(self, request: web.Request) -> AccessRecord:
        """The request's access record (a throwaway for probes, which log nothing)."""
        record = request.get(RECORD)
        return record if record is not None else AccessRecord("probe")

    async def _body(self, request: web.Request, limit: int) -> tuple[bytearray, Hold]:
        """The request body and its hold on the request-byte budget (server/doors/http_body.py)."""
        flag = " (--max-request-bytes)" if limit == self._config.limits.max_request_bytes else ""
        return await read_body(request, limit, self._core.uploads, flag)

    # -- the page and /v1 -----------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def _list_models(self, request: web.Request) -> web.Response:
        snapshot = self._core.snapshot
        models = [
            {
                "name": p.name,
                "scale": p.scale,
                "file": p.path.name,
                "default": snapshot.defaults.get(p.scale) == p.name,
                "server_default": snapshot.primary == p.name,
            }
            for p in snapshot.ordered()
        ]
        return web.json_response({"models": models})

    async def _upscale(self, request: web.Request) -> web.Response:
        received = time.perf_counter()
        record = self._record(request)
        request_id = http_request_id(request)
        check_encoding(request)
        options, fmt, quality = upscale_options(request)
        ticket = self._core.admit_upscale(
            request_id, options, fmt, quality, record, received=received, image=image_query(request)
        )
        data, hold = await self._body(request, self._config.limits.max_request_bytes)
        with hold:
            if not data:
                raise RequestError(f"the body is empty; {ACCEPTS}")
            record.set(bytes_in=len(data))
            content_type = request.headers.get("Content-Type", "")
            wants_progress = request.headers.get(PROGRESS_HEADER, "") == "1"
            progress = self._progress_board.track(request_id) if wants_progress else None
            if is_form(content_type):
                data = form_file(data, content_type, hold)
            try:
                done = await self._core.upscale(
                    ticket,
                    ImageSource(data),  # the buffer itself: not copied
                    record,
                    unary=False,
                    progress=progress,
                )
            except NotAnImage as e:  # perhaps a form or text: say what the endpoint takes
                raise NotAnImage(f"{e}; {ACCEPTS}") from None
            del data
        headers = {
            "X-Model": done.model,
            "X-Model-Reason": one_line(done.model_reason, 200),
            "X-Width": str(done.width),
            "X-Height": str(done.height),
            "X-Scale": str(done.scale),
            "X-Tiles": str(done.tiles),
            "X-Frames": str(done.frames),
            "X-Source-Bits": str(done.source_bits),
            "X-Source-Profile": one_line(done.source_profile, DESCRIPTION_CHARS) or "none",
            "X-Compute-Seconds": f"{done.compute_seconds:.4f}",
            "X-Total-Seconds": f"{time.perf_counter() - received:.4f}",
            "X-Request-Id": done.request_id,
        }
        if done.notes:  # what the answer could not keep, on one ASCII line
            headers["X-Notes"] = one_line("; ".join(done.notes), 1000)
        return web.Response(
            body=done.image, content_type=CONTENT_TYPES[done.format], headers=headers
        )

    async def _progress(self, request: web.Request) -> web.Response:
        """Tiles done and total of a recent ``X-Progress: 1`` upscale, by its request id."""
        request_id = request.query.get("id", "")
        found = self._progress_board.get(request_id)
        if found is None:
            raise NotFound(
                f"no upscale with X-Progress: 1 and request id {one_line(request_id, 64)!r}"
            )
        return web.json_response({"done": found[0], "total": found[1]})

    # -- KServe v2 REST ---------------------------------------------------------------------
    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self._core.ready()  # as gRPC health
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": package_version(), "extensions": list(EXTENSIONS)}
        )

    def _pipeline(self, request: web.Request) -> Pipeline:
        return self._core.model(request.match_info["model"], request.match_info.get("version", ""))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        self._record(request).set(model=pipeline.name)
        return web.json_response(model_metadata(pipeline))

    async def _model_ready(self, request: web.Request) -> web.Response:
        try:
            self._pipeline(request)
        except (LookupError, RequestError):
            return web.json_response({"ready": False}, status=404)
        ready = self._core.serving()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _model_config(self, request: web.Request) -> web.Response:
        config = model_config(self._pipeline(request))
        return web.json_response(
            json_format.MessageToDict(config, preserving_proto_field_name=True)
        )

    async def _statistics(self, request: web.Request) -> web.Response:
        pipelines = (
            [self._pipeline(request)] if "model" in request.match_info else self._core.models()
        )
        stats = [
            json_format.MessageToDict(model_statistics(p), preserving_proto_field_name=True)
            for p in pipelines
        ]
        return web.json_response({"model_stats": stats})

    async def _repository_index(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, allow_empty=True)
        return web.json_response(self._core.index(bool(body.get("ready", False))))

    async def _load(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, allow_empty=True)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError("parameters must be a JSON object")
        refuse_load_parameters(parameters)
        name = check_name(request.match_info["model"], "model name")
        await self._core.load(name)
        self._record(request).set(model=name)
        return web.json_response({})

    async def _unload(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["model"], "model name")
        await self._core.unload(name)
        self._record(request).set(model=name)
        return web.json_response({})

    async def _json_body(self, request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
        """A repository call's small JSON body."""
        data, hold = await self._body(request, CONTROL_BODY_BYTES)
        with hold:
            if not data and allow_empty:
                return {}
            text = bytes(data)
            hold.grow(json_cost(text))
            return parse_json(text, "the request body")

    async def _infer(self, request: web.Request) -> web.Response:
        received = time.perf_counter()
        record = self._record(request)
        pipeline = self._pipeline(request)
        record.set(model=pipeline.name)
        self._core.check_serving()
        data, hold = await self._body(request, self._config.limits.max_request_bytes)
        with hold:
            split = header_length(request.headers.get(HEADER_LENGTH), len(data))
            text = bytes(data[:split])
            hold.grow(json_cost(text))  # parsed JSON costs many times its text: held first
            body = await self._core.in_pool(parse_json, text, "the inference request")
            del text
            request_id = check_request_id(infer_request_id(body))
            record.set(request_id=request_id)
            shape, load = parse_infer_input(body, memoryview(data)[split:])
            binary = wants_binary(body)
            if not binary:
                n, _, h, w = shape
                values = n * 3 * (pipeline.scale * h) * (pipeline.scale * w)
                if JSON_BYTES_PER_VALUE * values > JSON_TENSOR_BYTES:
                    raise RequestTooLarge(
                        f"the output would be {values} JSON numbers; request it as binary data "
                        '(outputs: [{"name": "sr", "parameters": {"binary_data": true}}])'
                    )
            canvas = await self._core.infer(pipeline, shape, load, request_id, record, received)
        head, raw = await self._core.in_pool(
            infer_answer, pipeline.name, request_id, canvas, binary
        )
        record.set(bytes_out=len(head) + len(raw))
        if not binary:
            return web.Response(body=head, content_type="application/json")
        return web.Response(
            body=head + raw,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head))},
        )
