from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAW: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_AVIF: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_GIF: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_TIFF: _ClassVar[OutputFormat]

class AlphaMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALPHA_MODE_UNSPECIFIED: _ClassVar[AlphaMode]
    ALPHA_MODE_MODEL: _ClassVar[AlphaMode]
    ALPHA_MODE_BICUBIC: _ClassVar[AlphaMode]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
OUTPUT_FORMAT_RAW: OutputFormat
OUTPUT_FORMAT_AVIF: OutputFormat
OUTPUT_FORMAT_GIF: OutputFormat
OUTPUT_FORMAT_TIFF: OutputFormat
ALPHA_MODE_UNSPECIFIED: AlphaMode
ALPHA_MODE_MODEL: AlphaMode
ALPHA_MODE_BICUBIC: AlphaMode

class ImageShape(_message.Message):
    __slots__ = ("height", "width", "channels")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: ImageShape
    data: bytes
    def __init__(self, shape: _Optional[_Union[ImageShape, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpscaleRequest(_message.Message):
    __slots__ = ("encoded", "raw", "output_format", "quality", "request_id", "model", "scale", "target_width", "target_height", "outscale", "convert_to_srgb", "strip_metadata", "alpha")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTSCALE_FIELD_NUMBER: _ClassVar[int]
    CONVERT_TO_SRGB_FIELD_NUMBER: _ClassVar[int]
    STRIP_METADATA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    output_format: OutputFormat
    quality: int
    request_id: str
    model: str
    scale: int
    target_width: int
    target_height: int
    outscale: float
    convert_to_srgb: bool
    strip_metadata: bool
    alpha: AlphaMode
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., quality: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., scale: _Optional[int] = ..., target_width: _Optional[int] = ..., target_height: _Optional[int] = ..., outscale: _Optional[float] = ..., convert_to_srgb: _Optional[bool] = ..., strip_metadata: _Optional[bool] = ..., alpha: _Optional[_Union[AlphaMode, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class UpscaleResponse(_message.Message):
    __slots__ = ("image", "width", "height", "channels", "scale", "format", "timings", "request_id", "tiles", "total_bytes", "model", "resized", "model_reason", "notes", "frames")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESIZED_FIELD_NUMBER: _ClassVar[int]
    MODEL_REASON_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    width: int
    height: int
    channels: int
    scale: int
    format: OutputFormat
    timings: Timings
    request_id: str
    tiles: int
    total_bytes: int
    model: str
    resized: bool
    model_reason: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    frames: int
    def __init__(self, image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., scale: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., tiles: _Optional[int] = ..., total_bytes: _Optional[int] = ..., model: _Optional[str] = ..., resized: _Optional[bool] = ..., model_reason: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., frames: _Optional[int] = ...) -> None: ...

class UpscaleStreamHeader(_message.Message):
    __slots__ = ("raw_shape", "total_bytes", "output_format", "quality", "request_id", "model", "scale", "target_width", "target_height", "outscale", "progress", "convert_to_srgb", "strip_metadata", "alpha")
    RAW_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTSCALE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CONVERT_TO_SRGB_FIELD_NUMBER: _ClassVar[int]
    STRIP_METADATA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    raw_shape: ImageShape
    total_bytes: int
    output_format: OutputFormat
    quality: int
    request_id: str
    model: str
    scale: int
    target_width: int
    target_height: int
    outscale: float
    progress: bool
    convert_to_srgb: bool
    strip_metadata: bool
    alpha: AlphaMode
    def __init__(self, raw_shape: _Optional[_Union[ImageShape, _Mapping]] = ..., total_bytes: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., quality: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., scale: _Optional[int] = ..., target_width: _Optional[int] = ..., target_height: _Optional[int] = ..., outscale: _Optional[float] = ..., progress: _Optional[bool] = ..., convert_to_srgb: _Optional[bool] = ..., strip_metadata: _Optional[bool] = ..., alpha: _Optional[_Union[AlphaMode, str]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("tiles_done", "tiles_total")
    TILES_DONE_FIELD_NUMBER: _ClassVar[int]
    TILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    tiles_done: int
    tiles_total: int
    def __init__(self, tiles_done: _Optional[int] = ..., tiles_total: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpscaleChunk(_message.Message):
    __slots__ = ("header", "result", "data", "progress")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    header: UpscaleStreamHeader
    result: UpscaleResponse
    data: DataChunk
    progress: Progress
    def __init__(self, header: _Optional[_Union[UpscaleStreamHeader, _Mapping]] = ..., result: _Optional[_Union[UpscaleResponse, _Mapping]] = ..., data: _Optional[_Union[DataChunk, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelArchitecture(_message.Message):
    __slots__ = ("g0", "d", "c", "g", "norm")
    G0_FIELD_NUMBER: _ClassVar[int]
    D_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    g0: int
    d: int
    c: int
    g: int
    norm: str
    def __init__(self, g0: _Optional[int] = ..., d: _Optional[int] = ..., c: _Optional[int] = ..., g: _Optional[int] = ..., norm: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "scale", "architecture", "precision", "weights_sha256", "training_step", "execution_provider", "providers", "tile_size", "tile_pad", "max_batch", "max_delay_ms", "max_queue_tiles", "max_pixels", "max_request_bytes", "max_message_bytes", "input_formats", "output_formats", "self_ensemble", "tiling", "max_tile_pixels", "intra_op_threads", "decode_workers", "max_uploads", "max_buffered_bytes", "ort_spinning", "ort_cpu_arena", "tile_windows", "is_default", "server_default", "file", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEP_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_PAD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TILES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    SELF_ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    MAX_TILE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ORT_SPINNING_FIELD_NUMBER: _ClassVar[int]
    ORT_CPU_ARENA_FIELD_NUMBER: _ClassVar[int]
    TILE_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SERVER_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: int
    architecture: ModelArchitecture
    precision: str
    weights_sha256: str
    training_step: int
    execution_provider: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    tile_size: int
    tile_pad: int
    max_batch: int
    max_delay_ms: float
    max_queue_tiles: int
    max_pixels: int
    max_request_bytes: int
    max_message_bytes: int
    input_formats: _containers.RepeatedScalarFieldContainer[str]
    output_formats: _containers.RepeatedScalarFieldContainer[OutputFormat]
    self_ensemble: bool
    tiling: str
    max_tile_pixels: int
    intra_op_threads: int
    decode_workers: int
    max_uploads: int
    max_buffered_bytes: int
    ort_spinning: bool
    ort_cpu_arena: bool
    tile_windows: _containers.RepeatedScalarFieldContainer[int]
    is_default: bool
    server_default: bool
    file: str
    version: int
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[int] = ..., architecture: _Optional[_Union[ModelArchitecture, _Mapping]] = ..., precision: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., training_step: _Optional[int] = ..., execution_provider: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., tile_size: _Optional[int] = ..., tile_pad: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_queue_tiles: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., input_formats: _Optional[_Iterable[str]] = ..., output_formats: _Optional[_Iterable[_Union[OutputFormat, str]]] = ..., self_ensemble: _Optional[bool] = ..., tiling: _Optional[str] = ..., max_tile_pixels: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., decode_workers: _Optional[int] = ..., max_uploads: _Optional[int] = ..., max_buffered_bytes: _Optional[int] = ..., ort_spinning: _Optional[bool] = ..., ort_cpu_arena: _Optional[bool] = ..., tile_windows: _Optional[_Iterable[int]] = ..., is_default: _Optional[bool] = ..., server_default: _Optional[bool] = ..., file: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
