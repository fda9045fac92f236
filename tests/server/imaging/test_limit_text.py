"""Limits said in a user's terms, with the flag that sets them."""

from __future__ import annotations

from server.config import LimitsConfig
from server.imaging.limit_text import over_bytes, over_pixels, pixel_limit, pixels_over


def test_the_default_pixel_limit_reads_as_a_square_in_megapixels() -> None:
    limit = LimitsConfig().max_pixels
    assert pixel_limit(limit) == "4096x4096 = 16.8 MP"
    assert over_pixels(5000, 4000, limit) == (
        "5000x4000 = 20.0 MP is over --max-pixels 4096x4096 = 16.8 MP"
    )


def test_figures_that_would_read_equal_are_given_exactly() -> None:
    assert over_pixels(4097, 4096, 4096 * 4096) == (
        "4097x4096 = 16781312 pixels is over --max-pixels 4096x4096 = 16777216 pixels"
    )
    assert over_bytes(2**20 + 1, 2**20) == "1048577 bytes is over --max-request-bytes 1048576 bytes"


def test_small_and_non_square_limits_and_bytes() -> None:
    assert over_pixels(40, 40, 1000) == "40x40 = 1600 pixels is over --max-pixels 1000 pixels"
    assert pixels_over(3_000_000, 2_000_000) == "3.0 MP is over --max-pixels 2.0 MP"
    assert over_bytes(70 * 2**20, 64 * 2**20) == "70.0 MiB is over --max-request-bytes 64.0 MiB"
    assert over_bytes(3000, 2000) == "2.9 KiB is over --max-request-bytes 2.0 KiB"
    assert over_bytes(300, 200, "--max-x") == "300 bytes is over --max-x 200 bytes"
