"""Metadata keys of the rdn.v1 wire contract that server and client share (one definition)."""

from __future__ import annotations

# Trailer on a transient refusal (full queue, upload budget spent): milliseconds to wait.
RETRY_AFTER_KEY = "rdn-retry-after-ms"
# Initial metadata of UpscaleStream once the header passed every check and its bytes are held:
# a client may wait for it before uploading, so a refused upload sends no data.
UPLOAD_ACCEPTED_KEY = "rdn-upload-accepted"
# HTTP/2 frames of up to 4 MiB (the default is 16 KiB) on both ends: a 380 KB answer made a
# loopback round trip of 3.3 ms with the default and 2.5 ms with this (a bare aio echo server).
HTTP2_MAX_FRAME_BYTES = 4 * 2**20
