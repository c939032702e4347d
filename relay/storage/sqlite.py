"""The SQLite backend: one file in WAL mode, written by one writer task (writer.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import InvalidSignature, StoreError
from relay.storage.base import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    Activity,
    Counts,
    DestinationRow,
    Incoming,
    Ingested,
    Mapped,
    OutboxEntry,
    Queued,
    Row,
    Store,
    StoredWebhook,
    WebhookSummary,
    first_each,
)
from relay.storage.sqlite_schema import connect, migrate
from relay.storage.writer import Writer

T = TypeVar("T")

_MAX_VARIABLES = 30_000  # SQLite allows 32,766 bound parameters in one statement
READY_WAIT = 0.5  # readiness: how long its write may wait for the lock


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


class SQLiteStore(Store):
    def __init__(
        self,
        path: Path,
        busy_timeout: float = 10.0,
        on_commit: Callable[[float], None] | None = None,
        shared: bool = False,
    ):
        self.path = path
        self.shared = shared  # other processes write to the file too (see Writer)
        self.url = str(path)
        self.busy_timeout = busy_timeout
        self.on_commit = on_commit
        self.writer: Writer | None = None
        self._prune_after = 0

    async def open(self) -> None:
        def setup() -> sqlite3.Connection:
            conn = connect(self.path)
            try:
                migrate(conn)
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
                conn.execute(f"PRAGMA journal_size_limit = {16 << 20}")
                conn.execute("PRAGMA busy_timeout = 0")  # waits are the writer's
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.to_thread(setup)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from None
        self.writer = Writer(conn, self.path, self.busy_timeout, commit_on_loop=self.shared)
        self.writer.on_commit = self.on_commit
        self.writer.start()

    async def close(self) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        await writer.close()

        def finish() -> None:
            try:
                writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            writer.conn.close()

        await asyncio.to_thread(finish)

    # -- plumbing

    def _writer(self) -> Writer:
        if self.writer is None:
            raise StoreError("the store is closed")
        return self.writer

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._writer().apply(fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        def run() -> T:
            try:
                conn = connect(self.path, readonly=True)
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the database {self.path}: {e}") from None
            try:
                return fn(conn, *args)
            except sqlite3.Error as e:
                raise StoreError(f"database read failed: {e}") from None
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    # -- the acknowledgement

    async def ingest(self, item: Incoming) -> Ingested:
        result: Ingested = await self._writer().batched(_ingest_many, item)
        return result

    async def load(self, items: Sequence[Incoming]) -> list[Ingested]:
        """Many webhooks in one transaction, as `ingest` stores them (benchmarks and tests
        that need a big store quickly; not part of the Store interface)."""
        return await self._write(_ingest_many, list(items))

    async def seen_in(self, source: str, key: str) -> int | None:
        return await self._read(_seen_in, source, key)

    async def import_rows(self, item: Incoming) -> Ingested:
        return await self._write(_import_rows, item)

    # -- the mapper

    async def unmapped(self, after: int, limit: int) -> list[StoredWebhook]:
        return await self._read(_unmapped, after, limit)

    async def save_mapped(self, mapped: Sequence[Mapped]) -> dict[str, Queued]:
        return await self._write(_save_mapped, list(mapped))

    async def webhook(self, webhook_id: int) -> StoredWebhook | None:
        return await self._read(_webhook, webhook_id)

    # -- the forwarder

    async def queue_depths(self, destinations: Sequence[str]) -> dict[str, Queued]:
        return await self._read(_queue_depths, list(destinations))

    async def claim(self, destination: str, limit: int, now: float) -> list[Row]:
        return await self._write(_claim, destination, limit)

    async def delivered(
        self, ids: Sequence[int], track_ids: Sequence[int | None], destination: str, now: float
    ) -> None:
        await self._write(_delivered, list(ids), list(track_ids), destination, now)

    async def attempted(self, ids: Sequence[int], error: str) -> None:
        await self._write(_attempted, list(ids), error)

    async def release(self, ids: Sequence[int], error: str | None) -> None:
        if ids:
            await self._write(_release, list(ids), error)

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None:
        await self._write(_dead_letter, list(ids), reason, now)

    async def expire(self, cutoff: float, now: float) -> dict[str, int]:
        return await self._write(_expire, cutoff, now)

    async def reset_in_flight(self) -> int:
        return await self._write(_reset_in_flight)

    # -- destinations and pauses

    async def register_destination(self, name: str, key_id: str, website_id: int) -> None:
        await self._write(_register_destination, name, key_id, website_id)

    async def set_paused(
        self, names: Sequence[str], reason: str | None, now: float, until: float | None = None
    ) -> None:
        await self._write(_set_paused, list(names), reason, now, until)

    async def set_error(self, name: str, error: str, now: float) -> None:
        await self._write(_set_error, name, error, now)

    async def destinations(self) -> list[DestinationRow]:
        return await self._read(_destinations)

    # -- the rate-limit log

    async def begin_request(self, key_id: str, latest: float) -> int:
        return await self._write(_begin_request, key_id, latest)

    async def end_request(self, request_id: int, at: float | None) -> None:
        await self._write(_end_request, request_id, at)

    async def requests_since(self, key_id: str, since: float) -> list[float]:
        return await self._read(_requests_since, key_id, since)

    # -- operators

    async def counts(self) -> Counts:
        return await self._read(_counts)

    async def dead_letters(self, limit: int | None = None) -> list[OutboxEntry]:
        return await self._read(_dead_letters, limit)

    async def outbox_entry(self, row_id: int) -> OutboxEntry | None:
        return await self._read(_outbox_entry, row_id)

    async def requeue(self, items: Sequence[tuple[int, str]], now: float) -> list[int]:
        return await self._write(_requeue, list(items), now)

    # -- the console

    async def webhook_page(
        self,
        before: int | None,
        limit: int,
        source: str | None = None,
        outcome: str | None = None,
        event_type: str | None = None,
        after: int | None = None,
    ) -> list[WebhookSummary]:
        return await self._read(_webhook_page, before, limit, source, outcome, event_type, after)

    async def search_webhooks(
        self, text: str, sources: Sequence[str], before: int | None, limit: int
    ) -> list[WebhookSummary]:
        return await self._read(_search_webhooks, text, list(sources), before, limit)

    async def webhook_outbox(self, webhook_id: int) -> list[OutboxEntry]:
        return await self._read(_webhook_outbox, webhook_id)

    async def event_owners(self, source: str, keys: Sequence[str]) -> dict[str, int | None]:
        return await self._read(_event_owners, source, list(keys))

    async def activity(self, since: float, step: float, now: float) -> Activity:
        return await self._read(_activity, since, step, now)

    async def rule_counts(self, since: float) -> dict[tuple[str, int | None], int]:
        return await self._read(_rule_counts, since)

    async def dead_letter_page(
        self, before: int | None, limit: int, source: str | None = None
    ) -> list[OutboxEntry]:
        return await self._read(_dead_letter_page, before, limit, source)

    async def dead_letter_ids(self, source: str | None = None) -> list[int]:
        return await self._read(_dead_letter_ids, source)

    async def check_writable(self, need: int) -> str | None:
        """Enough disk for one webhook, then a real write by the webhooks' own road (the
        writer's next group), that waits for the lock as a webhook would, but only briefly:
        another process holding the write lock makes webhooks wait, then fail."""
        problem = disk_problem(self.path, need)
        if problem is not None:
            return problem
        writer = self._writer()
        try:
            await writer.run(_touch, READY_WAIT)
        except StoreError as e:
            return str(e)
        return None

    # -- housekeeping

    async def prune(self, now: float, dedupe_window: float, retention: float) -> int:
        removed, cursor = await self._write(
            _prune, now, dedupe_window, retention, self._prune_after
        )
        # Webhooks kept for their dead letters stay at the head: the next step starts past them.
        self._prune_after = cursor if cursor is not None else 0
        return removed + (1 if cursor is not None else 0)


# -- statements, run by the writer (writes) or in a thread (reads)


def _in(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _insert(
    conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]], tail: tuple[Any, ...] = ()
) -> list[sqlite3.Row]:
    """Many rows in few multi-row statements (one step of SQLite each, not one per row)."""
    if not rows:
        return []
    width = len(rows[0])
    per = max(1, (_MAX_VARIABLES - len(tail)) // width)
    one = "(" + ",".join("?" * width) + ")"
    out: list[sqlite3.Row] = []
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        params = [v for row in chunk for v in row]
        out += conn.execute(sql.format(",".join([one] * len(chunk))), (*params, *tail)).fetchall()
    return out


def _ingest_many(conn: sqlite3.Connection, items: list[Incoming]) -> list[Ingested]:
    """One group's webhooks: the token ledger, dedupe decided by one upsert, the webhooks.

    The upsert takes a key that is new or whose last sighting is older than the window, and
    RETURNING names the keys it took: those are the accepted events, the rest are duplicates.

    A token (Mailgun's) is bound to the first event it came with, in the same transaction as
    that event: a webhook whose token already vouched for another event raises
    InvalidSignature and stores nothing (the writer then runs the group's items one by one, so
    only that one is refused). The writer holds the database's write lock, so every process
    sharing the file decides the same.
    """
    _bind_tokens(conn, items)
    next_id = conn.execute("SELECT coalesce(max(id), 0) FROM webhooks").fetchone()[0]
    dedupe_rows: list[tuple[Any, ...]] = []
    claimed: set[tuple[str, str]] = set()
    for n, item in enumerate(items):
        for key in first_each(item.keys):
            if (item.source, key) not in claimed:  # a second sighting in one group: duplicate
                claimed.add((item.source, key))
                dedupe_rows.append((item.source, key, item.received_at, next_id + 1 + n))
    window = items[0].dedupe_window if items else 0.0
    taken = _insert(
        conn,
        "INSERT INTO dedupe (source, key, seen_at, webhook_id) VALUES {} "
        "ON CONFLICT (source, key) DO UPDATE SET "
        "  seen_at = excluded.seen_at, webhook_id = excluded.webhook_id "
        "WHERE dedupe.seen_at < excluded.seen_at - ? "
        "RETURNING webhook_id, key",
        dedupe_rows,
        (window,),
    )
    accepted: dict[int, set[str]] = {}
    for r in taken:
        accepted.setdefault(r[0], set()).add(r[1])
    webhook_rows: list[tuple[Any, ...]] = []
    unmapped_rows: list[tuple[Any, ...]] = []
    results: list[Ingested] = []
    for n, item in enumerate(items):
        webhook_id = next_id + 1 + n
        keys = accepted.get(webhook_id, set())
        ordered = tuple(k for k in first_each(item.keys) if k in keys)
        duplicates = len(item.keys) - len(ordered)
        if not ordered:
            results.append(Ingested(None, (), duplicates))
            continue
        webhook_rows.append(
            (webhook_id, item.source, item.received_at, item.content_type, item.headers, item.body)
        )
        every = len(ordered) == len(item.keys)
        unmapped_rows.append((webhook_id, None if every else json.dumps(list(ordered))))
        results.append(Ingested(webhook_id, ordered, duplicates))
    _insert(
        conn,
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) VALUES {}",
        webhook_rows,
    )
    _insert(conn, "INSERT INTO unmapped (webhook_id, keys) VALUES {}", unmapped_rows)
    return results


def _seen_in(conn: sqlite3.Connection, source: str, key: str) -> int | None:
    row = conn.execute(
        "SELECT webhook_id FROM dedupe WHERE source = ? AND key = ?", (source, key)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _import_rows(conn: sqlite3.Connection, item: Incoming) -> Ingested:
    """A chunk of imported rows: the keys never imported before are taken (one insert that
    skips the others, RETURNING what it took), and the chunk is stored for the mapper."""
    webhook_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM webhooks").fetchone()[0]
    keys = first_each(item.keys)
    taken = _insert(
        conn,
        "INSERT INTO imported (source, key, webhook_id) VALUES {} "
        "ON CONFLICT (source, key) DO NOTHING RETURNING key",
        [(item.source, k, webhook_id) for k in keys],
    )
    took = {r[0] for r in taken}
    ordered = tuple(k for k in keys if k in took)
    duplicates = len(item.keys) - len(ordered)
    if not ordered:
        return Ingested(None, (), duplicates)
    conn.execute(
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (webhook_id, item.source, item.received_at, item.content_type, item.headers, item.body),
    )
    every = len(ordered) == len(item.keys)
    conn.execute(
        "INSERT INTO unmapped (webhook_id, keys) VALUES (?, ?)",
        (webhook_id, None if every else json.dumps(list(ordered))),
    )
    return Ingested(webhook_id, ordered, duplicates)


def _bind_tokens(conn: sqlite3.Connection, items: list[Incoming]) -> None:
    tokens = list({t.value for item in items for _, t in item.tokens})
    if not tokens:
        return
    bound: dict[str, str] = {}
    for start in range(0, len(tokens), 500):
        chunk = tokens[start : start + 500]
        for token, key in conn.execute(
            f"SELECT token, key FROM tokens WHERE token IN ({_in(chunk)})", chunk
        ):
            bound[token] = key
    rows: list[tuple[Any, ...]] = []
    for item in items:
        for key, token in item.tokens:
            previous = bound.get(token.value)
            if previous is None:
                bound[token.value] = key
                rows.append((token.value, item.source, key, item.received_at, token.expires_at))
            elif previous != key:
                raise InvalidSignature("token already used for another event")
    _insert(conn, "INSERT INTO tokens (token, source, key, seen_at, expires_at) VALUES {}", rows)


def _stored(r: sqlite3.Row, keys: str | None = None) -> StoredWebhook:
    return StoredWebhook(
        r["id"],
        r["source"],
        r["received_at"],
        r["content_type"],
        json.loads(r["headers"]),
        bytes(r["body"]),
        tuple(json.loads(keys)) if keys else None,
    )


def _unmapped(conn: sqlite3.Connection, after: int, limit: int) -> list[StoredWebhook]:
    rows = conn.execute(
        "SELECT w.*, u.keys AS keys FROM unmapped u JOIN webhooks w ON w.id = u.webhook_id "
        "WHERE u.webhook_id > ? ORDER BY u.webhook_id LIMIT ?",
        (after, limit),
    ).fetchall()
    return [_stored(r, r["keys"]) for r in rows]


def _webhook(conn: sqlite3.Connection, webhook_id: int) -> StoredWebhook | None:
    r = conn.execute("SELECT * FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
    return _stored(r) if r is not None else None


def _save_mapped(conn: sqlite3.Connection, mapped: list[Mapped]) -> dict[str, Queued]:
    """The rows of the webhooks that are still unmapped (a webhook is saved once, whoever
    mapped it)."""
    ids = [m.webhook_id for m in mapped]
    mine: set[int] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        mine.update(
            r[0]
            for r in conn.execute(
                f"DELETE FROM unmapped WHERE webhook_id IN ({_in(chunk)}) RETURNING webhook_id",
                chunk,
            )
        )
    rows: list[tuple[Any, ...]] = []
    pending: dict[str, list[float]] = {}
    dead: dict[str, int] = {}
    for m in mapped:
        if m.webhook_id not in mine:
            continue
        for out in m.outputs:
            failed = out.body is None
            rows.append(
                (
                    out.destination,
                    m.webhook_id,
                    out.event_key,
                    out.event_type,
                    out.rule,
                    out.body,
                    m.created_at,
                    DEAD if failed else PENDING,
                    out.error,
                    m.created_at if failed else None,
                )
            )
            if failed:
                dead[out.destination] = dead.get(out.destination, 0) + 1
            else:
                pending.setdefault(out.destination, []).append(m.created_at)
    _insert(
        conn,
        "INSERT INTO outbox (destination, webhook_id, event_key, event_type, rule, body, "
        "created_at, state, "
        "last_error, done_at) VALUES {}",
        rows,
    )
    return {
        dest: Queued(
            len(pending.get(dest, [])),
            min(pending[dest]) if dest in pending else None,
            dead.get(dest, 0),
        )
        for dest in set(pending) | set(dead)
    }


def _queue_depths(conn: sqlite3.Connection, destinations: list[str]) -> dict[str, Queued]:
    """Each destination a range of the queue index (delivered rows are not read)."""
    out = {}
    for name in destinations:
        n, oldest = conn.execute(
            "SELECT count(*), min(created_at) FROM outbox WHERE destination = ? AND state = ?",
            (name, PENDING),
        ).fetchone()
        if n:
            out[name] = Queued(n, oldest)
    return out


def _claim(conn: sqlite3.Connection, destination: str, limit: int) -> list[Row]:
    rows = conn.execute(
        "UPDATE outbox SET state = ?, attempts = attempts + 1 WHERE id IN ("
        "  SELECT id FROM outbox WHERE destination = ? AND state = ? ORDER BY id LIMIT ?) "
        "RETURNING id, body, created_at, attempts",
        (IN_FLIGHT, destination, PENDING, limit),
    ).fetchall()
    return sorted((Row(r[0], r[1], r[2], r[3]) for r in rows), key=lambda r: r.id)


def _delivered(
    conn: sqlite3.Connection,
    ids: list[int],
    track_ids: list[int | None],
    destination: str,
    now: float,
) -> None:
    conn.executemany(
        "UPDATE outbox SET state = ?, track_id = ?, done_at = ?, last_error = NULL WHERE id = ?",
        [(DELIVERED, tid, now, i) for i, tid in zip(ids, track_ids, strict=True)],
    )
    conn.execute(
        "UPDATE destinations SET last_success_at = ?, paused_reason = NULL, paused_at = NULL "
        "WHERE name = ?",
        (now, destination),
    )


def _attempted(conn: sqlite3.Connection, ids: list[int], error: str) -> None:
    conn.execute(
        f"UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id IN ({_in(ids)})",
        (error, *ids),
    )


def _release(conn: sqlite3.Connection, ids: list[int], error: str | None) -> None:
    conn.execute(
        f"UPDATE outbox SET state = ?, last_error = COALESCE(?, last_error) "
        f"WHERE id IN ({_in(ids)}) AND state = ?",
        (PENDING, error, *ids, IN_FLIGHT),
    )


def _dead_letter(conn: sqlite3.Connection, ids: list[int], reason: str, now: float) -> None:
    conn.execute(
        f"UPDATE outbox SET state = ?, last_error = ?, done_at = ? WHERE id IN ({_in(ids)})",
        (DEAD, reason, now, *ids),
    )


def _expire(conn: sqlite3.Connection, cutoff: float, now: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for (dest,) in conn.execute("SELECT name FROM destinations").fetchall():
        rows = conn.execute(
            "UPDATE outbox SET state = ?, done_at = ?, "
            "last_error = 'not delivered within max_event_age' || "
            "  COALESCE('; last error: ' || last_error, '') "
            "WHERE id IN (SELECT id FROM outbox WHERE destination = ? AND state = ? "
            "  AND created_at < ?) RETURNING id",
            (DEAD, now, dest, PENDING, cutoff),
        ).fetchall()
        if rows:
            out[dest] = len(rows)
    return out


def _reset_in_flight(conn: sqlite3.Connection) -> int:
    return conn.execute(
        "UPDATE outbox SET state = ? WHERE state = ?", (PENDING, IN_FLIGHT)
    ).rowcount


def _register_destination(
    conn: sqlite3.Connection, name: str, key_id: str, website_id: int
) -> None:
    conn.execute(
        "INSERT INTO destinations (name, key_id, website_id) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, "
        "website_id = excluded.website_id",
        (name, key_id, website_id),
    )


def _set_paused(
    conn: sqlite3.Connection,
    names: list[str],
    reason: str | None,
    now: float,
    until: float | None,
) -> None:
    conn.executemany(
        "UPDATE destinations SET paused_reason = ?, paused_until = ?, "
        "paused_at = CASE WHEN ? IS NULL THEN NULL ELSE COALESCE(paused_at, ?) END "
        "WHERE name = ?",
        [(reason, until if reason is not None else None, reason, now, name) for name in names],
    )


def _set_error(conn: sqlite3.Connection, name: str, error: str, now: float) -> None:
    conn.execute(
        "UPDATE destinations SET last_error = ?, last_error_at = ? WHERE name = ?",
        (error, now, name),
    )


def _destinations(conn: sqlite3.Connection) -> list[DestinationRow]:
    return [
        DestinationRow(
            r["name"],
            r["key_id"],
            r["website_id"],
            r["paused_reason"],
            r["paused_at"],
            r["paused_until"],
            r["last_success_at"],
            r["last_error"],
            r["last_error_at"],
        )
        for r in conn.execute("SELECT * FROM destinations ORDER BY name")
    ]


def _begin_request(conn: sqlite3.Connection, key_id: str, latest: float) -> int:
    row = conn.execute(
        "INSERT INTO sent (key_id, at) VALUES (?, ?) RETURNING id", (key_id, latest)
    ).fetchone()
    return int(row[0])


def _end_request(conn: sqlite3.Connection, request_id: int, at: float | None) -> None:
    if at is None:
        conn.execute("DELETE FROM sent WHERE id = ?", (request_id,))
    else:
        conn.execute("UPDATE sent SET at = ? WHERE id = ?", (at, request_id))


def _requests_since(conn: sqlite3.Connection, key_id: str, since: float) -> list[float]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT at FROM sent WHERE key_id = ? AND at >= ? ORDER BY at", (key_id, since)
        )
    ]


def _counts(conn: sqlite3.Connection) -> Counts:
    by_state: dict[str, dict[int, int]] = {}
    for name, state, n in conn.execute(
        "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state"
    ):
        by_state.setdefault(name, {})[state] = n
    oldest = {
        r[0]: r[1]
        for r in conn.execute(
            "SELECT destination, min(created_at) FROM outbox WHERE state IN (?, ?) "
            "GROUP BY destination",
            (PENDING, IN_FLIGHT),
        )
    }
    return Counts(
        by_state,
        oldest,
        conn.execute("SELECT count(*) FROM dedupe").fetchone()[0],
        conn.execute("SELECT count(*) FROM webhooks").fetchone()[0],
        conn.execute("SELECT count(*) FROM unmapped").fetchone()[0],
    )


_ENTRY = (
    "SELECT o.id, o.destination, w.source, o.webhook_id, o.event_key, o.event_type, o.rule, "
    "o.body, o.state, "
    "o.attempts, o.last_error, o.track_id, o.created_at, o.done_at "
    "FROM outbox o LEFT JOIN webhooks w ON w.id = o.webhook_id "
)


def _entry(r: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(*tuple(r))


def _dead_letters(conn: sqlite3.Connection, limit: int | None) -> list[OutboxEntry]:
    rows = conn.execute(
        _ENTRY + "WHERE o.state = ? ORDER BY o.id DESC LIMIT ?",
        (DEAD, -1 if limit is None else limit),
    )
    return [_entry(r) for r in rows]


def _outbox_entry(conn: sqlite3.Connection, row_id: int) -> OutboxEntry | None:
    r = conn.execute(_ENTRY + "WHERE o.id = ?", (row_id,)).fetchone()
    return _entry(r) if r is not None else None


def _requeue(conn: sqlite3.Connection, items: list[tuple[int, str]], now: float) -> list[int]:
    done = []
    for row_id, body in items:
        n = conn.execute(
            "UPDATE outbox SET state = ?, body = ?, attempts = 0, last_error = NULL, "
            "created_at = ?, done_at = NULL WHERE id = ? AND state = ?",
            (PENDING, body, now, row_id, DEAD),
        ).rowcount
        if n:
            done.append(row_id)
    return done


_NO_ID = 1 << 62  # `before` when none is given: past every id


def _summaries(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[WebhookSummary]:
    """The webhooks of one page with their outbox rows' states and types (one more query)."""
    ids = [r["id"] for r in rows]
    if not ids:
        return []
    states: dict[int, dict[int, int]] = {}
    types: dict[int, dict[str, None]] = {}
    for wid, state, etype, n in conn.execute(
        f"SELECT webhook_id, state, event_type, count(*) FROM outbox "
        f"WHERE webhook_id IN ({_in(ids)}) GROUP BY webhook_id, state, event_type",
        ids,
    ):
        per = states.setdefault(wid, {})
        per[state] = per.get(state, 0) + n
        if etype is not None:
            types.setdefault(wid, {})[etype] = None
    waiting = {
        r[0]
        for r in conn.execute(
            f"SELECT webhook_id FROM unmapped WHERE webhook_id IN ({_in(ids)})", ids
        )
    }
    return [
        WebhookSummary(
            _stored(r), states.get(r["id"], {}), tuple(types.get(r["id"], {})), r["id"] in waiting
        )
        for r in rows
    ]


_HAS_ROWS = "EXISTS (SELECT 1 FROM outbox o WHERE o.webhook_id = w.id{})"
_OUTCOME_SQL = {
    "dead": _HAS_ROWS.format(f" AND o.state = {DEAD}"),
    "pending": f"(EXISTS (SELECT 1 FROM unmapped u WHERE u.webhook_id = w.id) OR "
    f"{_HAS_ROWS.format(f' AND o.state IN ({PENDING}, {IN_FLIGHT})')}) AND NOT "
    f"{_HAS_ROWS.format(f' AND o.state = {DEAD}')}",
    "delivered": f"{_HAS_ROWS.format('')} AND NOT "
    f"{_HAS_ROWS.format(f' AND o.state <> {DELIVERED}')}"
    " AND NOT EXISTS (SELECT 1 FROM unmapped u WHERE u.webhook_id = w.id)",
    "ignored": f"NOT {_HAS_ROWS.format('')} "
    "AND NOT EXISTS (SELECT 1 FROM unmapped u WHERE u.webhook_id = w.id)",
}


def _webhook_page(
    conn: sqlite3.Connection,
    before: int | None,
    limit: int,
    source: str | None,
    outcome: str | None,
    event_type: str | None,
    after: int | None,
) -> list[WebhookSummary]:
    where = ["w.id < ?", "w.id > ?"]
    params: list[Any] = [_NO_ID if before is None else before, 0 if after is None else after]
    if source is not None:
        where.append("w.source = ?")
        params.append(source)
    if outcome is not None:
        where.append(_OUTCOME_SQL[outcome])
    if event_type is not None:
        where.append(_HAS_ROWS.format(" AND o.event_type = ?"))
        params.append(event_type)
    rows = conn.execute(
        f"SELECT w.* FROM webhooks w WHERE {' AND '.join(where)} ORDER BY w.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return _summaries(conn, rows)


def _search_webhooks(
    conn: sqlite3.Connection, text: str, sources: list[str], before: int | None, limit: int
) -> list[WebhookSummary]:
    top = _NO_ID if before is None else before
    rows: list[sqlite3.Row] = []
    if sources:
        rows = conn.execute(
            f"SELECT w.* FROM webhooks w WHERE w.id < ? AND w.id IN (SELECT webhook_id "
            f"FROM dedupe WHERE key = ? AND source IN ({_in(sources)})) "
            "ORDER BY w.id DESC LIMIT ?",
            (top, text, *sources, limit),
        ).fetchall()
    if not rows:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = conn.execute(
            "SELECT w.* FROM webhooks w WHERE w.id < ? AND CAST(w.body AS TEXT) LIKE ? ESCAPE '\\' "
            "ORDER BY w.id DESC LIMIT ?",
            (top, pattern, limit),
        ).fetchall()
    return _summaries(conn, rows)


def _webhook_outbox(conn: sqlite3.Connection, webhook_id: int) -> list[OutboxEntry]:
    rows = conn.execute(_ENTRY + "WHERE o.webhook_id = ? ORDER BY o.id", (webhook_id,))
    return [_entry(r) for r in rows]


def _event_owners(conn: sqlite3.Connection, source: str, keys: list[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        for key, wid in conn.execute(
            f"SELECT key, webhook_id FROM dedupe WHERE source = ? AND key IN ({_in(chunk)})",
            (source, *chunk),
        ):
            out[key] = wid
    return out


def _activity(conn: sqlite3.Connection, since: float, step: float, now: float) -> Activity:
    # CAST truncates towards zero in SQLite (the values are >= 0); floor() elsewhere.
    received = {
        int(b): n
        for b, n in conn.execute(
            "SELECT CAST((received_at - ?) / ? AS INTEGER) AS b, count(*) FROM webhooks "
            "WHERE received_at >= ? AND received_at <= ? GROUP BY b",
            (since, step, since, now),
        )
    }
    delivered = {
        int(b): n
        for b, n in conn.execute(
            "SELECT CAST((done_at - ?) / ? AS INTEGER) AS b, count(*) FROM outbox "
            "WHERE state = ? AND done_at >= ? AND done_at <= ? GROUP BY b",
            (since, step, DELIVERED, since, now),
        )
    }
    return Activity(received, delivered)


def _rule_counts(conn: sqlite3.Connection, since: float) -> dict[tuple[str, int | None], int]:
    return {
        (source, rule): n
        for source, rule, n in conn.execute(
            "SELECT w.source, o.rule, count(*) FROM webhooks w "
            "JOIN outbox o ON o.webhook_id = w.id WHERE w.received_at >= ? "
            "GROUP BY w.source, o.rule",
            (since,),
        )
    }


def _dead_letter_page(
    conn: sqlite3.Connection, before: int | None, limit: int, source: str | None
) -> list[OutboxEntry]:
    top = _NO_ID if before is None else before
    if source is None:
        rows = conn.execute(
            _ENTRY + "WHERE o.state = ? AND o.id < ? ORDER BY o.id DESC LIMIT ?",
            (DEAD, top, limit),
        )
    else:
        rows = conn.execute(
            _ENTRY + "WHERE o.state = ? AND o.id < ? AND w.source = ? ORDER BY o.id DESC LIMIT ?",
            (DEAD, top, source, limit),
        )
    return [_entry(r) for r in rows]


def _dead_letter_ids(conn: sqlite3.Connection, source: str | None) -> list[int]:
    sql = "SELECT id FROM outbox WHERE state = ? ORDER BY id"
    params: tuple[Any, ...] = (DEAD,)
    if source is not None:
        sql = (
            "SELECT o.id FROM outbox o JOIN webhooks w ON w.id = o.webhook_id "
            "WHERE o.state = ? AND w.source = ? ORDER BY o.id"
        )
        params = (DEAD, source)
    return [r[0] for r in conn.execute(sql, params)]


def _touch(conn: sqlite3.Connection) -> None:
    """A real write, so that readiness proves the store takes writes."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('ready_check', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(time.time()),),
    )


def _prune(
    conn: sqlite3.Connection,
    now: float,
    dedupe_window: float,
    retention: float,
    after: int,
    step: int = 500,
) -> tuple[int, int | None]:
    """One small step: expired dedupe keys, old ledger tokens and request times, and webhooks
    past retention whose rows were all delivered (with those rows)."""
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
    removed += conn.execute(
        "DELETE FROM sent WHERE id IN (SELECT id FROM sent WHERE at < ? LIMIT ?)",
        (now - 3600, step),
    ).rowcount
    cutoff = now - retention
    # Webhooks oldest first, by id: received_at grows with the id, so no index on it is needed.
    scanned = conn.execute(
        "SELECT id, received_at FROM webhooks WHERE id > ? ORDER BY id LIMIT ?", (after, step)
    ).fetchall()
    candidates = []
    for r in scanned:
        if r[1] >= cutoff:
            break
        candidates.append(r[0])
    old = (
        [
            r[0]
            for r in conn.execute(
                f"SELECT w.id FROM webhooks w WHERE w.id IN ({_in(candidates)}) "
                "AND NOT EXISTS (SELECT 1 FROM outbox o "
                "  WHERE o.webhook_id = w.id AND o.state != ?) "
                "AND NOT EXISTS (SELECT 1 FROM unmapped u WHERE u.webhook_id = w.id)",
                (*candidates, DELIVERED),
            )
        ]
        if candidates
        else []
    )
    if old:
        conn.execute(f"DELETE FROM outbox WHERE webhook_id IN ({_in(old)})", old)
        removed += conn.execute(f"DELETE FROM webhooks WHERE id IN ({_in(old)})", old).rowcount
    return removed, (candidates[-1] if candidates else None)
