"""Run every benchmark in sequence: ``python -m tests.bench [--only NAME] [--quick] [--model M]``.

The common arguments (see ``--help``) go to every benchmark; options of one benchmark
(``--concurrency``, ``--repeats`` ...) are for running its module directly. The model is
resolved once (the default x2 model, else a random small-preset export) and shared.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tests.bench.common import add_common_arguments, bench_model, common_argv, setup_logging

# Each is a module of this package with main(argv) -> int.
BENCHES = (
    "service_vs_whole_image",
    "service_int8_vs_whole_image",
    "auto_choice_cost",
    "int8_vs_fp32",
    "service_vs_engine",
    "idle_latency",
    "engine_vs_gemm",
    "onnxruntime_vs_torch",
    "batching_gain",
    "large_image",  # last: minutes on a CPU
)

log = logging.getLogger("bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--only", action="append", choices=BENCHES, help="run just these")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    failed: list[str] = []
    with bench_model(args.model) as model:
        for name in args.only or BENCHES:
            module = importlib.import_module(f"tests.bench.{name}")
            log.info("running %s", name)
            try:
                code = module.main(common_argv(args, model))
            except Exception:
                log.exception("benchmark %s failed", name)
                code = 1
            if code != 0:
                failed.append(name)
    if failed:
        log.error("failed benchmarks: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
