"""The tile progress bar ``rdn-client upscale`` shows for one image that takes a while.

A folder gets one bar of files (in ``server.client.cli``); a single file gets this bar of its
tiles, fed by UpscaleStream's Progress messages. It appears only once the image has taken
``BAR_DELAY_S``, so quick images print nothing but their result line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

BAR_DELAY_S = 2.0  # seconds an image runs before its bar appears
BAR_INTERVAL_S = 0.1  # seconds between redraws at least (tqdm's default)


class TileBar:
    """A ``progress(done, total)`` callback drawing a bar of one image's tiles on stderr."""

    def __init__(self, name: str, file: TextIO | None = None, delay: float | None = None) -> None:
        self._name = name
        self._file = file
        self._delay = BAR_DELAY_S if delay is None else delay
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=self._name,
                unit="tile",
                delay=self._delay,
                mininterval=BAR_INTERVAL_S,
                miniters=1,  # redraw as time allows, whatever the step of the last update
                leave=False,
                file=self._file if self._file is not None else sys.stderr,
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
