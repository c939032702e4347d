"""The PostgreSQL backend: several replicas of the relay sharing one database act as one.

- Dedupe and the token ledger are decided by unique constraints in the statement that stores
  them (`INSERT … ON CONFLICT … RETURNING`), whichever replica a retry lands on.
- Rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease: the claiming replica renews the
  lease of its rows in flight while it lives; a row whose lease ran out (its replica died
  mid-batch) is claimable again, so that batch is sent once more, by another replica.
- Retention is pruned by one replica at a time (an advisory lock).

psycopg 3 with an async connection pool; each call is one short transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
from relay.storage.postgres_schema import MIGRATIONS, PRUNE_LOCK, current_version, migrate

log = logging.getLogger("relay.storage")

SCHEMES = ("postgresql", "postgres")
LEASE = 15.0  # seconds a claim holds its rows without a renewal (its replica died)
CONNECT_TIMEOUT = 10.0
READY_TIMEOUT_MS = 2000
SENDER_CHECK = 1.0  # the sender proves its lock's connection alive at most this often
CHANNEL = "relay_queued"
NO_PSYCOPG = "PostgreSQL needs psycopg: pip install 'webhook-relay[postgres]'"
NOW = "extract(epoch from clock_timestamp())"


def is_url(value: str) -> bool:
    """A `postgresql://` or `postgres://` URL (any other `scheme://` is not a file either)."""
    return urlsplit(value).scheme.lower() in SCHEMES and "://" in value


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def sender_key(key_id: str) -> int:
    """The advisory lock of an API key's sender: 64 bits of a hash of its fingerprint."""
    digest = hashlib.blake2b(f"relay sender {key_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _secrets(url: str) -> list[str]:
    found = []
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            found.append(password)
            from urllib.parse import unquote

            found.append(unquote(password))
    if os.environ.get("PGPASSWORD"):
        found.append(os.environ["PGPASSWORD"])
    return [s for s in found if s]


class PostgresStore(Store):
    replicated = True

    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        lease: float | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        self._conninfo = url
        self.url = safe_url(url)
        self.pool_size = pool_size
        self.lease = LEASE if lease is None else lease
        self.connect_timeout = connect_timeout
        self.replica = uuid.uuid4().hex[:16]  # the owner of this process's claims
        self._pool: Any = None
        self._renewer: asyncio.Task[None] | None = None
        self._prune_after = 0
        self._locks: Any = None  # the sender locks' own connection
        self._locks_lock = asyncio.Lock()
        self._held: set[str] = set()
        self._checked = 0.0
        self._watcher: asyncio.Task[None] | None = None

    # -- plumbing

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=int(self.connect_timeout)
        )

    def _clean(self, e: BaseException) -> str:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for secret in _secrets(self._conninfo):
            text = text.replace(secret, "***")
        return text

    async def open(self) -> None:
        try:
            import psycopg
            from psycopg_pool import AsyncConnectionPool
        except ImportError:
            raise StoreError(NO_PSYCOPG) from None
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=int(self.connect_timeout)
            )
        except (psycopg.Error, ValueError) as e:
            raise StoreError(
                f"cannot connect to the database {self.url}: {self._clean(e)}"
            ) from None
        try:
            await migrate(conn)
        except psycopg.Error as e:
            raise StoreError(f"cannot migrate the database {self.url}: {self._clean(e)}") from None
        finally:
            await conn.close()
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.connect_timeout,
            kwargs={"connect_timeout": int(self.connect_timeout)},
            name="relay",
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except Exception as e:
            await pool.close()
            raise StoreError(
                f"cannot connect to the database {self.url}: {self._clean(e)}"
            ) from None
        self._pool = pool
        self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def close(self) -> None:
        for task in (self._renewer, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._renewer = self._watcher = None
        if self._locks is not None:
            locks, self._locks = self._locks, None
            self._held.clear()
            with contextlib.suppress(Exception):
                await locks.close()  # the sender locks go with it: another replica takes over
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[Any]:
        """A connection in a transaction; database errors become StoreError (no password)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise StoreError("the store is closed")
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (InvalidSignature, StoreError):
            raise
        except PoolTimeout as e:
            raise StoreError(f"database unavailable: {self._clean(e)}") from None
        except psycopg.Error as e:
            raise StoreError(f"database error: {self._clean(e)}") from None

    async def _all(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        async with self._tx() as conn:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall())

    async def _run(self, sql: str, params: Any = ()) -> int:
        async with self._tx() as conn:
            cur = await conn.execute(sql, params)
            return int(cur.rowcount)

    async def _renew_leases(self) -> None:
        """While this replica lives, its rows in flight stay its own."""
        while True:
            await asyncio.sleep(max(0.05, self.lease / 3))
            try:
                await self._run(
                    f"UPDATE outbox SET lease_until = {NOW} + %s WHERE state = %s AND owner = %s",
                    (self.lease, IN_FLIGHT, self.replica),
                )
            except StoreError as e:
                log.warning("renewing the lease of rows in flight failed: %s", e)

    # -- the acknowledgement

    async def ingest(self, item: Incoming) -> Ingested:
        """One transaction: the ledger's tokens, the dedupe upsert (whose RETURNING names the
        keys taken), then the webhook. Rows are written in key order, so two webhooks sharing
        keys lock them in the same order."""
        keys = first_each(item.keys)
        async with self._tx() as conn:
            cur = await conn.execute("SELECT nextval(pg_get_serial_sequence('webhooks', 'id'))")
            row = await cur.fetchone()
            webhook_id = int(row[0])
            if item.tokens:
                await _bind_tokens(conn, item)
            ordered_keys = sorted(keys)
            cur = await conn.execute(
                "INSERT INTO dedupe (source, key, seen_at, webhook_id) "
                "SELECT %s, k, %s, %s FROM unnest(%s::text[]) WITH ORDINALITY AS t (k, n) "
                "ORDER BY n "
                "ON CONFLICT (source, key) DO UPDATE SET "
                "  seen_at = excluded.seen_at, webhook_id = excluded.webhook_id "
                "WHERE dedupe.seen_at < excluded.seen_at - %s "
                "RETURNING key",
                (item.source, item.received_at, webhook_id, ordered_keys, item.dedupe_window),
            )
            taken = {r[0] for r in await cur.fetchall()}
            return await _keep(conn, item, webhook_id, keys, taken)

    # -- the mapper

    async def unmapped(self, after: int, limit: int) -> list[StoredWebhook]:
        rows = await self._all(
            "SELECT w.id, w.source, w.received_at, w.content_type, w.headers, w.body, u.keys "
            "FROM unmapped u JOIN webhooks w ON w.id = u.webhook_id "
            "WHERE u.webhook_id > %s ORDER BY u.webhook_id LIMIT %s",
            (after, limit),
        )
        return [_stored(r) for r in rows]

    async def webhook(self, webhook_id: int) -> StoredWebhook | None:
        rows = await self._all(
            "SELECT id, source, received_at, content_type, headers, body, NULL "
            "FROM webhooks WHERE id = %s",
            (webhook_id,),
        )
        return _stored(rows[0]) if rows else None

    async def save_mapped(self, mapped: Sequence[Mapped]) -> dict[str, Queued]:
        """The rows of the webhooks that are still unmapped (saved once, whoever mapped)."""
        if not mapped:
            return {}
        async with self._tx() as conn:
            cur = await conn.execute(
                "DELETE FROM unmapped WHERE webhook_id = ANY(%s) RETURNING webhook_id",
                ([m.webhook_id for m in mapped],),
            )
            mine = {r[0] for r in await cur.fetchall()}
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
            if rows:
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO outbox (destination, webhook_id, event_key, event_type, "
                        "rule, body, created_at, state, last_error, done_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        rows,
                    )
            if pending:  # sent at commit; the sender of each destination's key wakes
                payload = {
                    "r": self.replica,
                    "q": {d: [len(times), min(times)] for d, times in pending.items()},
                }
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(payload)))
        return {
            dest: Queued(
                len(pending.get(dest, [])),
                min(pending[dest]) if dest in pending else None,
                dead.get(dest, 0),
            )
            for dest in set(pending) | set(dead)
        }

    # -- the forwarder

    async def queue_depths(self, destinations: Sequence[str]) -> dict[str, Queued]:
        """Pending rows, with the rows a dead replica left in flight (their lease ran out)."""
        rows = await self._all(
            "SELECT destination, count(*), min(created_at) FROM outbox "
            "WHERE destination = ANY(%s) AND "
            f"  (state = %s OR (state = %s AND lease_until < {NOW})) GROUP BY destination",
            (list(destinations), PENDING, IN_FLIGHT),
        )
        return {r[0]: Queued(int(r[1]), r[2]) for r in rows if r[1]}

    async def claim(self, destination: str, limit: int, now: float) -> list[Row]:
        """Pending rows, and rows in flight whose lease ran out, oldest first; rows another
        transaction is claiming are skipped, not waited for."""
        if limit <= 0:
            return []
        rows = await self._all(
            "UPDATE outbox SET state = %s, attempts = attempts + 1, owner = %s, "
            f"  lease_until = {NOW} + %s "
            "WHERE id IN (SELECT id FROM outbox WHERE destination = %s AND "
            f"  (state = %s OR (state = %s AND lease_until < {NOW})) "
            "  ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
            "RETURNING id, body, created_at, attempts",
            (IN_FLIGHT, self.replica, self.lease, destination, PENDING, IN_FLIGHT, limit),
        )
        return sorted((Row(r[0], r[1], r[2], r[3]) for r in rows), key=lambda r: r.id)

    async def delivered(
        self, ids: Sequence[int], track_ids: Sequence[int | None], destination: str, now: float
    ) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE outbox o SET state = %s, track_id = t.tid, done_at = %s, "
                "  last_error = NULL, owner = NULL, lease_until = NULL "
                "FROM unnest(%s::bigint[], %s::bigint[]) AS t (id, tid) WHERE o.id = t.id",
                (DELIVERED, now, list(ids), list(track_ids)),
            )
            await conn.execute(
                "UPDATE destinations SET last_success_at = %s, paused_reason = NULL, "
                "paused_at = NULL WHERE name = %s",
                (now, destination),
            )

    async def attempted(self, ids: Sequence[int], error: str) -> None:
        await self._run(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s WHERE id = ANY(%s)",
            (error, list(ids)),
        )

    async def release(self, ids: Sequence[int], error: str | None) -> None:
        if ids:
            await self._run(
                "UPDATE outbox SET state = %s, last_error = COALESCE(%s, last_error), "
                "owner = NULL, lease_until = NULL WHERE id = ANY(%s) AND state = %s",
                (PENDING, error, list(ids), IN_FLIGHT),
            )

    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None:
        await self._run(
            "UPDATE outbox SET state = %s, last_error = %s, done_at = %s, owner = NULL, "
            "lease_until = NULL WHERE id = ANY(%s)",
            (DEAD, reason, now, list(ids)),
        )

    async def expire(self, cutoff: float, now: float) -> dict[str, int]:
        rows = await self._all(
            "WITH e AS (UPDATE outbox SET state = %s, done_at = %s, "
            "  last_error = 'not delivered within max_event_age' || "
            "    COALESCE('; last error: ' || last_error, '') "
            "  WHERE state = %s AND created_at < %s "
            "    AND destination IN (SELECT name FROM destinations) "
            "  RETURNING destination) "
            "SELECT destination, count(*) FROM e GROUP BY destination",
            (DEAD, now, PENDING, cutoff),
        )
        return {r[0]: int(r[1]) for r in rows}

    async def reset_in_flight(self) -> int:
        """Rows this replica held, and rows whose lease ran out (their replica died), go
        back to the queue; rows other live replicas are sending stay theirs."""
        return await self._run(
            "UPDATE outbox SET state = %s, owner = NULL, lease_until = NULL "
            f"WHERE state = %s AND (owner = %s OR lease_until IS NULL OR lease_until < {NOW})",
            (PENDING, IN_FLIGHT, self.replica),
        )

    # -- destinations and pauses

    async def register_destination(self, name: str, key_id: str, website_id: int) -> None:
        await self._run(
            "INSERT INTO destinations (name, key_id, website_id) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, "
            "website_id = excluded.website_id",
            (name, key_id, website_id),
        )

    async def set_paused(
        self, names: Sequence[str], reason: str | None, now: float, until: float | None = None
    ) -> None:
        await self._run(
            "UPDATE destinations SET paused_reason = %s::text, paused_until = %s::float8, "
            "paused_at = CASE WHEN %s::text IS NULL THEN NULL "
            "  ELSE COALESCE(paused_at, %s::float8) END "
            "WHERE name = ANY(%s)",
            (reason, until if reason is not None else None, reason, now, list(names)),
        )

    async def set_error(self, name: str, error: str, now: float) -> None:
        await self._run(
            "UPDATE destinations SET last_error = %s, last_error_at = %s WHERE name = %s",
            (error, now, name),
        )

    async def destinations(self) -> list[DestinationRow]:
        rows = await self._all(
            "SELECT name, key_id, website_id, paused_reason, paused_at, paused_until, "
            "last_success_at, last_error, last_error_at FROM destinations ORDER BY name"
        )
        return [DestinationRow(*r) for r in rows]

    # -- the rate-limit log

    async def begin_request(self, key_id: str, latest: float) -> int:
        rows = await self._all(
            "INSERT INTO sent (key_id, at) VALUES (%s, %s) RETURNING id", (key_id, latest)
        )
        return int(rows[0][0])

    async def end_request(self, request_id: int, at: float | None) -> None:
        if at is None:
            await self._run("DELETE FROM sent WHERE id = %s", (request_id,))
        else:
            await self._run("UPDATE sent SET at = %s WHERE id = %s", (at, request_id))

    async def requests_since(self, key_id: str, since: float) -> list[float]:
        rows = await self._all(
            "SELECT at FROM sent WHERE key_id = %s AND at >= %s ORDER BY at", (key_id, since)
        )
        return [r[0] for r in rows]

    # -- operators

    async def counts(self) -> Counts:
        async with self._tx() as conn:
            by_state: dict[str, dict[int, int]] = {}
            cur = await conn.execute(
                "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state"
            )
            for name, state, n in await cur.fetchall():
                by_state.setdefault(name, {})[int(state)] = int(n)
            cur = await conn.execute(
                "SELECT destination, min(created_at) FROM outbox WHERE state IN (%s, %s) "
                "GROUP BY destination",
                (PENDING, IN_FLIGHT),
            )
            oldest = {r[0]: r[1] for r in await cur.fetchall()}
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM dedupe), (SELECT count(*) FROM webhooks), "
                "(SELECT count(*) FROM unmapped)"
            )
            row = await cur.fetchone()
        return Counts(by_state, oldest, int(row[0]), int(row[1]), int(row[2]))

    async def dead_letters(self, limit: int | None = None) -> list[OutboxEntry]:
        rows = await self._all(
            _ENTRY + "WHERE o.state = %s ORDER BY o.id DESC LIMIT %s", (DEAD, limit)
        )
        return [OutboxEntry(*r) for r in rows]

    async def outbox_entry(self, row_id: int) -> OutboxEntry | None:
        rows = await self._all(_ENTRY + "WHERE o.id = %s", (row_id,))
        return OutboxEntry(*rows[0]) if rows else None

    async def requeue(self, items: Sequence[tuple[int, str]], now: float) -> list[int]:
        done: list[int] = []
        async with self._tx() as conn:
            for row_id, body in items:
                cur = await conn.execute(
                    "UPDATE outbox SET state = %s, body = %s, attempts = 0, last_error = NULL, "
                    "created_at = %s, done_at = NULL WHERE id = %s AND state = %s",
                    (PENDING, body, now, row_id, DEAD),
                )
                if cur.rowcount:
                    done.append(row_id)
        return done

    # -- relay import

    async def seen_in(self, source: str, key: str) -> int | None:
        rows = await self._all(
            "SELECT webhook_id FROM dedupe WHERE source = %s AND key = %s", (source, key)
        )
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def import_rows(self, item: Incoming) -> Ingested:
        """A chunk of imported rows: the keys never imported before are taken (one insert
        that skips the others, RETURNING what it took), and the chunk is stored for the
        mapper. Keys in order, so two imports sharing keys lock them in the same order."""
        keys = first_each(item.keys)
        async with self._tx() as conn:
            cur = await conn.execute("SELECT nextval(pg_get_serial_sequence('webhooks', 'id'))")
            row = await cur.fetchone()
            webhook_id = int(row[0])
            cur = await conn.execute(
                "INSERT INTO imported (source, key, webhook_id) "
                "SELECT %s, k, %s FROM unnest(%s::text[]) AS t (k) ORDER BY k "
                "ON CONFLICT (source, key) DO NOTHING RETURNING key",
                (item.source, webhook_id, sorted(keys)),
            )
            took = {r[0] for r in await cur.fetchall()}
            return await _keep(conn, item, webhook_id, keys, took)

    # -- the console

    async def _summaries(self, rows: list[tuple[Any, ...]]) -> list[WebhookSummary]:
        """The webhooks of one page with their outbox rows' states and types."""
        ids = [int(r[0]) for r in rows]
        if not ids:
            return []
        states: dict[int, dict[int, int]] = {}
        types: dict[int, dict[str, None]] = {}
        for wid, state, etype, n in await self._all(
            "SELECT webhook_id, state, event_type, count(*) FROM outbox "
            "WHERE webhook_id = ANY(%s) GROUP BY webhook_id, state, event_type",
            (ids,),
        ):
            per = states.setdefault(wid, {})
            per[state] = per.get(state, 0) + int(n)
            if etype is not None:
                types.setdefault(wid, {})[etype] = None
        waiting = {
            r[0]
            for r in await self._all(
                "SELECT webhook_id FROM unmapped WHERE webhook_id = ANY(%s)", (ids,)
            )
        }
        return [
            WebhookSummary(
                _stored(r), states.get(r[0], {}), tuple(types.get(r[0], {})), r[0] in waiting
            )
            for r in rows
        ]

    async def webhook_page(
        self,
        before: int | None,
        limit: int,
        source: str | None = None,
        outcome: str | None = None,
        event_type: str | None = None,
        after: int | None = None,
    ) -> list[WebhookSummary]:
        where = ["w.id < %s", "w.id > %s"]
        params: list[Any] = [_NO_ID if before is None else before, 0 if after is None else after]
        if source is not None:
            where.append("w.source = %s")
            params.append(source)
        if outcome is not None:
            where.append(_OUTCOME_SQL[outcome])
        if event_type is not None:
            where.append(_HAS_ROWS.format(" AND o.event_type = %s"))
            params.append(event_type)
        rows = await self._all(
            f"{_WEBHOOK} WHERE {' AND '.join(where)} ORDER BY w.id DESC LIMIT %s",
            (*params, limit),
        )
        return await self._summaries(rows)

    async def search_webhooks(
        self, text: str, sources: Sequence[str], before: int | None, limit: int
    ) -> list[WebhookSummary]:
        top = _NO_ID if before is None else before
        rows: list[tuple[Any, ...]] = []
        if sources:
            rows = await self._all(
                f"{_WEBHOOK} WHERE w.id < %s AND w.id IN (SELECT webhook_id FROM dedupe "
                "WHERE key = %s AND source = ANY(%s)) ORDER BY w.id DESC LIMIT %s",
                (top, text, list(sources), limit),
            )
        if not rows:
            rows = await self._all(*_body_search(text, top, limit))
        return await self._summaries(rows)

    async def webhook_outbox(self, webhook_id: int) -> list[OutboxEntry]:
        rows = await self._all(_ENTRY + "WHERE o.webhook_id = %s ORDER BY o.id", (webhook_id,))
        return [OutboxEntry(*r) for r in rows]

    async def event_owners(self, source: str, keys: Sequence[str]) -> dict[str, int | None]:
        rows = await self._all(
            "SELECT key, webhook_id FROM dedupe WHERE source = %s AND key = ANY(%s)",
            (source, list(keys)),
        )
        return {k: w for k, w in rows}

    async def activity(self, since: float, step: float, now: float) -> Activity:
        received = {
            int(b): int(n)
            for b, n in await self._all(
                "SELECT floor((received_at - %s) / %s) AS b, count(*) FROM webhooks "
                "WHERE received_at >= %s AND received_at <= %s GROUP BY b",
                (since, step, since, now),
            )
        }
        delivered = {
            int(b): int(n)
            for b, n in await self._all(
                "SELECT floor((done_at - %s) / %s) AS b, count(*) FROM outbox "
                "WHERE state = %s AND done_at >= %s AND done_at <= %s GROUP BY b",
                (since, step, DELIVERED, since, now),
            )
        }
        return Activity(received, delivered)

    async def rule_counts(self, since: float) -> dict[tuple[str, int | None], int]:
        rows = await self._all(
            "SELECT w.source, o.rule, count(*) FROM webhooks w "
            "JOIN outbox o ON o.webhook_id = w.id WHERE w.received_at >= %s "
            "GROUP BY w.source, o.rule",
            (since,),
        )
        return {(source, rule): int(n) for source, rule, n in rows}

    async def dead_letter_page(
        self, before: int | None, limit: int, source: str | None = None
    ) -> list[OutboxEntry]:
        top = _NO_ID if before is None else before
        if source is None:
            rows = await self._all(
                _ENTRY + "WHERE o.state = %s AND o.id < %s ORDER BY o.id DESC LIMIT %s",
                (DEAD, top, limit),
            )
        else:
            rows = await self._all(
                _ENTRY + "WHERE o.state = %s AND o.id < %s AND w.source = %s "
                "ORDER BY o.id DESC LIMIT %s",
                (DEAD, top, source, limit),
            )
        return [OutboxEntry(*r) for r in rows]

    async def dead_letter_ids(self, source: str | None = None) -> list[int]:
        if source is None:
            rows = await self._all("SELECT id FROM outbox WHERE state = %s ORDER BY id", (DEAD,))
        else:
            rows = await self._all(
                "SELECT o.id FROM outbox o JOIN webhooks w ON w.id = o.webhook_id "
                "WHERE o.state = %s AND w.source = %s ORDER BY o.id",
                (DEAD, source),
            )
        return [int(r[0]) for r in rows]

    async def check_writable(self, need: int) -> str | None:
        """A real write, briefly: a database that cannot take one now is not ready."""
        try:
            async with self._tx() as conn:
                await conn.execute(f"SET LOCAL statement_timeout = {READY_TIMEOUT_MS}")
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('ready_check', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(need),),
                )
        except StoreError as e:
            return str(e)
        return None

    # -- housekeeping

    async def prune(self, now: float, dedupe_window: float, retention: float) -> int:
        """One small step, by one replica at a time: another replica pruning makes this a
        no-op (0)."""
        async with self._tx() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,))
            got = await cur.fetchone()
            if not got or not got[0]:
                return 0
            removed, cursor = await _prune(conn, now, dedupe_window, retention, self._prune_after)
        self._prune_after = cursor if cursor is not None else 0
        return removed + (1 if cursor is not None else 0)

    # -- several replicas

    async def hold_sender(self, key_id: str) -> bool:
        """One sender per API key across replicas: a session advisory lock on a connection of
        its own, so it goes when this process dies (the server ends its session) and another
        replica, asking again, gets it within its next check."""
        import psycopg

        async with self._locks_lock:
            try:
                if self._locks is None or self._locks.closed or self._locks.broken:
                    if self._locks is not None:
                        log.warning("the sender locks' connection was lost; electing again")
                    self._held.clear()
                    self._locks = None
                    self._locks = await self._connect()
                conn = self._locks
                if key_id in self._held:
                    if time.monotonic() - self._checked >= SENDER_CHECK:
                        await conn.execute("SELECT 1")
                        self._checked = time.monotonic()
                    return True
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (sender_key(key_id),))
                row = await cur.fetchone()
                if row and row[0]:
                    self._held.add(key_id)
                    self._checked = time.monotonic()
                    return True
                return False
            except (psycopg.Error, OSError) as e:
                log.warning("sender election failed: %s", self._clean(e))
                self._held.clear()
                if self._locks is not None:
                    with contextlib.suppress(Exception):
                        await self._locks.close()
                self._locks = None
                return False

    def watch_queued(self, callback: Callable[[dict[str, Queued]], None]) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(callback))

    async def _watch(self, callback: Callable[[dict[str, Queued]], None]) -> None:
        """LISTEN for the rows other replicas queue, and pass them on."""
        import psycopg

        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async for notice in conn.notifies():
                        try:
                            data = json.loads(notice.payload)
                        except ValueError:
                            continue
                        if data.get("r") == self.replica:
                            continue  # this process's own mapper told the forwarder already
                        callback({d: Queued(int(n), o) for d, (n, o) in data["q"].items()})
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.warning("listening for queued rows failed: %s", self._clean(e))
            await asyncio.sleep(1.0)

    # -- health

    async def schema_problem(self) -> str | None:
        """None when the database is reachable and migrated, else why not (for `relay check`),
        without migrating anything."""
        try:
            import psycopg
        except ImportError:
            return NO_PSYCOPG
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=int(self.connect_timeout)
            )
        except (psycopg.Error, ValueError) as e:
            return f"cannot connect to the database {self.url}: {self._clean(e)}"
        try:
            version = await current_version(conn)
        except psycopg.Error as e:
            return f"cannot read the database {self.url}: {self._clean(e)}"
        finally:
            await conn.close()
        if version is None or version < len(MIGRATIONS):
            return (
                f"the database {self.url} is not migrated (schema version {version or 0}, "
                f"this relay needs {len(MIGRATIONS)}); `relay serve` migrates it on start"
            )
        if version > len(MIGRATIONS):
            return (
                f"the database {self.url} has schema version {version}, newer than this relay "
                f"knows ({len(MIGRATIONS)}); upgrade the relay"
            )
        return None


_ENTRY = (
    "SELECT o.id, o.destination, w.source, o.webhook_id, o.event_key, o.event_type, o.rule, "
    "o.body, o.state, o.attempts, o.last_error, o.track_id, o.created_at, o.done_at "
    "FROM outbox o LEFT JOIN webhooks w ON w.id = o.webhook_id "
)


_NO_ID = 1 << 62  # `before` when none is given: past every id
_WEBHOOK = (
    "SELECT w.id, w.source, w.received_at, w.content_type, w.headers, w.body, NULL FROM webhooks w"
)
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


def _body_search(text: str, top: int, limit: int) -> tuple[str, tuple[Any, ...]]:
    """Webhooks whose body holds `text`: case-insensitive for ASCII text, as SQLite's LIKE;
    other text is looked for as its UTF-8 bytes. Bodies that are not UTF-8 never fail it."""
    order = " ORDER BY w.id DESC LIMIT %s"
    if text.isascii() and "\\" not in text:
        pattern = "%" + text.replace("%", "\\%").replace("_", "\\_") + "%"
        sql = f"{_WEBHOOK} WHERE w.id < %s AND encode(w.body, 'escape') ILIKE %s ESCAPE '\\'"
        return sql + order, (top, pattern, limit)
    sql = f"{_WEBHOOK} WHERE w.id < %s AND position(%s::bytea in w.body) > 0"
    return sql + order, (top, text.encode(), limit)


async def _keep(
    conn: Any, item: Incoming, webhook_id: int, keys: Sequence[str], taken: set[str]
) -> Ingested:
    """The webhook stored for the mapper when any of its keys was `taken` (new), in the
    transaction that took them; the others were duplicates."""
    ordered = tuple(k for k in keys if k in taken)
    duplicates = len(item.keys) - len(ordered)
    if not ordered:
        return Ingested(None, (), duplicates)
    await conn.execute(
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (webhook_id, item.source, item.received_at, item.content_type, item.headers, item.body),
    )
    every = len(ordered) == len(item.keys)
    await conn.execute(
        "INSERT INTO unmapped (webhook_id, keys) VALUES (%s, %s)",
        (webhook_id, None if every else json.dumps(list(ordered))),
    )
    return Ingested(webhook_id, ordered, duplicates)


def _stored(r: tuple[Any, ...]) -> StoredWebhook:
    keys = r[6]
    return StoredWebhook(
        r[0],
        r[1],
        r[2],
        r[3],
        json.loads(r[4]),
        bytes(r[5]),
        tuple(json.loads(keys)) if keys else None,
    )


async def _bind_tokens(conn: Any, item: Incoming) -> None:
    """Bind each new token to its event (first wins); a token bound to another event refuses
    the webhook (the transaction is rolled back: nothing of it is kept)."""
    pairs = sorted(item.tokens, key=lambda p: p[1].value)  # stable: the first event wins
    await conn.execute(
        "INSERT INTO tokens (token, source, key, seen_at, expires_at) "
        "SELECT t, %s, k, %s, e FROM unnest(%s::text[], %s::text[], %s::float8[]) "
        "  WITH ORDINALITY AS x (t, k, e, n) ORDER BY n "
        "ON CONFLICT (token) DO NOTHING",
        (
            item.source,
            item.received_at,
            [t.value for _, t in pairs],
            [k for k, _ in pairs],
            [t.expires_at for _, t in pairs],
        ),
    )
    cur = await conn.execute(
        "SELECT token, key FROM tokens WHERE token = ANY(%s)", ([t.value for _, t in pairs],)
    )
    bound = dict(await cur.fetchall())
    for key, token in item.tokens:
        if bound.get(token.value) != key:
            raise InvalidSignature("token already used for another event")


async def _prune(
    conn: Any, now: float, dedupe_window: float, retention: float, after: int, step: int = 500
) -> tuple[int, int | None]:
    removed = 0
    for sql, params in (
        (
            "DELETE FROM dedupe WHERE (source, key) IN "
            "(SELECT source, key FROM dedupe WHERE seen_at < %s LIMIT %s)",
            (now - dedupe_window, step),
        ),
        (
            "DELETE FROM tokens WHERE token IN "
            "(SELECT token FROM tokens WHERE expires_at < %s LIMIT %s)",
            (now - dedupe_window, step),
        ),
        (
            "DELETE FROM sent WHERE id IN (SELECT id FROM sent WHERE at < %s LIMIT %s)",
            (now - 3600, step),
        ),
    ):
        cur = await conn.execute(sql, params)
        removed += cur.rowcount
    cutoff = now - retention
    cur = await conn.execute(
        "SELECT id, received_at FROM webhooks WHERE id > %s ORDER BY id LIMIT %s", (after, step)
    )
    candidates = []
    for r in await cur.fetchall():
        if r[1] >= cutoff:
            break
        candidates.append(r[0])
    if not candidates:
        return removed, None
    cur = await conn.execute(
        "SELECT w.id FROM webhooks w WHERE w.id = ANY(%s) "
        "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.webhook_id = w.id AND o.state != %s) "
        "AND NOT EXISTS (SELECT 1 FROM unmapped u WHERE u.webhook_id = w.id)",
        (candidates, DELIVERED),
    )
    old = [r[0] for r in await cur.fetchall()]
    if old:
        await conn.execute("DELETE FROM outbox WHERE webhook_id = ANY(%s)", (old,))
        cur = await conn.execute("DELETE FROM webhooks WHERE id = ANY(%s)", (old,))
        removed += cur.rowcount
    return removed, candidates[-1]
