"""Import: `relay import` of a 100,000-row CSV file beside a running `relay serve`.

The import runs as its own process, as an operator runs it, while `relay serve` (with the same
config and database) forwards to the sandbox, both at a raised rate limit so that the delivery
takes seconds rather than the hour 4,000 batches need at 60 requests a minute. Measured: the
import's wall time and rows a second, its peak resident memory (ru_maxrss of that process,
from wait4), whether every row reached the sandbox exactly once (read from the sandbox's
database: as many events as rows, as many distinct order ids), and that importing the same
file again queues nothing.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

from bench import stack
from bench.procs import REPO, Procs, progress, relay_command
from bench.report import Row, mb

RSS_TARGET = 100e6
RATE = 12_000  # requests a minute, sandbox and relay: 4,000 batches in about 20 s
DELIVERY_TIMEOUT = 300.0

MAPPING = """\
[[events]]
on = "*"
name = "offline_purchase"
[events.payload]
order_id = "{{ order_id }}"
amount = "{{ amount }}"
currency = "{{ currency }}"
store = "{{ store }}"
"""


def source(mapping: Path) -> str:
    return f"""
[sources.orders]
provider = "import"
id_column = "order_id"
mapping = "{mapping}"
"""


def write_rows(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("order_id,amount,currency,store,note\n")
        for i in range(rows):
            f.write(f'ORD-{i:07d},{(i % 9973) / 100:.2f},USD,"Store {i % 17}, Main St",phone\n')


def run_import(config: Path, file: Path, env: dict[str, str]) -> tuple[int, float, int, str]:
    """(exit status, seconds, peak RSS in bytes, last line of output) of one `relay import`."""
    argv = [*relay_command(), "import", "--no-progress", "--config", str(config), "orders"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, str(file)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    lines = output.strip().splitlines()
    return proc.returncode, seconds, usage.ru_maxrss * 1024, lines[-1] if lines else ""


def delivered(sandbox_db: Path) -> tuple[int, int]:
    """(events, distinct order ids) in the sandbox's database."""
    conn = sqlite3.connect(f"file:{sandbox_db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT json_extract(payload, '$.order_id')) FROM events"
        ).fetchone()
        return int(row[0]), int(row[1])
    except sqlite3.OperationalError:  # no table yet
        return 0, 0
    finally:
        conn.close()


def run(workdir: Path, rows: int) -> list[Row]:
    keys = stack.Secrets.fresh()
    mapping = workdir / "orders.toml"
    mapping.write_text(MAPPING)
    file = workdir / "orders.csv"
    write_rows(file, rows)
    progress(f"import: {rows:,} rows, {mb(file.stat().st_size)} of CSV")
    with Procs(workdir) as procs:
        sandbox = stack.start_sandbox(procs, workdir, "import-sandbox", keys, RATE)
        relay = stack.start_relay(
            procs,
            workdir,
            "import-relay",
            keys,
            sandbox.port,
            requests_per_minute=RATE,
            flush_interval="1s",
            extra_sources=source(mapping),
        )
        code, seconds, peak, summary = run_import(relay.config, file, keys.env())
        progress(f"  relay import: exit {code} in {seconds:.1f} s, peak RSS {mb(peak)}: {summary}")
        started = time.perf_counter()
        sandbox_db = workdir / "import-sandbox.db"
        events, distinct = delivered(sandbox_db)
        while events < rows and time.perf_counter() - started < DELIVERY_TIMEOUT:
            time.sleep(0.5)
            events, distinct = delivered(sandbox_db)
        drain = time.perf_counter() - started
        time.sleep(2.0)  # anything more on its way would arrive
        events, distinct = delivered(sandbox_db)
        progress(f"  sandbox: {events:,} events ({distinct:,} distinct) {drain:.1f} s after")
        again, again_seconds, _, again_summary = run_import(relay.config, file, keys.env())
        progress(f"  again: exit {again} in {again_seconds:.1f} s: {again_summary}")
        outbox_before = stack.count_rows(relay.database).outbox
        procs.stop(relay.child)
    taken = re.search(r"([\d,]+) taken", again_summary)
    nothing = again == 0 and taken is not None and taken.group(1) == "0"
    return [
        Row(
            "import",
            f"relay import of {rows:,} CSV rows",
            f"{seconds:.1f} s ({rows / seconds:,.0f} rows/s), exit {code}",
            "exit 0",
            code == 0,
        ),
        Row(
            "import",
            "import peak RSS (ru_maxrss)",
            mb(peak),
            f"<= {mb(RSS_TARGET)}",
            peak <= RSS_TARGET,
        ),
        Row(
            "import",
            "rows delivered to the track API, once each",
            f"{events:,} events, {distinct:,} distinct, {drain:.0f} s after the import",
            f"{rows:,} and {rows:,}",
            events == distinct == rows,
        ),
        Row(
            "import",
            "the same file imported again",
            f"exit {again}: {again_summary.split(': ', 1)[-1]}; outbox {outbox_before:,}",
            "0 taken, exit 0",
            nothing and outbox_before == rows,
        ),
    ]
