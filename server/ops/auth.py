"""Bearer-token authentication: a ``grpc.aio`` server interceptor.

Every call must carry ``authorization: Bearer <token>`` metadata matching ``--auth-token-file``;
others are answered UNAUTHENTICATED before any handler runs, and logged (access log, metrics)
like any other call, without the token. The comparison is constant-time (``hmac.compare_digest``
on SHA-256 digests, so not even the token's length leaks through timing).

Exempt: the standard health service (``/grpc.health.v1.Health/``), so load balancers and
Kubernetes probes work without the secret; it tells only SERVING / NOT_SERVING. Reflection is
NOT exempt: listing the API is for callers holding the token (``grpcurl -H 'authorization:
Bearer ...'``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from server.core.access import AccessObserver, AccessRecord
from server.ops.security import AUTH_METADATA_KEY

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
SCHEME = "bearer"  # RFC 6750; the scheme name is case-insensitive
MISSING = "missing bearer token"
INVALID = "invalid bearer token"
HINTS = {
    MISSING: "send metadata 'authorization: Bearer <token>' (rdn-client --token-file)",
    INVALID: "the token does not match the server's --auth-token-file",
}

_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def token_digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def token_problem(
    metadata: Sequence[tuple[str, str | bytes]] | None, expected: bytes
) -> str | None:
    """None when ``metadata`` carries the bearer token whose SHA-256 is ``expected``, else
    ``MISSING`` (no ``authorization`` entry, another scheme, nothing after it) or ``INVALID``."""
    value = next((v for k, v in metadata or () if k == AUTH_METADATA_KEY), None)
    if value is None:
        return MISSING
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME or not token:
        return MISSING
    return None if hmac.compare_digest(token_digest(token), expected) else INVALID


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless a call carries the configured bearer token."""

    def __init__(
        self,
        token: str,
        observer: AccessObserver | None = None,
        exempt: tuple[str, ...] = EXEMPT_PREFIXES,
    ) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = token_digest(token)
        self._observer = observer
        self._exempt = exempt

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        problem = token_problem(metadata, self._expected)
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:  # unknown methods stay UNIMPLEMENTED
            return handler
        return self._refusal(handler, method.rsplit("/", 1)[-1], problem)

    def _refusal(
        self, handler: grpc.RpcMethodHandler, method: str, problem: str
    ) -> grpc.RpcMethodHandler:
        """A handler of the same kind as ``handler`` that logs and refuses the call."""

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            record = AccessRecord(method, self._observer)
            record.set(status=grpc.StatusCode.UNAUTHENTICATED.name, peer=context.peer())
            record.set(error=problem)
            record.log()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{problem}: {HINTS[problem]}")

        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def auth_interceptors(
    token: str, observer: AccessObserver | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for ``--auth-token-file``: none when ``token`` is empty."""
    return [BearerTokenInterceptor(token, observer)] if token else []
