"""Ingest: how many signed webhooks a second the relay takes at 64 connections, against a bare
Starlette + uvicorn endpoint run the same way in the same invocation.

Both sides get `wrk -t2 -c64 -d<secs> --latency --timeout 10s` with bench/wrk/requests.lua,
which sends pre-made requests (each wrk thread its own file) and counts statuses. The bare
side runs first; it is the ceiling, so the relay's set of distinct requests is sized from its
rate (x1.25) and the relay cannot run out of distinct events within the duration. The bare
side runs again after the relay: the ratio uses the mean of both, and a large difference
between them says the machine's speed changed during the run (shared virtual machines do).
For each `--workers` N above 1 the bare app also runs once with N uvicorn processes on one
port (SO_REUSEPORT, as the relay's workers), before the relay runs, and the relay with N
workers is compared with it too. The floor (bench/floor.py: verify, parse, a durable insert,
nothing else) runs once after the first bare run, on the bare side's requests.

CPU per webhook: the server's CPU seconds (the process and its live descendants, from
/proc) divided by the requests answered, in microseconds. The relay answers after the commit
of the webhook and its dedupe keys and maps it into outbox rows a few ms later (its mapper
thread), so its CPU is counted from wrk's start until every webhook it acknowledged is mapped
(the `unmapped` table is empty); how many were unmapped when wrk stopped is shown.

Afterwards the relay is stopped (gracefully: requests under way finish, and it maps what it
acknowledged before it exits) and its database is read: every event answered "accepted" must
be there exactly once: as many dedupe keys as webhooks, as outbox rows, as distinct outbox
event keys, each row mapped and linked to its dedupe key, nothing left unmapped (see
stack.Counts). Requests still under way when wrk stopped (at most one per connection) may or
may not have been stored; they are allowed for, and shown.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stack, webhooks
from bench.procs import Procs, cpu_seconds, progress
from bench.report import Row

LUA = Path(__file__).resolve().parent / "wrk" / "requests.lua"
THREADS = 2
CONNECTIONS = 64
BARE_DISTINCT = 20_000  # the bare app does not dedupe: its requests may repeat
MIN_RELAY_DISTINCT = 30_000
HEADROOM = 1.25

P99_TARGET_MS = 25.0
RATIO_TARGET = 0.5
CPU_AIM_US = 130.0  # CPU per webhook: an aim, shown without PASS/FAIL
MAPPED_TIMEOUT = 30.0  # after wrk stopped, for the relay to map what it acknowledged
DRIFT_WARNING = 0.15  # the bare runs before and after the relay differ more: a noisy machine


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    raw: dict[str, Any]
    cpu_seconds: float | None  # the server's CPU seconds during the run
    wrk_cpu_seconds: float  # wrk's own
    elapsed: float  # seconds wrk ran, as the bench timed it
    cpu_at_start: float | None = None  # the server's CPU seconds counter when wrk started

    @property
    def cpu(self) -> float | None:
        """The server's CPU use during the run, in cores."""
        return self.cpu_seconds / self.elapsed if self.cpu_seconds is not None else None

    @property
    def wrk_cpu(self) -> float:
        return self.wrk_cpu_seconds / self.elapsed

    @property
    def cpu_us(self) -> float | None:
        """The server's CPU per request answered, in microseconds."""
        return _per_request_us(self.cpu_seconds, self.answered)

    @property
    def max_ms(self) -> float:
        return float(self.raw["latency_us"]["max"]) / 1000

    @property
    def answered(self) -> int:
        return int(self.raw["requests"])

    @property
    def socket_errors(self) -> int:
        e = self.raw["errors"]
        return int(e["connect"] + e["read"] + e["write"] + e["timeout"])

    @property
    def statuses(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.raw["by_status"].items()}

    @property
    def all_200(self) -> bool:
        return (
            self.statuses == {"200": self.answered}
            and self.answered > 0
            and self.socket_errors == 0
            and self.raw["errors"]["status"] == 0
        )


WRK_MISSING = (
    "ingest needs wrk (https://github.com/wg/wrk), the load generator, on PATH: install it "
    "(Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk) and run again; "
    "forward, burst and ready do not need it"
)


def wrk_found() -> bool:
    return shutil.which("wrk") is not None


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(f"python -m bench: {WRK_MISSING}")
    return path


def skipped() -> list[Row]:
    return [Row("ingest", "not run: wrk not found", "-", "apt-get install wrk", False)]


def run_wrk(port: int, prefix: Path, duration: int, pid: int) -> WrkResult:
    argv = [
        wrk_path(),
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/webhooks/stripe",
        "--",
        str(prefix),
    ]
    cpu_before = cpu_seconds(pid)
    children_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True
    )
    try:
        out, _ = proc.communicate(timeout=duration + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.perf_counter() - started
    wrk_cpu = _children_cpu() - children_before
    cpu_after = cpu_seconds(pid)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{out[-2000:]}")
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    seconds = raw["duration_us"] / 1e6
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after else None
    return WrkResult(
        raw["requests"] / seconds,
        raw["latency_us"]["p50"] / 1000,
        raw["latency_us"]["p99"] / 1000,
        raw,
        cpu,
        wrk_cpu,
        elapsed,
        cpu_before,
    )


def _per_request_us(cpu: float | None, requests: int) -> float | None:
    return cpu / requests * 1e6 if cpu is not None and requests else None


def _us(value: float | None) -> str:
    return f"{value:.0f} µs" if value is not None else "?"


def _children_cpu() -> float:
    """CPU seconds of the children reaped so far (wrk is the only one reaped in a run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cores(r: WrkResult) -> str:
    server = f"{r.cpu:.2f}" if r.cpu is not None else "?"
    return f"{server} / {r.wrk_cpu:.2f} cores"


def _describe(name: str, r: WrkResult) -> str:
    return (
        f"{name}: {r.rps:,.0f} req/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
        f"max {r.max_ms:.0f} ms, "
        f"{r.answered:,} answered, statuses {r.statuses}, socket errors {r.socket_errors}, "
        f"CPU server / wrk: {_cores(r)}, server CPU per request {_us(r.cpu_us)}"
    )


def py_spy_path() -> str:
    path = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if path is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return path


def start_profiler(pid: int, duration: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy on the relay for the run; the format follows the file name."""
    fmt = {".json": "speedscope", ".txt": "raw"}.get(output.suffix, "flamegraph")
    return subprocess.Popen(
        [
            py_spy_path(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration),
            "--rate",
            "100",
            "--nonblocking",
            "--threads",
            "--subprocesses",
            "--format",
            fmt,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@dataclass
class RelayRun:
    """One run of the relay under wrk, with `workers` worker processes."""

    workers: int
    result: WrkResult
    counts: stack.Counts
    commits: stack.Commits
    cpu_seconds: float | None = None  # from wrk's start until every acknowledged one was mapped
    unmapped_at_stop: int = 0  # acknowledged but not mapped yet when wrk stopped
    mapped_after: float = 0.0  # seconds after wrk stopped until none was unmapped

    @property
    def label(self) -> str:
        return "relay" if self.workers == 1 else f"relay, {self.workers} workers"

    @property
    def cpu_us(self) -> float | None:
        """CPU per webhook answered, mapping included, in microseconds."""
        return _per_request_us(self.cpu_seconds, self.result.answered)


def _bare_label(processes: int) -> str:
    return "bare" if processes == 1 else f"bare {processes} processes"


def run(
    workdir: Path, duration: int, profile: Path | None = None, workers: tuple[int, ...] = (1,)
) -> list[Row]:
    wrk_path()
    if profile is not None:
        py_spy_path()
    keys = stack.Secrets.fresh()
    runs: list[RelayRun] = []
    multi: dict[int, WrkResult] = {}  # the bare app with N processes
    with Procs(workdir) as procs:
        sandbox = stack.start_sandbox(procs, workdir, "ingest-sandbox", keys, 60)
        bare, bare_port = stack.start_bare(procs)
        bare_files = workdir / "bare-requests"
        webhooks.write_files(bare_files, THREADS, BARE_DISTINCT, bare_port, keys.stripe)
        progress(
            f"ingest: bare Starlette + uvicorn endpoint, {duration} s at {CONNECTIONS} connections"
        )
        before = run_wrk(bare_port, bare_files, duration, bare.pid)
        progress("  " + _describe("bare", before))
        floor, floor_port = stack.start_floor(procs, workdir, keys)
        progress(f"ingest: durable-ack floor (bench/floor.py), {duration} s at {CONNECTIONS} conns")
        floor_result = run_wrk(floor_port, bare_files, duration, floor.pid)
        progress("  " + _describe("floor", floor_result))
        procs.stop(floor)
        for n in sorted({n for n in workers if n > 1}):
            label = _bare_label(n)
            child, port = stack.start_bare(procs, f"bare-{n}p", processes=n)
            progress(f"ingest: {label} (SO_REUSEPORT), {duration} s at {CONNECTIONS} connections")
            multi[n] = run_wrk(port, bare_files, duration, child.pid)
            progress("  " + _describe(label, multi[n]))
            procs.stop(child)

        # Each relay run has a database of its own: the same requests are new to each.
        ceiling = max([before.rps, *(r.rps for r in multi.values())])
        distinct = max(MIN_RELAY_DISTINCT, math.ceil(ceiling * duration * HEADROOM))
        progress(f"ingest: signing {distinct:,} distinct webhooks for the relay")
        relay_files = workdir / "relay-requests"
        webhooks.write_files(relay_files, THREADS, distinct, bare_port, keys.stripe)
        for n in workers:
            name = f"ingest-relay-{n}w"
            relay = stack.start_relay(procs, workdir, name, keys, sandbox.port, workers=n)
            progress(f"ingest: relay, {n} worker(s), {duration} s at {CONNECTIONS} connections")
            r = _profiled(
                functools.partial(run_wrk, relay.port, relay_files, duration, relay.child.pid),
                relay.child.pid,
                duration,
                profile if not runs else None,
            )
            progress("  " + _describe("relay", r))
            left, mapped_after = stack.wait_mapped(relay.database, MAPPED_TIMEOUT)
            cpu_now = cpu_seconds(relay.child.pid)
            cpu = (
                cpu_now - r.cpu_at_start
                if cpu_now is not None and r.cpu_at_start is not None
                else None
            )
            per_webhook = _us(_per_request_us(cpu, r.answered))
            progress(
                f"  unmapped when wrk stopped: {left:,}, all mapped {mapped_after:.2f} s later; "
                f"CPU per webhook answered, mapping included: {per_webhook}"
            )
            time.sleep(0.5)  # let requests cut off by wrk's stop finish
            commits = stack.commit_histogram(relay.port)
            code = procs.stop(relay.child)
            if code != 0:
                progress(f"  relay exited with {code} on SIGTERM:\n{relay.child.tail()}")
            counts = stack.count_rows(relay.database)
            runs.append(RelayRun(n, r, counts, commits, cpu, left, mapped_after))
        for path in workdir.glob("relay-requests.*"):
            path.unlink()

        progress("ingest: bare endpoint again, to see how steady the machine was")
        after = run_wrk(bare_port, bare_files, duration, bare.pid)
        progress("  " + _describe("bare", after))
        for path in workdir.glob("bare-requests.*"):
            path.unlink()
    return rows(before, after, runs, multi, floor_result)


def _profiled(
    work: Callable[[], WrkResult], pid: int, duration: int, profile: Path | None
) -> WrkResult:
    if profile is None:
        return work()
    spy = start_profiler(pid, duration, profile)
    try:
        result = work()
    except BaseException:
        spy.kill()
        spy.wait()
        raise
    try:
        spy.wait(60)  # it stops by itself after `duration`, then writes the file
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    progress(f"  profile of the relay written to {profile} (figures taken under py-spy)")
    return result


def rows(
    before: WrkResult,
    after: WrkResult,
    runs: list[RelayRun],
    multi: dict[int, WrkResult] | None = None,
    floor: WrkResult | None = None,
) -> list[Row]:
    """The table's rows; `multi` holds the bare app's runs with N processes, by N; `floor`
    the durable-ack floor's run (bench/floor.py)."""
    multi = multi or {}
    bare_rps = (before.rps + after.rps) / 2
    drift = abs(before.rps - after.rps) / bare_rps
    if drift > DRIFT_WARNING:
        progress(
            f"  warning: the bare endpoint's rate moved {drift:.0%} between its two runs: "
            "the machine's speed varied; run again for a steadier ratio"
        )
    unsteady = f", machine drift {drift:.0%}!" if drift > DRIFT_WARNING else ""
    out = [
        Row(
            "ingest",
            "bare requests/s (before / after relay)",
            f"{before.rps:,.0f} / {after.rps:,.0f}, mean {bare_rps:,.0f}{unsteady}",
        ),
        Row("ingest", "bare CPU (server / wrk)", f"{_cores(before)}, {_cores(after)}"),
        Row(
            "ingest",
            "bare CPU per webhook (before / after)",
            f"{_us(before.cpu_us)} / {_us(after.cpu_us)}",
            f"aim <= {CPU_AIM_US:.0f} µs",
        ),
        Row(
            "ingest",
            "bare p50 / p99 latency (before / after)",
            f"{before.p50_ms:.1f} / {before.p99_ms:.1f} ms, "
            f"{after.p50_ms:.1f} / {after.p99_ms:.1f} ms",
        ),
    ]
    if floor is not None:
        out += [
            Row(
                "ingest",
                "floor requests/s (verify, parse, durable insert)",
                f"{floor.rps:,.0f}, {floor.rps / bare_rps:.2f} x bare, CPU per webhook "
                f"{_us(floor.cpu_us)}, p99 {floor.p99_ms:.1f} ms",
            ),
        ]
    for n, r in sorted(multi.items()):
        label = _bare_label(n)
        out += [
            Row("ingest", f"{label} requests/s", f"{r.rps:,.0f}"),
            Row("ingest", f"{label} CPU (server / wrk)", _cores(r)),
            Row(
                "ingest",
                f"{label} CPU per webhook",
                _us(r.cpu_us),
                f"aim <= {CPU_AIM_US:.0f} µs",
            ),
            Row(
                "ingest",
                f"{label} p50 / p99 latency",
                f"{r.p50_ms:.1f} / {r.p99_ms:.1f} ms",
            ),
        ]
    for run in runs:
        out += _run_rows(run, bare_rps, multi.get(run.workers))
        if floor is not None and floor.rps:
            ratio = run.result.rps / floor.rps
            out.append(Row("ingest", f"{run.label} / floor requests/s", f"{ratio:.2f}"))
    return out


def _run_rows(run: RelayRun, bare_rps: float, bare_multi: WrkResult | None = None) -> list[Row]:
    r, counts, commits, label = run.result, run.counts, run.commits, run.label
    ratio = r.rps / bare_rps if bare_rps else 0.0
    raw = r.raw
    cut_off = raw["issued"] - r.answered  # under way when wrk stopped: stored or not
    extra = counts.events - raw["accepted"]
    stored_once = (
        counts.stored_once
        and 0 <= extra <= cut_off
        and raw["duplicates"] <= raw["repeats"]  # only a repeated request is a duplicate
    )
    progress(
        f"  {label} database: {counts.describe()}; answered accepted={raw['accepted']:,}, "
        f"duplicates={raw['duplicates']}, in flight when wrk stopped={cut_off}, "
        f"stored of those={extra}, repeated requests={raw['repeats']}"
    )
    stored = (
        f"{counts.events:,} events, {counts.outbox:,} outbox rows = {raw['accepted']:,} "
        f"answered + {extra} of {cut_off} in flight at the stop"
    )
    if counts.unmapped:
        stored += f"; {counts.unmapped:,} left unmapped"
    if raw["repeats"]:
        stored += f"; {raw['repeats']:,} repeats (distinct requests ran out)"
    statuses = ", ".join(f"{n:,} x {s}" for s, n in sorted(r.statuses.items()))
    if r.socket_errors:
        statuses += f", {r.socket_errors} socket errors"
    mapped = (
        f"mapped {run.mapped_after:.2f} s later"
        if math.isfinite(run.mapped_after)
        else f"not all mapped {MAPPED_TIMEOUT:.0f} s later: CPU counted until then"
    )
    out = [
        Row("ingest", f"{label} requests/s", f"{r.rps:,.0f}"),
        Row("ingest", f"{label} CPU (server / wrk)", f"{_cores(r)}"),
        Row(
            "ingest",
            f"{label} CPU per webhook (mapping included)",
            f"{_us(run.cpu_us)} ({run.unmapped_at_stop:,} unmapped at the stop, {mapped})",
            f"aim <= {CPU_AIM_US:.0f} µs",
        ),
        Row(
            "ingest",
            f"{label} / bare requests/s",
            f"{ratio:.2f}",
            f">= {RATIO_TARGET}",
            ratio >= RATIO_TARGET,
        ),
    ]
    if bare_multi is not None:
        multi_ratio = r.rps / bare_multi.rps if bare_multi.rps else 0.0
        out.append(
            Row(
                "ingest",
                f"{label} / {_bare_label(run.workers)} requests/s",
                f"{multi_ratio:.2f}",
                f">= {RATIO_TARGET}",
                multi_ratio >= RATIO_TARGET,
            )
        )
    out += [
        Row(
            "ingest",
            f"{label} p50 / p99 / max latency",
            f"{r.p50_ms:.1f} / {r.p99_ms:.1f} / {r.max_ms:.0f} ms",
            f"p99 <= {P99_TARGET_MS:.0f} ms",
            r.p99_ms <= P99_TARGET_MS,
        ),
        Row(
            "ingest",
            f"{label} commits (fsync) over 25 / 100 ms",
            f"{commits.over(0.025):,} / {commits.over(0.1):,} of {commits.count:,}, "
            f"slowest {commits.slowest()}",
        ),
        Row("ingest", f"{label} answers", statuses or "none", "all 200", r.all_200),
        Row("ingest", f"{label} events stored once", stored, "each exactly once", stored_once),
    ]
    return out
