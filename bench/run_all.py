"""Every benchmark in turn, printing its figures: `python -m bench.run_all [--quick]`."""

from __future__ import annotations

import time

from bench import (
    approvals,
    cold,
    files,
    footprint,
    gateway,
    hot_memory,
    postgres,
    restart,
    streaming,
    throughput,
    warm,
)
from bench.common import main

BENCHMARKS = (warm, cold, throughput, footprint, hot_memory, restart, streaming, gateway, approvals, files, postgres)


def run(quick: bool) -> list[str]:
    lines = []
    for benchmark in BENCHMARKS:
        began = time.monotonic()
        for line in benchmark.run(quick):
            print(line, flush=True)
            lines.append(line)
        print(f"({benchmark.__name__} took {time.monotonic() - began:.0f} s)", flush=True)
    return []


if __name__ == "__main__":
    main(run, __doc__ or "")
