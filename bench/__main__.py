"""python -m bench ingest|forward|burst|ready|all|console

Starts everything it needs on 127.0.0.1 (`relay serve`, `relay sandbox`, a bare Starlette
app, wrk), stops all of it at the end (also on Ctrl-C or an error), prints progress to stderr
and the table to stdout. Exit status: 0 when every target passes, 1 when one fails (or could
not be measured: ingest without wrk), 2 when a benchmark broke off with an error.

    ready    seconds from spawning `relay serve` to its first /healthz 200 (bench/ready.py)
    ingest   webhooks a second, latency and CPU per webhook under wrk, against a bare
             Starlette endpoint (with as many processes as the relay's workers) and the
             floor of a durable acknowledgement (floor.py) (ingest.py)
    forward  draining a backlog at the track API's rate limit, and the time from a webhook's
             200 to its arrival at the track API when the limit is not in the way (forward.py)
    burst    100,000 webhooks while the track API refuses: memory, disk, none lost (burst.py)
    console  the console's page timings with 1,000,000 stored webhooks (console.py; not in
             `all`: filling the store takes minutes)
    import   `relay import` of 100,000 CSV rows beside `relay serve`: time, peak RSS, each
             row delivered once, a second import queues nothing (imports.py)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import burst, console, forward, imports, ingest, ready
from bench.procs import progress, sigterm_as_interrupt
from bench.report import Row, render, render_markdown

ORDER = ("ready", "ingest", "forward", "burst", "import")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the relay; every target is checked and shown PASS or FAIL.",
    )
    p.add_argument("which", choices=[*ORDER, "all", "console"], help="what to run")
    p.add_argument(
        "--duration",
        type=int,
        default=15,
        metavar="SECS",
        help="ingest: seconds of load on each side (default 15)",
    )
    p.add_argument(
        "--workers",
        type=_workers_list,
        default=(1, 2),
        metavar="N[,N...]",
        help="ingest: run the relay once with each of these `workers` settings (default 1,2)",
    )
    p.add_argument(
        "--events", type=int, default=20_000, help="forward: events in the backlog (default 20000)"
    )
    p.add_argument(
        "--rpm",
        type=int,
        default=60,
        help="forward: the track API's requests per minute N (default 60)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=10.0,
        metavar="F",
        help="forward: multiply the sandbox's and the relay's requests per minute "
        "by F, to see the same drain F times faster (default 10)",
    )
    p.add_argument(
        "--latency-rate",
        type=float,
        default=forward.LATENCY_RATE,
        metavar="PER_SEC",
        help="forward: webhooks a second in the latency runs (200 -> at the track API), "
        f"for {forward.LATENCY_SECONDS} s (default {forward.LATENCY_RATE:g})",
    )
    p.add_argument(
        "--burst-events",
        type=int,
        default=100_000,
        help="burst: webhooks in the burst (default 100000)",
    )
    p.add_argument(
        "--import-rows",
        type=int,
        default=100_000,
        help="import: rows in the CSV file (default 100000)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="ingest: record the relay with py-spy while it is under load; .svg "
        "flamegraph, .json speedscope, .txt raw (the figures of that run are "
        "taken under the profiler)",
    )
    p.add_argument(
        "--webhooks",
        type=int,
        default=1_000_000,
        help="console: webhooks in the store (default 1000000)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, databases) and print its path",
    )
    args = p.parse_args(argv)
    if (
        args.duration < 1
        or args.events < 1
        or args.burst_events < 1
        or args.webhooks < 1
        or args.import_rows < 1
        or args.rpm < 1
        or args.speedup <= 0
        or not 0 < args.latency_rate <= forward.MAX_LATENCY_RATE
    ):
        p.error(
            "--duration, --events, --burst-events, --import-rows, --rpm and --speedup must be "
            "positive, "
            f"--latency-rate above 0 and at most {forward.MAX_LATENCY_RATE:g}"
        )
    return args


def _workers_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(not 1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError("each must be between 1 and 64")
    return values


def run(which: str, args: argparse.Namespace, workdir: Path) -> list[Row]:
    if which == "ready":
        return ready.run(workdir)
    if which == "ingest":
        if not ingest.wrk_found():
            return ingest.skipped()
        profile = args.profile.resolve() if args.profile else None
        return ingest.run(workdir, args.duration, profile, args.workers)
    if which == "console":
        return console.run(workdir, args.webhooks)
    if which == "forward":
        return forward.run(workdir, args.events, args.rpm, args.speedup, args.latency_rate)
    if which == "import":
        return imports.run(workdir, args.import_rows)
    return burst.run(workdir, args.burst_events)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = list(ORDER) if args.which == "all" else [args.which]
    if "forward" in selected:
        forward.check_options(args.events, args.rpm, args.speedup)
    if args.which == "ingest":
        ingest.wrk_path()  # exits with how to install it
    if "ingest" in selected and not ingest.wrk_found():
        progress(f"warning: {ingest.WRK_MISSING}; running the others")
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    keep = args.keep
    rows: list[Row] = []
    started = time.monotonic()
    status = 0
    try:
        with sigterm_as_interrupt():
            for which in selected:
                t = time.monotonic()
                rows += run(which, args, workdir)
                progress(f"{which}: done in {time.monotonic() - t:.0f} s")
    except KeyboardInterrupt:
        progress("interrupted; every process started was stopped")
        status = 130
    except Exception as e:  # report what ran, keep the logs
        progress(f"error: {e}")
        keep = True
        status = 2
    finally:
        if keep:
            progress(f"logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    progress(f"total {time.monotonic() - started:.0f} s")
    if rows:
        print(render_markdown(rows) if args.markdown else render(rows), flush=True)
    if status:
        return status
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
