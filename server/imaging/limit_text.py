"""Size limits said in a user's terms: megapixels and a square side for pixels, MiB for bytes,
always with the flag that sets the limit ("5000x4000 = 20.0 MP is over --max-pixels 4096x4096 =
16.8 MP"). Pure functions; the callers raise the error (and keep its status code)."""

from __future__ import annotations

import math

MP = 1_000_000  # pixels in a megapixel
MIB = 2**20  # bytes in a MiB
KIB = 2**10


def _pixels(n: int, exact: bool) -> str:
    return f"{n} pixels" if exact or n < MP // 10 else f"{n / MP:.1f} MP"


def _bytes(n: int, exact: bool) -> str:
    if exact or n < KIB:
        return f"{n} bytes"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / KIB:.1f} KiB"


def pixel_limit(limit: int, exact: bool = False) -> str:
    """``limit`` pixels as a user sets them: "4096x4096 = 16.8 MP" when the limit admits exactly a
    square (the default, 4096*4096 + 1, is such a limit), else "1000 pixels"."""
    side = math.isqrt(limit)
    if side > 0 and limit - side * side <= 1:
        return f"{side}x{side} = {_pixels(side * side, exact)}"
    return _pixels(limit, exact)


def pixels_over(n: int, limit: int, flag: str = "--max-pixels") -> str:
    """ "20.0 MP is over --max-pixels 4096x4096 = 16.8 MP" (exact counts where the rounded
    figures would read equal)."""
    exact = _pixels(n, False) == _pixels(limit, False)
    return f"{_pixels(n, exact)} is over {flag} {pixel_limit(limit, exact)}"


def over_pixels(width: int, height: int, limit: int, flag: str = "--max-pixels") -> str:
    """ "5000x4000 = 20.0 MP is over --max-pixels 4096x4096 = 16.8 MP"."""
    return f"{width}x{height} = {pixels_over(width * height, limit, flag)}"


def over_bytes(size: int, limit: int, flag: str = "--max-request-bytes") -> str:
    """ "70.0 MiB is over --max-request-bytes 64.0 MiB" (exact counts where the rounded figures
    would read equal)."""
    exact = _bytes(size, False) == _bytes(limit, False)
    return f"{_bytes(size, exact)} is over {flag} {_bytes(limit, exact)}"
