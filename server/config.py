"""Server configuration: frozen dataclasses, one source of truth for every serving knob."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rdn.constants import DEFAULT_SCALE
from rdn.onnx_session import SessionConfig
from server.wire import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class EngineConfig(SessionConfig):
    """How the onnxruntime session is created (``rdn.onnx_session.SessionConfig``: one set of
    defaults for every opener) and run."""

    io_binding: bool = True  # used only when CUDA is active


@dataclass(frozen=True)
class TilingConfig:
    """How images are cut into tiles (server/core/planner.py), in LR pixels."""

    tile: int = 64  # grid plans: LR core size; also the queue unit, (tile + 2*pad)**2 pixels
    pad: int = 8  # LR context at seams: tiled == whole-image within 1/255 (bench)
    mode: str = "auto"  # fit (tiles fitted to the image), buckets, grid; auto: fit on CPU,
    # buckets on CUDA
    max_tile_pixels: int = 0  # fit plans: largest tile; 0 = the planner's default
    buckets: tuple[int, ...] = (64, 128, 256)  # bucket plans: LR core sizes (window + 2*pad)


@dataclass(frozen=True)
class BatcherConfig:
    """Cross-request tile batching."""

    max_batch: int = 0  # tiles per engine call; 0 = by provider (1 on CPU, 8 on CUDA)
    max_delay_ms: float = 2.0
    max_queue_tiles: int = 4096


@dataclass(frozen=True)
class LimitsConfig:
    """Request size limits, checked before pixels are allocated."""

    max_pixels: int = 16_777_216 + 1  # 4096x4096 inputs allowed
    max_request_bytes: int = 64 * 2**20
    max_message_bytes: int = MAX_MESSAGE_BYTES  # gRPC message limit, both directions, one flag


@dataclass(frozen=True)
class UploadConfig:
    """What request bytes may be held at once, and for how long an upload may take.

    Request bytes are reserved when a call announces them (a stream's header, a unary message
    as it arrives) and freed when the call ends; memory grows only with bytes received.
    """

    idle_timeout_s: float = 30.0  # longest pause between two messages of one upload
    deadline_s: float = 300.0  # longest whole upload, header to last byte
    max_concurrent: int = 16  # uploads (UpscaleStream, HTTP bodies) in progress at once
    max_buffered_bytes: int = 256 * 2**20  # request bytes held by all calls together
    # After the first idle_timeout_s, an upload must average this many bytes/s (0 = no minimum)
    min_rate_bytes_s: float = 16 * 2**10


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and caller authentication; everything off by default (plaintext)."""

    tls_cert: Path | None = None  # PEM certificate chain; with tls_key turns TLS on
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a cert it signed
    auth_token: str = field(default="", repr=False)  # bearer token ("" = no auth); never logged

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus HTTP endpoint."""

    port: int | None = None  # None = off; 0 = any free port (tests read the bound one)
    host: str = "127.0.0.1"  # scrapes come from this machine unless --metrics-host says so
    idle_timeout_s: float = 10.0  # a silent HTTP connection is closed (it holds a thread)


@dataclass(frozen=True)
class HttpLimitsConfig:
    """Connection limits of the HTTP door (``--http-port``)."""

    # A connection must send a complete request head within this many seconds of opening or
    # of its previous answer, else it is closed (slow heads and idle keep-alive alike)
    idle_timeout_s: float = 5.0
    # Open HTTP connections; more are closed at once. Lowered at start to leave descriptors
    # for gRPC and files (server/doors/http_limits.py)
    max_connections: int = 512


@dataclass(frozen=True)
class CrossSiteConfig:
    """Which web pages and Host names the HTTP door answers (server/doors/cross_site.py)."""

    cors_origins: tuple[str, ...] = ()  # pages of these origins may call it (CORS); none by default
    allowed_hosts: tuple[str, ...] = ()  # without a token: Host names answered besides localhost,
    # IP addresses and the bound host


@dataclass(frozen=True)
class ServerConfig:
    """Everything rdn-serve needs to run."""

    model: Path | None = None  # the server default model (None: the default of default_scale)
    models: tuple[Path, ...] = ()  # more model files served beside it
    model_dir: Path | None = None  # every *.onnx in it is served too
    defaults: tuple[str, ...] = ()  # model names made the default of their scale
    default_scale: int = DEFAULT_SCALE  # without ``model``: whose default answers plain requests
    precision: str = "auto"  # which twin a scale's default is (RepositoryConfig.precision)
    host: str = "0.0.0.0"
    port: int = 50051
    grace_s: float = 10.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    uploads: UploadConfig = field(default_factory=UploadConfig)
    decode_workers: int = 2  # threads that decode and encode images: bounds their memory
    log_level: str = "INFO"
    log_json: bool = False
    self_ensemble: bool = False
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http_port: int | None = None  # the HTTP front door; None = off, 0 = any free port
    http_limits: HttpLimitsConfig = field(default_factory=HttpLimitsConfig)
    http_host: str | None = None  # its address; None = 127.0.0.1, or ``host`` with a token
    cross_site: CrossSiteConfig = field(default_factory=CrossSiteConfig)
