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

Latency, when the rate limit is not the bottleneck: a fresh relay and sandbox, both at
LATENCY_RPM requests a minute; webhooks posted at a steady `--latency-rate` a second for
LATENCY_SECONDS, the wall-clock time of each 200 recorded. The sandbox stamps every event it
stores with the time its track request came in (received_at, to the ms); the mapping sends the
Checkout Session id as payload.order_id, which joins the two. p50 / p99 / max of
(received_at - 200) over every event. The forwarder sends when a batch of 25 is full or the
oldest event has waited flush_interval, so this runs twice: with the relay's default
flush_interval (what a user runs) and with LATENCY_SHORT_FLUSH. At 50 webhooks a second a batch
fills in 0.5 s, so the default's 5 s only holds back a last partial batch; at a few a second
it is what every event waits for.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, stack, webhooks
from bench.procs import Procs, free_port, progress
from bench.report import Row
from relay.config import TrackSettings, format_duration, parse_duration

BATCH = 25
FRACTION_TARGET = 0.98
BATCH_TARGET = 24.5

LATENCY_RATE = 50.0  # webhooks a second
LATENCY_SECONDS = 10
MAX_LATENCY_RATE = 1000.0  # the sandbox lists 10,000 events at most
LATENCY_RPM = 60_000  # the sandbox's and the relay's: far above what the runs send
LATENCY_SHORT_FLUSH = "50ms"
DEFAULT_FLUSH = format_duration(TrackSettings.flush_interval)  # the relay's default


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


def run(
    workdir: Path, events: int, rpm: int, speedup: float, latency_rate: float = LATENCY_RATE
) -> list[Row]:
    out = drain(workdir, events, rpm, speedup)
    for flush in (None, LATENCY_SHORT_FLUSH):
        out.append(latency_row(latency(workdir, flush, latency_rate)))
    return out


def drain(workdir: Path, events: int, rpm: int, speedup: float) -> list[Row]:
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


@dataclass(frozen=True)
class Latency:
    """One latency run: seconds from each 200 to the event's arrival at the sandbox."""

    flush_interval: str  # as the relay was configured ("5s" the default)
    default: bool  # flush_interval was left to the relay's default
    rate: float
    sent: int
    acknowledged: int  # answered 200
    delays: list[float]  # sorted; one per event found in the sandbox
    sandbox_events: int  # events the sandbox stored in all
    stored_once: bool  # the relay's database: every event once, all delivered

    def percentile(self, p: float) -> float:
        """Nearest rank."""
        return self.delays[max(0, math.ceil(p / 100 * len(self.delays)) - 1)]


def latency(workdir: Path, flush_interval: str | None, rate: float = LATENCY_RATE) -> Latency:
    flush = flush_interval or DEFAULT_FLUSH
    label = f"flush_interval {flush}" + (" (the default)" if flush_interval is None else "")
    count = max(1, round(rate * LATENCY_SECONDS))
    keys = stack.Secrets.fresh()
    name = f"latency-{flush}"
    with Procs(workdir) as procs:
        sandbox = stack.start_sandbox(procs, workdir, f"{name}-sandbox", keys, LATENCY_RPM)
        relay = stack.start_relay(
            procs,
            workdir,
            f"{name}-relay",
            keys,
            sandbox.port,
            LATENCY_RPM,
            flush_interval=flush_interval,
        )
        requests = webhooks.make(count, relay.port, keys.stripe)
        orders = [_order_id(raw) for raw in requests]
        progress(
            f"forward: latency, {count} webhooks at {rate:g}/s, {label}, "
            f"{LATENCY_RPM:,} requests/min allowed"
        )
        answers = client.post_paced(relay.port, requests, rate)
        acked = {orders[a.index]: a.at for a in answers if a.status == 200}
        late = max((a.late for a in answers), default=0.0)
        if late > 0.1:
            progress(f"  warning: a request went out {late:.2f} s after its slot")
        stored = wait_drained(sandbox, len(acked), timeout=60 + 2 * parse_duration(flush))
        listed = sandbox.get(f"/api/v1/websites/1/events?limit={max(1, count)}", auth=True)
        procs.stop(relay.child)
        counts = stack.count_rows(relay.database)
    received: dict[str, float] = {}
    for event in listed["events"]:
        order = event["payload"].get("order_id")
        received.setdefault(order, float(event["received_at"]))
    delays = sorted(received[o] - at for o, at in acked.items() if o in received)
    delivered = counts.outbox_by_state.get(2, 0)
    once = (
        counts.stored_once
        and stored == len(received) == len(acked) == delivered == counts.events == count
    )
    result = Latency(flush, flush_interval is None, rate, count, len(acked), delays, stored, once)
    if delays:
        progress(
            f"  {len(acked)} answered 200, {stored} in the sandbox; 200 -> sandbox: "
            f"min {delays[0] * 1000:.0f} ms, p50 {result.percentile(50) * 1000:.0f} ms, "
            f"p99 {result.percentile(99) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms; "
            f"relay: {counts.describe()}"
        )
    return result


def _order_id(raw: bytes) -> str:
    """The Checkout Session id: the mapping sends it as payload.order_id."""
    return str(json.loads(raw.partition(b"\r\n\r\n")[2])["data"]["object"]["id"])


def latency_row(m: Latency) -> Row:
    flush = f"flush_interval {m.flush_interval}" + (" default" if m.default else "")
    measure = (
        f"200 -> at the sandbox, p50 / p99 / max ({m.rate:g}/s for {LATENCY_SECONDS} s, {flush})"
    )
    if m.delays:
        value = (
            f"{m.percentile(50) * 1000:,.0f} / {m.percentile(99) * 1000:,.0f} / "
            f"{m.delays[-1] * 1000:,.0f} ms"
        )
    else:
        value = "nothing delivered"
    value += f"; {len(m.delays)} of {m.sent} delivered"
    return Row("forward", measure, value, "all delivered, once", m.stored_once)
