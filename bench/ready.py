"""Ready: seconds from spawning `relay serve` to its first 200 from /healthz.

Measured three times, each on a new database (the first start also creates the schema); the
slowest start is held against the target. The track API it points at is not running: a start
must not wait for it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import stack
from bench.procs import Procs, free_port, progress
from bench.report import Row

RUNS = 3
TARGET_SECONDS = 1.0


def run(workdir: Path) -> list[Row]:
    keys = stack.Secrets.fresh()
    times = []
    with Procs(workdir) as procs:
        for n in range(RUNS):
            relay = stack.start_relay(procs, workdir, f"ready-relay{n}", keys, free_port())
            times.append(relay.ready_seconds)
            procs.stop(relay.child)
    progress("ready: " + ", ".join(f"{t:.2f} s" for t in times))
    worst = max(times)
    return [
        Row(
            "ready",
            f"relay serve: spawn -> /healthz 200 (worst of {RUNS})",
            f"{worst:.2f} s (median {statistics.median(times):.2f} s)",
            f"< {TARGET_SECONDS:.0f} s",
            worst < TARGET_SECONDS,
        )
    ]
