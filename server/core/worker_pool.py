"""Awaiting blocking work on a bounded pool of threads (the server's codec pool)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def in_pool(pool: Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``pool``, awaited: the event loop keeps answering meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
