"""Constants of the wire contracts that server and client share (one definition): metadata
keys, the output format table, the service name."""

from __future__ import annotations

from server.pb.rdn.v1 import upscale_pb2

SERVICE_NAME = "rdn.v1.Upscaler"
AUTO_MODEL = "auto"  # model=auto: the clean or the photo model of the scale, by the input
DEFAULT_QUALITY = 95  # the proto's meaning of quality 0 for JPEG / WebP / AVIF
FORMATS: dict[int, str] = {  # OutputFormat -> codec format name
    upscale_pb2.OUTPUT_FORMAT_UNSPECIFIED: "auto",  # an animation's own kind, else PNG
    upscale_pb2.OUTPUT_FORMAT_PNG: "png",
    upscale_pb2.OUTPUT_FORMAT_JPEG: "jpeg",
    upscale_pb2.OUTPUT_FORMAT_WEBP: "webp",
    upscale_pb2.OUTPUT_FORMAT_RAW: "raw",
    upscale_pb2.OUTPUT_FORMAT_AVIF: "avif",
    upscale_pb2.OUTPUT_FORMAT_GIF: "gif",
    upscale_pb2.OUTPUT_FORMAT_TIFF: "tiff",
}
FORMAT_NUMBERS: dict[str, int] = {  # format name (as users type it) -> OutputFormat
    "png": upscale_pb2.OUTPUT_FORMAT_PNG,
    "jpeg": upscale_pb2.OUTPUT_FORMAT_JPEG,
    "jpg": upscale_pb2.OUTPUT_FORMAT_JPEG,
    "webp": upscale_pb2.OUTPUT_FORMAT_WEBP,
    "raw": upscale_pb2.OUTPUT_FORMAT_RAW,
    "avif": upscale_pb2.OUTPUT_FORMAT_AVIF,
    "gif": upscale_pb2.OUTPUT_FORMAT_GIF,
    "tiff": upscale_pb2.OUTPUT_FORMAT_TIFF,
    "tif": upscale_pb2.OUTPUT_FORMAT_TIFF,
}
ACCEPTED_FORMATS = (
    "0 UNSPECIFIED (= PNG, an animation's own kind), 1 PNG, 2 JPEG, 3 WEBP, 4 RAW, 20 AVIF, "
    "21 GIF, 22 TIFF"
)
ALPHA_MODES: dict[int, str] = {  # AlphaMode -> alpha mode name ("" = the server's default)
    upscale_pb2.ALPHA_MODE_UNSPECIFIED: "",
    upscale_pb2.ALPHA_MODE_MODEL: "model",
    upscale_pb2.ALPHA_MODE_BICUBIC: "bicubic",
}
ALPHA_NUMBERS: dict[str, int] = {name: number for number, name in ALPHA_MODES.items()}
MAX_MESSAGE_BYTES = 8 * 2**20  # gRPC message limit, both directions: server and client default
RESPONSE_OVERHEAD_BYTES = 4096  # room in a message for the response fields besides the data

# Trailer on a transient refusal (full queue, upload budget spent): milliseconds to wait.
RETRY_AFTER_KEY = "rdn-retry-after-ms"
# Initial metadata of UpscaleStream once the header passed every check and its bytes are held:
# a client may wait for it before uploading, so a refused upload sends no data.
UPLOAD_ACCEPTED_KEY = "rdn-upload-accepted"
# HTTP/2 frames of up to 4 MiB (the default is 16 KiB) on both ends: a 380 KB answer made a
# loopback round trip of 3.3 ms with the default and 2.5 ms with this (a bare aio echo server).
HTTP2_MAX_FRAME_BYTES = 4 * 2**20
# HTTP methods the HTTP door names in metrics and the access log; others are counted as OTHER.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT")
