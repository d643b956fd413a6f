"""Optional TLS and bearer-token authentication (both off by default).

TLS: ``--tls-cert server.pem --tls-key server.key`` serves over TLS; clients pass the CA (or the
self-signed certificate) with ``--tls-ca``. Without them the server speaks plaintext, which is only
sensible on localhost or inside a private network.

Tokens: ``--auth-token TOKEN`` or ``--auth-token-file PATH`` (or ``SASREC_AUTH_TOKEN``) makes every call
except the gRPC health check carry ``authorization: Bearer TOKEN`` metadata, otherwise it fails with
UNAUTHENTICATED. The health service stays open so orchestrators can probe it without the secret.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from pipelines.errors import InputError

TOKEN_ENV = "SASREC_AUTH_TOKEN"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(token: str | None, token_file: str | None, *, env: bool = True) -> str | None:
    if token and token_file:
        raise InputError("give --auth-token or --auth-token-file, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"--auth-token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise InputError(f"--auth-token-file {token_file}: file is empty")
    if not token and env:
        token = os.environ.get(TOKEN_ENV) or None
    return token


def server_credentials(cert: str | None, key: str | None):
    """TLS credentials from PEM files, or None for plaintext."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    except OSError as exc:
        raise InputError(f"{exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([pair])


def _deny(handler, message: str):
    """A handler of the same streaming kind as ``handler`` that fails with UNAUTHENTICATED."""
    if handler is None:
        return None

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (constant-time comparison)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        self._expected = f"Bearer {token}".encode()
        self._open = open_prefixes

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return continuation(handler_call_details)
                return _deny(continuation(handler_call_details), "invalid bearer token")
        return _deny(
            continuation(handler_call_details),
            "missing authorization metadata (expected 'authorization: Bearer <token>')",
        )
