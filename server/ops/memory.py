"""Process memory policy of ``rdn-serve``: resident memory follows the live requests.

Requests carry buffers of a few MiB (encoded images, raw pixels, tile batches) that live for one
call. glibc's malloc serves blocks over its mmap threshold (128 KiB at start) with ``mmap`` and
returns them to the system on ``free``, but it raises that threshold to the size of every mmapped
block freed (up to 32 MiB): after the first few large requests, their buffers come from the heap
and freed heap memory is kept, so RSS climbs to a high-water mark of fragments (measured: +63 MiB
over 2000 hostile requests; with the threshold pinned, +15 MiB and no trend, see
tests/server/doors/test_hostile.py). Pinning the threshold keeps large buffers mmapped.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt() parameter number, glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 2**10  # glibc's initial value, now fixed instead of adaptive
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: an explicit choice wins


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc malloc's mmap threshold at ``threshold`` bytes; True if it was applied.

    A no-op (False) where the C library has no ``mallopt`` (macOS) or ignores it (musl), and
    when the environment already sets ``MALLOC_MMAP_THRESHOLD_``.
    """
    if threshold < 0:
        raise ValueError(f"mmap threshold must be >= 0 bytes, got {threshold}")
    if ENV_OVERRIDE in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
