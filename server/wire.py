"""Metadata keys of the rdn.v1 wire contract that server and client share (one definition)."""

from __future__ import annotations

# Trailer on a transient refusal (full queue, upload budget spent): milliseconds to wait.
RETRY_AFTER_KEY = "rdn-retry-after-ms"
# Initial metadata of UpscaleStream once the header passed every check and its bytes are held:
# a client may wait for it before uploading, so a refused upload sends no data.
UPLOAD_ACCEPTED_KEY = "rdn-upload-accepted"
