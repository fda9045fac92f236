"""TLS, mutual TLS and bearer-token auth on real loopback servers with throw-away certificates.

The certificates are made per module with ``cryptography``: a CA, a server certificate for
localhost / 127.0.0.1, a client certificate from the same CA, and a second CA (with its own
client certificate) that nobody here trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.app import ServerStartError
from server.client import RetryPolicy, UpscaleClient, UpscaleError
from server.config import EngineConfig, SecurityConfig, ServerConfig, TilingConfig
from server.core.engine import Engine
from server.main import build_parser, config_from_args
from server.ops.auth import INVALID, MISSING, token_digest, token_problem
from server.ops.logging_setup import JsonFormatter, TextFormatter
from server.ops.security import ClientSecurity, SecurityError, read_token
from tests.background import BackgroundServer

TOKEN = "tok-3f9a1c77d2e84b05a6c1"  # distinctive, so a leak into a log line is found
WRONG_TOKEN = "tok-wrong-0000000000000"
CPU = EngineConfig(providers=("CPUExecutionProvider",))
NO_RETRY = RetryPolicy(max_attempts=1)
CALL_TIMEOUT = 30.0  # seconds: a refused handshake fails fast; a hang fails the test
RDN_CLIENT = Path(sys.executable).with_name("rdn-client")
RDN_SERVE = Path(sys.executable).with_name("rdn-serve")


# ------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    valid: tuple[datetime.timedelta, datetime.timedelta] = (
        datetime.timedelta(minutes=-5),
        datetime.timedelta(days=1),
    ),
) -> x509.CertificateBuilder:
    """A certificate builder valid from now + valid[0] to now + valid[1]."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid[0])
        .not_valid_after(now + valid[1])
    )


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], common_name: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(
    folder: Path, stem: str, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("rdn test CA"), make_ca("unrelated CA")
    ca_path, _ = write_pem(folder, "ca", None, ca[1])
    other_path, _ = write_pem(folder, "other-ca", None, other[1])
    server_cert, server_key = write_pem(folder, "server", *make_leaf(ca, "localhost", True))
    client_cert, client_key = write_pem(folder, "client", *make_leaf(ca, "client", False))
    stray_cert, stray_key = write_pem(folder, "stray", *make_leaf(other, "stray", False))
    return Pki(
        ca_path, server_cert, server_key, client_cert, client_key, other_path, stray_cert, stray_key
    )


# ------------------------------------------------------------------------------ servers


def server_config(model: Path, security: SecurityConfig) -> ServerConfig:
    return ServerConfig(
        model=model,
        host="127.0.0.1",
        port=0,
        grace_s=1.0,
        engine=CPU,
        tiling=TilingConfig(mode="grid", tile=32, pad=4),
        security=security,
    )


@pytest.fixture(scope="module")
def engine(tiny_onnx_x2: Path) -> Engine:
    return Engine(tiny_onnx_x2, CPU)


@pytest.fixture(scope="module")
def tls_server(tiny_onnx_x2: Path, engine: Engine, pki: Pki) -> Iterator[BackgroundServer]:
    """TLS and token auth."""
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token=TOKEN)
    with BackgroundServer(server_config(tiny_onnx_x2, security), engine) as bg:
        yield bg


@pytest.fixture(scope="module")
def mtls_server(tiny_onnx_x2: Path, engine: Engine, pki: Pki) -> Iterator[BackgroundServer]:
    """Mutual TLS, no token."""
    security = SecurityConfig(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with BackgroundServer(server_config(tiny_onnx_x2, security), engine) as bg:
        yield bg


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"  {TOKEN}\n")  # surrounding whitespace is stripped
    return path


def info_error(target: str, security: ClientSecurity) -> UpscaleError | None:
    """The error of one GetModelInfo call, or None when it succeeded."""
    with UpscaleClient(target, retry=NO_RETRY, security=security) as client:
        try:
            assert client.info(timeout=CALL_TIMEOUT).scale == 2
        except UpscaleError as e:
            return e
    return None


def tls(pki: Pki, **changes: object) -> ClientSecurity:
    fields: dict[str, object] = {"tls": True, "root_ca": pki.ca.read_bytes(), "token": TOKEN}
    fields.update(changes)
    return ClientSecurity(**fields)  # type: ignore[arg-type]


def assert_unavailable(error: UpscaleError | None) -> None:
    assert error is not None, "the call should have been refused"
    assert error.code == grpc.StatusCode.UNAVAILABLE, error


# -------------------------------------------------------------------------------- TLS


def test_tls_needs_a_tls_client_that_trusts_the_right_ca(
    tls_server: BackgroundServer, pki: Pki
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    assert_unavailable(info_error(target, ClientSecurity(token=TOKEN)))  # plaintext client
    assert_unavailable(info_error(target, tls(pki, root_ca=pki.other_ca.read_bytes())))
    assert info_error(target, tls(pki)) is None
    assert info_error(f"localhost:{tls_server.port}", tls(pki)) is None


def test_server_name_override_is_what_gets_verified(tls_server: BackgroundServer, pki: Pki) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    assert info_error(target, tls(pki, server_name="localhost")) is None
    assert_unavailable(info_error(target, tls(pki, server_name="other.example")))


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(
    mtls_server: BackgroundServer, pki: Pki
) -> None:
    target = f"127.0.0.1:{mtls_server.port}"
    no_token = {"token": None}
    assert_unavailable(info_error(target, tls(pki, **no_token)))  # no client certificate
    stray = tls(
        pki,
        cert_chain=pki.other_client_cert.read_bytes(),
        private_key=pki.other_client_key.read_bytes(),
        **no_token,
    )
    assert_unavailable(info_error(target, stray))
    mine = ClientSecurity.from_files(
        ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_name="localhost"
    )
    assert info_error(target, mine) is None


# ----------------------------------------------------------------------- bearer tokens


def test_token_problems_pure() -> None:
    expected = token_digest(TOKEN)
    assert token_problem([("authorization", f"Bearer {TOKEN}")], expected) is None
    assert token_problem([("authorization", f"bearer  {TOKEN} ")], expected) is None
    assert token_problem(None, expected) == MISSING
    assert token_problem([("x-other", TOKEN)], expected) == MISSING
    assert token_problem([("authorization", f"Basic {TOKEN}")], expected) == MISSING
    assert token_problem([("authorization", "Bearer ")], expected) == MISSING
    assert token_problem([("authorization", f"Bearer {WRONG_TOKEN}")], expected) == INVALID
    assert token_problem([("authorization", f"Bearer {TOKEN}x")], expected) == INVALID


def test_calls_need_the_right_token_and_logs_never_show_it(
    tls_server: BackgroundServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    caplog.set_level(logging.DEBUG)
    missing = info_error(target, tls(pki, token=None))
    wrong = info_error(target, tls(pki, token=WRONG_TOKEN))
    with UpscaleClient(target, retry=NO_RETRY, security=tls(pki, token=None)) as anonymous:
        with pytest.raises(UpscaleError) as streamed:  # a client-streaming method
            anonymous.upscale(b"\x89PNG....", stream=True, timeout=CALL_TIMEOUT)
        assert anonymous.health(timeout=CALL_TIMEOUT) == "SERVING"  # probes need no token
    with UpscaleClient(target, retry=NO_RETRY, security=tls(pki)) as client:
        image = np.full((20, 24, 3), 128, np.uint8)
        for stream in (False, True):
            result = client.upscale(image, "raw", timeout=CALL_TIMEOUT, stream=stream)
            assert result.to_array().shape == (40, 48, 3)

    assert missing is not None and missing.code == grpc.StatusCode.UNAUTHENTICATED
    assert missing.details.startswith("missing bearer token")
    assert wrong is not None and wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.details.startswith("invalid bearer token")
    assert streamed.value.code == grpc.StatusCode.UNAUTHENTICATED

    refused = [
        r.fields for r in caplog.records if r.name == "rdn.access" and r.fields["status"] != "OK"
    ]
    assert [(f["method"], f["error"]) for f in refused] == [
        ("GetModelInfo", "missing bearer token"),
        ("GetModelInfo", "invalid bearer token"),
        ("UpscaleStream", "missing bearer token"),
    ]
    assert all(str(f["peer"]).startswith("ipv4:127.0.0.1:") for f in refused)
    assert caplog.records
    for record in caplog.records:
        for formatter in (JsonFormatter(), TextFormatter()):
            line = formatter.format(record)
            assert TOKEN not in line and WRONG_TOKEN not in line


def test_reflection_needs_the_token(tls_server: BackgroundServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.secure_channel(f"localhost:{tls_server.port}", credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT))
        auth = (("authorization", f"Bearer {TOKEN}"),)
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT, metadata=auth)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    names = {s.name for s in answer.list_services_response.service}
    assert "rdn.v1.Upscaler" in names


# ---------------------------------------------------------------------- command lines


def run(command: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    base = [str(command)] if command.exists() else [sys.executable, "-m", module]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, check=False)


def test_rdn_client_cli_with_tls_ca_and_token_file(
    tls_server: BackgroundServer, pki: Pki, token_file: Path, set5_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.png"
    crop = cv2.imread(str(set5_dir / "bird.png"), cv2.IMREAD_COLOR)[:20, :24]
    assert cv2.imwrite(str(source), crop)
    secure = (
        "--target", f"127.0.0.1:{tls_server.port}", "--tls-ca", str(pki.ca),
        "--tls-server-name", "localhost", "--retries", "0", "--deadline", "30",
    )  # fmt: skip
    done = run(
        RDN_CLIENT, "server.client", "upscale", str(source), "-o", str(tmp_path / "out.png"),
        *secure, "--token-file", str(token_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cv2.imread(str(tmp_path / "out.png")).shape == (40, 48, 3)

    refused = run(RDN_CLIENT, "server.client", "info", *secure)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "UNAUTHENTICATED: missing bearer token" in lines[0], lines
    assert "Traceback" not in refused.stderr


def test_flags_build_the_security_config(tiny_onnx_x2: Path, pki: Pki, token_file: Path) -> None:
    parse = build_parser().parse_args
    model = ("--model", str(tiny_onnx_x2))
    assert config_from_args(parse([*model])).security == SecurityConfig()
    full = config_from_args(
        parse([
            *model, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca), "--auth-token-file", str(token_file),
        ])
    )  # fmt: skip
    assert full.security == SecurityConfig(pki.server_cert, pki.server_key, pki.ca, TOKEN)
    assert TOKEN not in repr(full)
    for flags, needle in [
        (["--tls-cert", str(pki.server_cert)], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki.ca)], "--tls-client-ca needs --tls-cert"),
        (["--auth-token-file", str(pki.ca.parent / "nope")], "no such file"),
        (["--tls-cert", str(pki.ca), "--tls-key", str(pki.client_key)], "matching"),
    ]:
        with pytest.raises(SecurityError, match=needle):
            config_from_args(parse([*model, *flags]))


def test_token_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n  \n")
    with pytest.raises(SecurityError, match="empty"):
        read_token(path)
    path.write_text("two words\n")
    with pytest.raises(SecurityError, match="one word"):
        read_token(path)
    path.write_text("abc123\n")
    assert read_token(path) == "abc123"


def test_rdn_serve_refuses_an_empty_token_file_with_one_line(
    tiny_onnx_x2: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    done = run(
        RDN_SERVE, "server.main", "--model", str(tiny_onnx_x2), "--port", "0",
        "--host", "127.0.0.1", "--auth-token-file", str(empty),
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--auth-token-file" in lines[0] and "empty" in lines[0], lines
    assert "listening on" not in done.stderr and "Traceback" not in done.stderr


def test_build_server_reports_unusable_tls_files(
    tiny_onnx_x2: Path, engine: Engine, pki: Pki
) -> None:
    wrong_key = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.client_key)
    with pytest.raises(ServerStartError, match="matching"):
        BackgroundServer(server_config(tiny_onnx_x2, wrong_key), engine).start()


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "valid,message",
    [((-3 * DAY, -DAY), "the certificate expired on"), ((DAY, 3 * DAY), "is not valid before")],
    ids=["expired", "not yet valid"],
)
def test_rdn_serve_refuses_a_certificate_outside_its_dates_with_one_line(
    tiny_onnx_x2: Path, tmp_path: Path, valid: tuple[datetime.timedelta, ...], message: str
) -> None:
    """rdn-serve started with an expired certificate without a word; every handshake failed."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _builder("localhost", _name("localhost"), key, valid).sign(key, hashes.SHA256())
    cert_path, key_path = write_pem(tmp_path, "dated", key, cert)
    done = run(
        RDN_SERVE, "server.main", "--model", str(tiny_onnx_x2), "--port", "0",
        "--host", "127.0.0.1", "--tls-cert", str(cert_path), "--tls-key", str(key_path),
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert" in lines[0] and message in lines[0], lines
    assert "listening on" not in done.stderr and "Traceback" not in done.stderr
