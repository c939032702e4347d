"""Forward: how close the relay drains a backlog to the track API's ceiling.

The ceiling is N requests a minute per API key (the sandbox enforces it with 429s) times 25
events per batch. `--speedup F` multiplies N for both the sandbox and the relay's
`requests_per_minute`, so the same behaviour is seen F times faster.

How: the relay starts with its track API down (nothing listens on the sandbox's port yet;
connection errors do not count against the relay's rate limit), the events are posted to it,
then the sandbox starts on that port and the relay drains the backlog. From the sandbox's own
record of track requests: t0 is the first accepted batch; the window is the whole minutes
from t0 during which the backlog lasted (the last batch comes after the window ends). Events
per minute in that window, as a fraction of the ceiling; mean events per accepted batch; 429s
over the whole run. Finally every event must be in the sandbox once, and the relay's database
must hold each once, delivered (see stack.Counts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from bench import client, stack
from bench.procs import Procs, free_port, progress
from bench.report import Row

BATCH = 25
FRACTION_TARGET = 0.98
BATCH_TARGET = 24.5


def check_options(events: int, rpm: int, speedup: float) -> int:
    """The effective requests per minute; refuses a backlog shorter than one whole minute."""
    effective = max(1, round(rpm * speedup))
    per_minute = effective * BATCH
    if events <= per_minute:
        raise SystemExit(
            f"forward: {events:,} events last less than one minute at {effective} requests/min "
            f"x {BATCH} ({per_minute:,} events/min): use more --events (> {per_minute:,}) or a "
            f"lower --speedup (< {events / (rpm * BATCH):.1f})"
        )
    return effective


def run(workdir: Path, events: int, rpm: int, speedup: float) -> list[Row]:
    effective = check_options(events, rpm, speedup)
    ceiling = effective * BATCH
    keys = stack.Secrets.fresh()
    with Procs(workdir) as procs:
        sandbox_port = free_port()
        relay = stack.start_relay(procs, workdir, "forward-relay", keys, sandbox_port, effective)
        progress(f"forward: signing {events:,} webhooks, posting them while the track API is down")
        tally = client.post_signed(relay.port, events, keys.stripe)
        progress(
            f"  posted: {dict(tally.statuses)} in {tally.seconds:.1f} s "
            f"({tally.rate:,.0f}/s), errors {len(tally.errors)}"
        )
        if not tally.all_ok(events):
            raise RuntimeError(
                f"forward: posting the backlog failed: {dict(tally.statuses)}, {tally.errors[:3]}"
            )
        drain = events / ceiling * 60
        progress(
            f"forward: track API up ({effective} requests/min = {rpm} x speedup "
            f"{speedup:g}); draining, about {drain:.0f} s"
        )
        sandbox = stack.start_sandbox(
            procs, workdir, "forward-sandbox", keys, effective, port=sandbox_port
        )
        stored = wait_drained(sandbox, events, timeout=drain * 1.5 + 60)
        record = sandbox.requests()
        procs.stop(relay.child)
        counts = stack.count_rows(relay.database)
    return rows(record, stored, events, counts, effective, ceiling)


def wait_drained(sandbox: stack.Sandbox, events: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while True:
        stored = sandbox.stored_events()
        if stored >= events or time.monotonic() > deadline:
            return stored
        if time.monotonic() - last_report >= 10:
            progress(f"  delivered {stored:,}/{events:,}")
            last_report = time.monotonic()
        time.sleep(0.5)


def measure(record: dict[str, Any]) -> dict[str, Any]:
    accepted = sorted((r for r in record["requests"] if r["status"] == 200), key=lambda r: r["at"])
    if not accepted:
        raise RuntimeError(f"forward: the sandbox accepted no batch: {record['by_status']}")
    t0, t_end = accepted[0]["at"], accepted[-1]["at"]
    minutes = math.floor((t_end - t0) / 60)
    window = [r for r in accepted if r["at"] < t0 + minutes * 60]
    events_in_window = sum(r["events"] for r in window)
    return {
        "minutes": minutes,
        "batches": len(window),
        "events": events_in_window,
        "per_minute": events_in_window / minutes if minutes else 0.0,
        "mean_batch": events_in_window / len(window) if window else 0.0,
        "mean_batch_all": sum(r["events"] for r in accepted) / len(accepted),
        "drain_seconds": t_end - t0,
        "window_busy_seconds": window[-1]["at"] - t0 if window else 0.0,
        "truncated": record["total"] > len(record["requests"]),
    }


def rows(
    record: dict[str, Any],
    stored: int,
    events: int,
    counts: stack.Counts,
    effective: int,
    ceiling: int,
) -> list[Row]:
    m = measure(record)
    by_status = {str(k): int(v) for k, v in record["by_status"].items()}
    too_many = by_status.get("429", 0)
    fraction = m["per_minute"] / ceiling
    progress(
        f"  sandbox record: {by_status}; window {m['minutes']} min, {m['batches']} "
        f"batches, {m['events']:,} events, the last of them sent "
        f"{m['window_busy_seconds']:.1f} s into the window; drained in "
        f"{m['drain_seconds']:.1f} s; relay outbox by state {counts.outbox_by_state}"
    )
    if m["truncated"]:
        progress("  warning: the sandbox's request record was truncated (over 10,000 requests)")
    delivered = counts.outbox_by_state.get(2, 0)
    once = stored == events == delivered == counts.events and counts.stored_once
    others = {s: n for s, n in by_status.items() if s not in ("200", "429")}
    return [
        Row(
            "forward",
            f"events/min under backlog ({m['minutes']} min window)",
            f"{m['per_minute']:,.0f} of {ceiling:,} = {fraction:.1%}",
            f">= {FRACTION_TARGET:.0%}",
            fraction >= FRACTION_TARGET,
        ),
        Row(
            "forward",
            "mean batch size",
            f"{m['mean_batch']:.2f} ({m['mean_batch_all']:.2f} whole drain)",
            f">= {BATCH_TARGET}",
            m["mean_batch"] >= BATCH_TARGET,
        ),
        Row(
            "forward",
            "429s received",
            f"{too_many}" + (f" (other: {others})" if others else ""),
            "0",
            too_many == 0,
        ),
        Row(
            "forward",
            f"delivered ({effective} req/min ceiling)",
            f"{stored:,} of {events:,} in the sandbox, {delivered:,} marked delivered",
            "all, once",
            once,
        ),
    ]
