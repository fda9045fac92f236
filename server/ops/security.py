"""Transport security for server and client: TLS, mutual TLS, and the bearer-token file.

Server: ``--tls-cert`` + ``--tls-key`` turn TLS on (``grpc.ssl_server_credentials``);
``--tls-client-ca`` additionally requires every client to present a certificate signed by that
CA (mutual TLS). ``--auth-token-file`` holds the bearer token ``server.ops.auth`` checks.
Client: ``ClientSecurity`` opens a TLS channel (``--tls-ca`` to trust a private CA,
``--tls-cert`` + ``--tls-key`` for mutual TLS, ``--tls-server-name`` to verify another name)
and sends the token as ``authorization: Bearer <token>`` metadata on every call.

Files are read and checked at start-up, so a wrong path or a key that does not match its
certificate ends ``rdn-serve`` / ``rdn-client`` with one line instead of a failed handshake
later. Tokens and keys never appear in a ``repr`` or a log line.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from server.config import SecurityConfig

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


class SecurityError(ValueError):
    """A TLS or token file is missing, unreadable or unusable; the message names the flag."""


# ------------------------------------------------------------------------------- files


def read_token(path: Path, flag: str = "--auth-token-file") -> str:
    """The bearer token in ``path``, surrounding whitespace stripped.

    Raises ``SecurityError`` when the file is missing, unreadable or empty, or when the token
    is not one word of visible ASCII (what a gRPC metadata value can carry).
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SecurityError(f"{flag} {path}: no such file; put the token in it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"{flag} {path}: cannot read it ({e})") from None
    if not token:
        raise SecurityError(f"{flag} {path}: the file is empty; put the token in it")
    if not all("!" <= c <= "~" for c in token):
        raise SecurityError(
            f"{flag} {path}: the token must be one word of visible ASCII characters (no spaces, "
            "line breaks or accents), e.g. the output of `openssl rand -hex 32`"
        )
    return token


def read_pem(path: Path, flag: str) -> bytes:
    """A PEM file's bytes; ``SecurityError`` when it is missing, unreadable or not PEM."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise SecurityError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def check_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> None:
    """Raise ``SecurityError`` unless ``key`` is the unencrypted private key of ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An empty password makes an encrypted key fail here instead of prompting on a tty.
        context.load_cert_chain(cert, key, password=b"")
    except (ssl.SSLError, OSError) as e:
        raise SecurityError(
            f"{cert_flag} {cert} / {key_flag} {key}: not a PEM certificate and its matching, "
            f"unencrypted private key ({e})"
        ) from None


def check_validity(path: Path, flag: str, now: datetime.datetime | None = None) -> None:
    """Raise ``SecurityError`` unless the first certificate in ``path`` is valid ``now``: TLS
    clients refuse an expired or not-yet-valid certificate, so a server started with one
    would fail every handshake."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cert = x509.load_pem_x509_certificate(read_pem(path, flag))
    except ValueError as e:
        raise SecurityError(f"{flag} {path}: not a PEM certificate ({e})") from None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > end:
        raise SecurityError(
            f"{flag} {path}: the certificate expired on {end:%Y-%m-%d %H:%M} UTC; renew it"
        )
    if now < start:
        raise SecurityError(
            f"{flag} {path}: the certificate is not valid before {start:%Y-%m-%d %H:%M} UTC "
            "(check the clock, or issue one valid now)"
        )


def check_ca(path: Path, flag: str) -> None:
    """Raise ``SecurityError`` unless ``path`` holds at least one PEM CA certificate."""
    read_pem(path, flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as e:
        raise SecurityError(f"{flag} {path}: not a PEM CA certificate ({e})") from None


# ------------------------------------------------------------------------------- server


def check_server_security(security: SecurityConfig) -> None:
    """Flag combinations and TLS files, checked before anything starts."""
    if (security.tls_cert is None) != (security.tls_key is None):
        raise SecurityError("--tls-cert and --tls-key go together; give both or neither")
    if security.tls_client_ca is not None and security.tls_cert is None:
        raise SecurityError(
            "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs on top of TLS"
        )
    if security.tls_cert is not None and security.tls_key is not None:
        read_pem(security.tls_cert, "--tls-cert")
        read_pem(security.tls_key, "--tls-key")
        check_key_pair(security.tls_cert, security.tls_key, "--tls-cert", "--tls-key")
        check_validity(security.tls_cert, "--tls-cert")
    if security.tls_client_ca is not None:
        check_ca(security.tls_client_ca, "--tls-client-ca")


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port; None for plaintext. Raises ``SecurityError``."""
    check_server_security(security)
    if security.tls_cert is None or security.tls_key is None:
        return None
    cert = read_pem(security.tls_cert, "--tls-cert")
    key = read_pem(security.tls_key, "--tls-key")
    client_ca = (
        None
        if security.tls_client_ca is None
        else read_pem(security.tls_client_ca, "--tls-client-ca")
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(server: grpc.aio.Server, address: str, security: SecurityConfig) -> int:
    """Bind ``address`` with TLS when configured; the bound port (0 when binding failed)."""
    credentials = server_credentials(security)
    if credentials is not None:
        return server.add_secure_port(address, credentials)
    if security.auth_token:
        log.warning(
            "bearer-token auth without TLS: tokens cross the network in clear text; add "
            "--tls-cert/--tls-key unless only loopback or a TLS-terminating proxy reaches %s",
            address,
        )
    return server.add_insecure_port(address)


def describe(security: SecurityConfig) -> str:
    """A few words for the start-up line, e.g. "mTLS, token auth"; never the token."""
    transport = (
        "plaintext"
        if not security.tls
        else ("mTLS" if security.tls_client_ca is not None else "TLS")
    )
    return f"{transport}, token auth" if security.auth_token else transport


# ------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server: plaintext (the default) or TLS, with or without a
    client certificate, and an optional bearer token sent with every call."""

    tls: bool = False
    root_ca: bytes | None = None  # PEM CA(s) to verify the server; None = the system roots
    cert_chain: bytes | None = None  # PEM client certificate (mutual TLS)
    private_key: bytes | None = field(default=None, repr=False)  # its PEM private key
    server_name: str | None = None  # verify this name instead of the target's host
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise SecurityError("a client certificate needs its private key: give both or neither")
        tls_only = (self.root_ca, self.cert_chain, self.server_name)
        if not self.tls and any(v is not None for v in tls_only):
            raise SecurityError("a CA, client certificate or server name needs TLS (tls=True)")
        if self.token is not None and not (self.token and all("!" <= c <= "~" for c in self.token)):
            raise SecurityError("the token must be one word of visible ASCII characters")

    @classmethod
    def from_files(
        cls,
        *,
        tls: bool = False,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
        token_file: Path | None = None,
    ) -> ClientSecurity:
        """From ``rdn-client`` flags: any of ``ca``, ``cert``, ``server_name`` implies TLS."""
        if (cert is None) != (key is None):
            raise SecurityError("--tls-cert and --tls-key go together; give both or neither")
        if cert is not None and key is not None:
            check_key_pair(cert, key, "--tls-cert", "--tls-key")
        if ca is not None:
            check_ca(ca, "--tls-ca")
        use_tls = tls or ca is not None or cert is not None or server_name is not None
        token = None if token_file is None else read_token(token_file, "--token-file")
        if token is not None and not use_tls:
            log.warning("--token-file without TLS: the token crosses the network in clear text")
        return cls(
            tls=use_tls,
            root_ca=None if ca is None else read_pem(ca, "--tls-ca"),
            cert_chain=None if cert is None else read_pem(cert, "--tls-cert"),
            private_key=None if key is None else read_pem(key, "--tls-key"),
            server_name=server_name,
            token=token,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for every call: the bearer token, when there is one."""
        return () if self.token is None else ((AUTH_METADATA_KEY, f"Bearer {self.token}"),)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [] if self.server_name is None else [(TARGET_NAME_OPTION, self.server_name)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )

    def channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to ``target``."""
        options = [*options, *self.channel_options()]
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def aio_channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``target``."""
        options = [*options, *self.channel_options()]
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)


PLAINTEXT = ClientSecurity()  # no TLS, no token: the clients' default


# ------------------------------------------------------------------------- command lines


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """rdn-serve's TLS / mTLS / token flags."""
    group = parser.add_argument_group("security (default: plaintext, no auth)")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain; turns TLS on")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: require client certificates it signed (mutual TLS)",
    )
    group.add_argument(
        "--auth-token-file",
        type=Path,
        help="file holding a bearer token every call must send (health checks exempt)",
    )


def security_config_from_args(args: argparse.Namespace) -> SecurityConfig:
    """The SecurityConfig the flags describe; reads the token, checks the TLS files.

    Raises ``SecurityError`` (a ``ValueError``) with one line that names the flag.
    """
    security = SecurityConfig(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token="" if args.auth_token_file is None else read_token(args.auth_token_file),
    )
    check_server_security(security)
    return security


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    """rdn-client's TLS / mTLS / token flags."""
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system CAs (implied by --tls-*)"
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-server-name",
        help="name to verify in the server's certificate (default: target host)",
    )
    parser.add_argument(
        "--token-file", type=Path, help="file holding the bearer token sent with every call"
    )


def client_security_from_args(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity.from_files(
        tls=args.tls,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        server_name=args.tls_server_name,
        token_file=args.token_file,
    )


def server_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP port from the gRPC flags (``--tls-cert``, ``--tls-key``,
    ``--tls-client-ca``); None for plaintext."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(security.tls_cert, security.tls_key)
    if security.tls_client_ca is not None:
        context.load_verify_locations(cafile=security.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
