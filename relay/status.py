"""What an operator asks of a running (or stopped) relay: queues, pauses, dead letters."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay.config import Source
from relay.metrics import Metrics
from relay.store import Store


def touch(conn: sqlite3.Connection) -> None:
    """A real write, so that readiness proves the store takes writes."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('ready_check', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(time.time()),),
    )


def touch_all(conn: sqlite3.Connection, items: list[Any]) -> list[None]:
    """`touch` as a batch job: readiness writes by the webhooks' own road (Writer.run_batched),
    so it waits for the same lock and the same transactions as a webhook would."""
    touch(conn)
    return [None] * len(items)


def disk_problem(database: Path, need: int) -> str | None:
    """Why a webhook of `need` bytes could not be stored for lack of disk space, if so.

    A small write (the readiness write) may still fit in space SQLite holds already, while
    the webhooks' rows need more: the free space itself is what tells."""
    try:
        free = shutil.disk_usage(database.parent).free
    except OSError as e:
        return f"cannot tell the free disk space: {e}"
    if free >= need:
        return None
    return (
        f"database or disk is full: {free} bytes free for {database}, "
        f"less than one webhook of max_body_bytes ({need}) needs"
    )


async def paused_destinations(store: Store) -> dict[str, str]:
    """Paused destinations and why, as the forwarder recorded them."""

    def read() -> dict[str, str]:
        conn = store.reader()
        try:
            return {
                str(name): str(reason)
                for name, reason in conn.execute(
                    "SELECT name, paused_reason FROM destinations WHERE paused_reason IS NOT NULL"
                )
            }
        finally:
            conn.close()

    return await asyncio.to_thread(read)


@dataclass(frozen=True)
class DestinationStatus:
    name: str
    website_id: int
    sources: list[str]
    pending: int
    in_flight: int
    delivered: int
    dead: int
    oldest_pending_age: float | None
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    paused: str | None


@dataclass(frozen=True)
class Status:
    destinations: list[DestinationStatus]
    dead_letters: int
    dedupe_keys: int
    webhooks: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_status(
    conn: sqlite3.Connection, sources: Sequence[Source], now: float | None = None
) -> Status:
    now = time.time() if now is None else now
    by_dest: dict[str, list[str]] = {}
    websites: dict[str, int] = {}
    for s in sources:
        by_dest.setdefault(s.destination.name, []).append(s.name)
        websites[s.destination.name] = s.destination.website_id
    counts: dict[str, dict[int, int]] = {}
    for name, state, n in conn.execute(
        "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state"
    ):
        counts.setdefault(name, {})[state] = n
    oldest = dict(
        conn.execute(
            "SELECT destination, min(created_at) FROM outbox WHERE state IN (0, 1) "
            "GROUP BY destination"
        ).fetchall()
    )
    rows = {r["name"]: r for r in conn.execute("SELECT * FROM destinations")}
    names = sorted(set(by_dest) | set(counts) | set(rows))
    out = []
    for name in names:
        c = counts.get(name, {})
        r = rows.get(name)
        old = oldest.get(name)
        out.append(
            DestinationStatus(
                name=name,
                website_id=websites.get(name, r["website_id"] if r else 0),
                sources=by_dest.get(name, []),
                pending=c.get(0, 0),
                in_flight=c.get(1, 0),
                delivered=c.get(2, 0),
                dead=c.get(3, 0),
                oldest_pending_age=(now - old) if old is not None else None,
                last_success_at=r["last_success_at"] if r else None,
                last_error=r["last_error"] if r else None,
                last_error_at=r["last_error_at"] if r else None,
                paused=r["paused_reason"] if r else None,
            )
        )
    dead = sum(d.dead for d in out)
    dedupe = conn.execute("SELECT count(*) FROM dedupe").fetchone()[0]
    webhooks = conn.execute("SELECT count(*) FROM webhooks").fetchone()[0]
    return Status(out, dead, dedupe, webhooks)


async def refresh_gauges(store: Store, metrics: Metrics, sources: Sequence[Source]) -> None:

    def read() -> Status:
        conn = store.reader()
        try:
            return read_status(conn, sources)
        finally:
            conn.close()

    status = await asyncio.to_thread(read)
    for d in status.destinations:
        metrics.outbox_depth.labels(d.name).set(d.pending + d.in_flight)
        metrics.outbox_oldest.labels(d.name).set(d.oldest_pending_age or 0)
        metrics.dead_letter_depth.labels(d.name).set(d.dead)
