"""server/ops/memory.py: the glibc mmap threshold pin that keeps rdn-serve's RSS on live requests.

Its effect on a real server's RSS is measured by test_hostile.py (2000 hostile requests).
"""

from __future__ import annotations

import platform

import pytest

from server.ops.memory import ENV_OVERRIDE, MMAP_THRESHOLD_BYTES, pin_mmap_threshold

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt's mmap threshold is a glibc setting")
def test_pins_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    assert pin_mmap_threshold(MMAP_THRESHOLD_BYTES) is True


def test_an_explicit_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_OVERRIDE, "1048576")
    assert pin_mmap_threshold() is False


def test_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="mmap threshold must be >= 0 bytes, got -1"):
        pin_mmap_threshold(-1)
