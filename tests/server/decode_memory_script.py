"""Peak decode memory of one image file, in bytes per pixel: ``python decode_memory_script.py
FILE``. Run in a fresh process so that the high-water mark measures decoding alone; used by
test_decode_memory.py. It reads VmHWM, the high-water mark of this process image: Linux carries
``ru_maxrss`` over from the parent across fork and exec, so under pytest it starts at pytest's."""

from __future__ import annotations

import sys
from pathlib import Path

from server.imaging.codec import decode_image


def high_water_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    data = Path(sys.argv[1]).read_bytes()
    before = high_water_bytes()
    decoded = decode_image(data, 2**26, 2**30)
    after = high_water_bytes()
    height, width = decoded.rgb.shape[:2]
    print((after - before) / (height * width))


if __name__ == "__main__":
    main()
