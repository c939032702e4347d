"""Burst: 100,000 webhooks taken as fast as they come while the track API refuses everything.

The sandbox answers every track request 503 (a fault rule), so the forwarder keeps retrying
and the whole burst stays in the outbox. Then: the relay's peak resident memory (VmHWM from
/proc/PID/status, read while it still runs, once the mapper has turned every acknowledged
webhook into its outbox row), the database's size (main file + WAL), and whether every event
was queued exactly once (read after a graceful stop; see stack.Counts).
"""

from __future__ import annotations

import math
from pathlib import Path

from bench import client, stack
from bench.procs import Procs, proc_status, progress
from bench.report import Row, mb

RSS_TARGET = 150e6
MAPPED_TIMEOUT = 120.0


def run(workdir: Path, events: int) -> list[Row]:
    keys = stack.Secrets.fresh()
    with Procs(workdir) as procs:
        sandbox = stack.start_sandbox(procs, workdir, "burst-sandbox", keys, 60)
        sandbox.post("/_sandbox/faults", {"status": 503})
        relay = stack.start_relay(procs, workdir, "burst-relay", keys, sandbox.port)
        rss_idle = proc_status(relay.child.pid, "VmRSS") or 0
        progress(
            f"burst: signing and posting {events:,} webhooks at 64 connections "
            "(track API down: 503)"
        )
        tally = client.post_signed(relay.port, events, keys.stripe)
        progress(
            f"  posted: {dict(tally.statuses)} in {tally.seconds:.1f} s "
            f"({tally.rate:,.0f}/s), errors {len(tally.errors)}"
        )
        left, mapped_after = stack.wait_mapped(relay.database, timeout=MAPPED_TIMEOUT)
        lag = f"{left:,} unmapped at the last answer, " + (
            f"all mapped {mapped_after:.2f} s later"
            if math.isfinite(mapped_after)
            else f"some still unmapped {MAPPED_TIMEOUT:.0f} s later"
        )
        progress(f"  {lag}")
        peak = proc_status(relay.child.pid, "VmHWM") or 0
        rss = proc_status(relay.child.pid, "VmRSS") or 0
        main, wal = stack.database_bytes(relay.database)
        track = sandbox.requests()
        procs.stop(relay.child)
        counts = stack.count_rows(relay.database)
    progress(
        f"  relay RSS: idle {mb(rss_idle)}, after the burst {mb(rss)}, peak {mb(peak)}; "
        f"database {mb(main)} + WAL {mb(wal)}; {counts.describe()}; "
        f"track requests refused: {track['by_status']}"
    )
    queued = counts.outbox_by_state.get(0, 0) + counts.outbox_by_state.get(1, 0)
    every = tally.all_ok(events) and counts.stored_once and counts.events == queued == events
    return [
        Row(
            "burst",
            f"webhooks taken ({events:,})",
            f"{tally.statuses.get(200, 0):,} x 200 in {tally.seconds:.0f} s ({tally.rate:,.0f}/s)",
        ),
        Row("burst", "mapping behind the answers", lag),
        Row(
            "burst",
            "relay peak RSS (VmHWM)",
            mb(peak),
            f"<= {mb(RSS_TARGET)}",
            0 < peak <= RSS_TARGET,
        ),
        Row("burst", "database size (file + WAL)", f"{mb(main + wal)} ({mb(main)} + {mb(wal)})"),
        Row(
            "burst",
            "events queued in the outbox, once each",
            f"{queued:,} of {events:,}",
            "all (none lost)",
            every,
        ),
    ]
