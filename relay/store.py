"""What the relay keeps: webhooks, dedupe keys, the outbox and dead letters.

Each operation is a function of a connection, run by the writer thread (relay/db.py) inside a
group commit. The web layer, the forwarder and the CLI call them through :class:`Store`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.db import Writer, connect
from relay.errors import InvalidSignature

if TYPE_CHECKING:
    from relay.providers.base import Token

PENDING, IN_FLIGHT, DELIVERED, DEAD = 0, 1, 2, 3


@dataclass
class Output:
    """One track event to queue (or a mapping failure, with body None)."""

    destination: str
    rule: int | None
    body: str | None
    error: str | None = None


@dataclass
class IncomingEvent:
    key: str
    type: str
    outcome: str  # mapped | ignored | failed
    outputs: list[Output] = field(default_factory=list)


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    webhook_id: int | None
    queued: dict[str, int]  # destination -> rows queued
    outcomes: dict[str, int] = field(default_factory=dict)  # fresh events by outcome
    dead: dict[str, int] = field(default_factory=dict)  # destination -> mapping failures


@dataclass(frozen=True)
class Row:
    id: int
    body: str
    created_at: float
    attempts: int


@dataclass(frozen=True)
class Incoming:
    """One received webhook, mapped, on its way into the store."""

    source: str
    received_at: float
    content_type: str
    headers: str
    body: bytes
    events: Sequence[IncomingEvent]
    dedupe_window: float
    tokens: Sequence[tuple[str, Token]] = ()  # (event key, the token that vouched for it)


def ingest(conn: sqlite3.Connection, item: Incoming) -> IngestResult:
    return ingest_many(conn, [item])[0]


def ingest_many(conn: sqlite3.Connection, items: list[Incoming]) -> list[IngestResult]:
    """Dedupe each event, then store the webhooks and the new events' outbox rows.

    One call per group commit: one dedupe lookup and one multi-row insert per table for the
    whole group. Only the writer thread writes, so the ids it hands out are its own.

    A token (Mailgun's) is bound to the first event it came with, in the same transaction as
    that event: a webhook whose token already vouched for another event raises
    InvalidSignature and stores nothing. The ledger is in the database, so every worker and
    every later process of this file decide the same.
    """
    bound = _bound_tokens(conn, items)
    token_rows: list[tuple[str, str, str, float, float]] = []
    for item in items:
        for key, token in item.tokens:
            previous = bound.get(token.value)
            if previous is None:
                bound[token.value] = key
                token_rows.append(
                    (token.value, item.source, key, item.received_at, token.expires_at)
                )
            elif previous != key:
                # The writer rolls this call back and runs the group's webhooks one by one:
                # only this one is refused.
                raise InvalidSignature("token already used for another event")

    seen: dict[tuple[str, str], float] = {}
    by_source: dict[str, set[str]] = {}
    for item in items:
        by_source.setdefault(item.source, set()).update(ev.key for ev in item.events)
    for source, keys in by_source.items():
        key_list = list(keys)
        for start in range(0, len(key_list), 500):
            chunk = key_list[start : start + 500]
            for key, seen_at in conn.execute(
                f"SELECT key, seen_at FROM dedupe WHERE source = ? AND key IN ({_in(chunk)})",
                (source, *chunk),
            ):
                seen[(source, key)] = seen_at

    webhook_id = conn.execute("SELECT coalesce(max(id), 0) FROM webhooks").fetchone()[0]
    event_id = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    dedupe_rows: list[tuple[str, str, float]] = []
    webhook_rows: list[tuple[Any, ...]] = []
    event_rows: list[tuple[Any, ...]] = []
    outbox_rows: list[tuple[Any, ...]] = []
    results: list[IngestResult] = []
    for item in items:
        cutoff = item.received_at - item.dedupe_window
        fresh: list[IncomingEvent] = []
        for ev in item.events:
            k = (item.source, ev.key)
            last = seen.get(k)
            if last is not None and last >= cutoff:
                continue  # seen inside the window (also: twice in one body, or in one group)
            seen[k] = item.received_at
            dedupe_rows.append((item.source, ev.key, item.received_at))
            fresh.append(ev)
        duplicates = len(item.events) - len(fresh)
        if not fresh:
            results.append(IngestResult(0, duplicates, None, {}, {}))
            continue
        webhook_id += 1
        webhook_rows.append(
            (webhook_id, item.source, item.received_at, item.content_type, item.headers, item.body)
        )
        queued: dict[str, int] = {}
        dead: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for ev in fresh:
            event_id += 1
            outcomes[ev.outcome] = outcomes.get(ev.outcome, 0) + 1
            event_rows.append(
                (event_id, webhook_id, item.source, ev.key, ev.type, ev.outcome, item.received_at)
            )
            for out in ev.outputs:
                state = PENDING if out.body is not None else DEAD
                done_at = item.received_at if state == DEAD else None
                outbox_rows.append(
                    (
                        out.destination,
                        event_id,
                        out.rule,
                        out.body,
                        item.received_at,
                        state,
                        out.error,
                        done_at,
                    )
                )
                counts = queued if state == PENDING else dead
                counts[out.destination] = counts.get(out.destination, 0) + 1
        results.append(IngestResult(len(fresh), duplicates, webhook_id, queued, outcomes, dead))
    _insert(
        conn,
        "INSERT INTO tokens (token, source, key, seen_at, expires_at) VALUES {}",
        token_rows,
    )
    _insert(
        conn,
        "INSERT INTO dedupe (source, key, seen_at) VALUES {} "
        "ON CONFLICT (source, key) DO UPDATE SET seen_at = excluded.seen_at",
        dedupe_rows,
    )
    _insert(
        conn,
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) VALUES {}",
        webhook_rows,
    )
    _insert(
        conn,
        "INSERT INTO events (id, webhook_id, source, key, type, outcome, received_at) VALUES {}",
        event_rows,
    )
    _insert(
        conn,
        "INSERT INTO outbox "
        "(destination, event_id, rule, body, created_at, state, last_error, done_at) "
        "VALUES {}",
        outbox_rows,
    )
    return results


def _bound_tokens(conn: sqlite3.Connection, items: list[Incoming]) -> dict[str, str]:
    """token -> the event key it was first bound to, for the tokens of the group."""
    tokens = list({t.value for item in items for _, t in item.tokens})
    bound: dict[str, str] = {}
    for start in range(0, len(tokens), 500):
        chunk = tokens[start : start + 500]
        for token, key in conn.execute(
            f"SELECT token, key FROM tokens WHERE token IN ({_in(chunk)})", chunk
        ):
            bound[token] = key
    return bound


_MAX_VARIABLES = 30_000  # SQLite allows 32,766 bound parameters in one statement


def _insert(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Many rows in few statements.

    executemany steps SQLite once per row, giving up and taking back the GIL each time, and
    every take-back waits for the event loop's turn to end: one multi-row VALUES statement
    per table does the work of a whole group in one step, in parallel with the event loop.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _MAX_VARIABLES // width)
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        params = [v for row in chunk for v in row]
        conn.execute(sql.format(",".join([one] * len(chunk))), params)


def queue_head(conn: sqlite3.Connection, destination: str, limit: int) -> tuple[int, float | None]:
    """How many events wait (counted up to `limit`) and when the oldest was queued."""
    rows = conn.execute(
        "SELECT created_at FROM outbox WHERE destination = ? AND state = 0 ORDER BY id LIMIT ?",
        (destination, limit),
    ).fetchall()
    if not rows:
        return 0, None
    return len(rows), min(r[0] for r in rows)


def claim(conn: sqlite3.Connection, destination: str, limit: int) -> tuple[int, list[Row]]:
    """Mark the next `limit` pending rows in flight, as one batch, before they are sent."""
    rows = conn.execute(
        "SELECT id, body, created_at, attempts FROM outbox "
        "WHERE destination = ? AND state = 0 ORDER BY id LIMIT ?",
        (destination, limit),
    ).fetchall()
    if not rows:
        return 0, []
    batch_id = rows[0]["id"]
    ids = [r["id"] for r in rows]
    conn.execute(
        f"UPDATE outbox SET state = 1, batch_id = ?, attempts = attempts + 1 "
        f"WHERE id IN ({','.join('?' * len(ids))}) AND state = 0",
        (batch_id, *ids),
    )
    return batch_id, [Row(r["id"], r["body"], r["created_at"], r["attempts"] + 1) for r in rows]


def _in(ids: Sequence[object]) -> str:
    return ",".join("?" * len(ids))


def delivered(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    track_ids: Sequence[int | None],
    destination: str,
    now: float,
) -> None:
    conn.executemany(
        "UPDATE outbox SET state = 2, track_id = ?, done_at = ?, last_error = NULL WHERE id = ?",
        [(tid, now, i) for i, tid in zip(ids, track_ids, strict=True)],
    )
    conn.execute(
        "UPDATE destinations SET last_success_at = ?, paused_reason = NULL, paused_at = NULL "
        "WHERE name = ?",
        (now, destination),
    )


def attempted(conn: sqlite3.Connection, ids: Sequence[int], error: str) -> None:
    """A try failed and will be repeated: count it and keep the reason."""
    conn.execute(
        f"UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id IN ({_in(ids)})",
        (error, *ids),
    )


def release(conn: sqlite3.Connection, ids: Sequence[int], error: str | None) -> None:
    """Hand rows back to the queue (paused destination, shutdown)."""
    conn.execute(
        f"UPDATE outbox SET state = 0, batch_id = NULL, last_error = COALESCE(?, last_error) "
        f"WHERE id IN ({_in(ids)}) AND state = 1",
        (error, *ids),
    )


def dead_letter(conn: sqlite3.Connection, ids: Sequence[int], reason: str, now: float) -> None:
    conn.execute(
        f"UPDATE outbox SET state = 3, last_error = ?, done_at = ?, batch_id = NULL "
        f"WHERE id IN ({_in(ids)})",
        (reason, now, *ids),
    )


def expire(conn: sqlite3.Connection, cutoff: float, now: float) -> list[str]:
    """Dead-letter pending rows queued before `cutoff`; returns their destinations."""
    rows = conn.execute(
        "UPDATE outbox SET state = 3, done_at = ?, "
        "last_error = 'not delivered within max_event_age' || "
        "  COALESCE('; last error: ' || last_error, '') "
        "WHERE state = 0 AND created_at < ? RETURNING destination",
        (now, cutoff),
    ).fetchall()
    return [r[0] for r in rows]


def reset_in_flight(conn: sqlite3.Connection) -> int:
    """After a crash: the batches that were in flight are sent again."""
    return conn.execute("UPDATE outbox SET state = 0, batch_id = NULL WHERE state = 1").rowcount


def register_destination(conn: sqlite3.Connection, name: str, key_id: str, website_id: int) -> None:
    conn.execute(
        "INSERT INTO destinations (name, key_id, website_id) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO NOTHING",
        (name, key_id, website_id),
    )


def set_paused(
    conn: sqlite3.Connection, names: Iterable[str], reason: str | None, now: float
) -> None:
    for name in names:
        conn.execute(
            "UPDATE destinations SET paused_reason = ?, paused_at = CASE WHEN ? IS NULL THEN NULL "
            "ELSE COALESCE(paused_at, ?) END WHERE name = ?",
            (reason, reason, now, name),
        )


def set_error(conn: sqlite3.Connection, name: str, error: str, now: float) -> None:
    conn.execute(
        "UPDATE destinations SET last_error = ?, last_error_at = ? WHERE name = ?",
        (error, now, name),
    )


def prune(
    conn: sqlite3.Connection, now: float, dedupe_window: float, retention: float, step: int = 500
) -> int:
    """One small step of retention; returns rows removed (call again while it is > 0)."""
    removed = conn.execute(
        "DELETE FROM dedupe WHERE (source, key) IN "
        "(SELECT source, key FROM dedupe WHERE seen_at < ? LIMIT ?)",
        (now - dedupe_window, step),
    ).rowcount
    # A token goes a dedupe window after its signature expired: a webhook verified just
    # before that moment may still be on its way into the store.
    removed += conn.execute(
        "DELETE FROM tokens WHERE token IN (SELECT token FROM tokens WHERE expires_at < ? LIMIT ?)",
        (now - dedupe_window, step),
    ).rowcount
    cutoff = now - retention
    removed += conn.execute(
        "DELETE FROM outbox WHERE id IN "
        "(SELECT id FROM outbox WHERE state = 2 AND done_at < ? LIMIT ?)",
        (cutoff, step),
    ).rowcount
    # A webhook goes once it is old and none of its events waits or lies dead.
    old = [
        r[0]
        for r in conn.execute(
            "SELECT w.id FROM webhooks w WHERE w.received_at < ? AND NOT EXISTS ("
            "  SELECT 1 FROM events e JOIN outbox o ON o.event_id = e.id "
            "  WHERE e.webhook_id = w.id AND o.state != 2) LIMIT ?",
            (cutoff, step),
        )
    ]
    if old:
        conn.execute(
            "DELETE FROM outbox WHERE event_id IN "
            f"(SELECT id FROM events WHERE webhook_id IN ({_in(old)}))",
            old,
        )
        conn.execute(f"DELETE FROM events WHERE webhook_id IN ({_in(old)})", old)
        removed += conn.execute(f"DELETE FROM webhooks WHERE id IN ({_in(old)})", old).rowcount
    return removed


class Store:
    """The relay's database: the writer thread for writes, short-lived connections for reads."""

    def __init__(self, path: Path, *, shared: bool = False):
        """`shared`: other processes write to this file too (workers > 1)."""
        self.path = path
        self.writer = Writer(path, commit_on_loop=shared)

    def close(self) -> None:
        self.writer.close()

    def reader(self) -> sqlite3.Connection:
        return connect(self.path, readonly=True)

    @staticmethod
    def reader_of(path: Path) -> sqlite3.Connection:
        """A read connection for the CLI; the schema is brought up to date first."""
        from relay.db import migrate

        conn = connect(path)
        migrate(conn)
        return conn
