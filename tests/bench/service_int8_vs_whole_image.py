"""``service_vs_whole_image --service-precision int8``: the int8 service against the float
whole-image loop (target >= 1.8 at 1 and at 8 clients), as ``make bench`` runs it.

    python -m tests.bench.service_int8_vs_whole_image [--quick] [--photos DIR ...]
"""

from __future__ import annotations

import sys

from tests.bench import service_vs_whole_image


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    return service_vs_whole_image.main([*given, "--service-precision", "int8"])


if __name__ == "__main__":
    sys.exit(main())
