"""The SQLite file: numbered migrations, and one writer thread that owns the write connection.

Every write goes through the writer. It takes all the jobs waiting in its queue, runs each in
its own savepoint inside one transaction and commits once (group commit), so that many
concurrent webhooks share one fsync. A job that fails is rolled back alone; a commit that
fails fails every job of the group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from relay.errors import StoreError

log = logging.getLogger("relay.store")

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        received_at REAL NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,            -- JSON object, names lower-cased, credentials removed
        body BLOB NOT NULL
    );
    CREATE INDEX webhooks_received ON webhooks (received_at);

    CREATE TABLE dedupe (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (source, key)
    ) WITHOUT ROWID;
    CREATE INDEX dedupe_seen ON dedupe (seen_at);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        webhook_id INTEGER NOT NULL REFERENCES webhooks (id),
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        type TEXT NOT NULL,
        outcome TEXT NOT NULL,            -- mapped | ignored | failed
        received_at REAL NOT NULL
    );
    CREATE INDEX events_webhook ON events (webhook_id);
    CREATE INDEX events_received ON events (received_at);

    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        destination TEXT NOT NULL,        -- "<api key fingerprint>/<website id>"
        event_id INTEGER REFERENCES events (id),
        rule INTEGER,                     -- the mapping rule that made it
        body TEXT,                        -- the track event as JSON; NULL when mapping failed
        created_at REAL NOT NULL,
        state INTEGER NOT NULL DEFAULT 0, -- 0 pending, 1 in flight, 2 delivered, 3 dead
        batch_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        track_id INTEGER,                 -- the event id the track API gave it
        done_at REAL
    );
    CREATE INDEX outbox_queue ON outbox (destination, state, id);
    CREATE INDEX outbox_done ON outbox (state, done_at);
    CREATE INDEX outbox_event ON outbox (event_id);

    CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        website_id INTEGER NOT NULL,
        paused_reason TEXT,
        paused_at REAL,
        last_success_at REAL,
        last_error TEXT,
        last_error_at REAL
    );

    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
]

_STOP = object()


@dataclass
class _Item:
    """One job in the writer's queue, and where its result goes."""

    job: Job
    future: concurrent.futures.Future[Any] | asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop | None = None
    batch: BatchJob | None = None  # jobs of the same batch function run as one call
    arg: Any = None


BatchJob = Callable[[sqlite3.Connection, list[Any]], list[Any]]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=10,
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        # FULL: a commit is on disk before any webhook of it is answered, also across power loss.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this file has not seen yet; returns the schema version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the database has schema version {version}, newer than this relay knows "
            f"({len(MIGRATIONS)}); upgrade the relay"
        )
    for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql};\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("database migrated to version %d", number)
    return len(MIGRATIONS)


class Writer:
    """The one thread that writes. Jobs are functions of the connection."""

    def __init__(self, path: Path, max_group: int = 512):
        self.path = path
        self.max_group = max_group
        self.conn = connect(path)
        migrate(self.conn)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="relay-writer", daemon=True)
        self._closed = False
        self.commits = 0
        self.failed_commits = 0
        self._thread.start()

    def _put(self, item: _Item) -> None:
        if self._closed:
            item.future.set_exception(StoreError("the store is closed"))
            return
        self._queue.put(item)

    def submit(self, job: Job) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put(_Item(job, fut))
        return fut

    def call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run a job and wait for its commit (for threads and the CLI)."""
        result: T = self.submit(job).result()
        return result

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run a job and await its commit, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Item(job, fut, loop))
        return await fut

    async def run_batched(self, batch: BatchJob, arg: Any) -> Any:
        """Await one item of a batch job: every item of a group goes to one `batch` call,
        which returns one result per item (far cheaper than a job per item)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._put(_Item(lambda conn: batch(conn, [arg])[0], fut, loop, batch, arg))
        return await fut

    async def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Await fn(connection, *args) in the writer."""
        return await self.run(lambda conn: fn(conn, *args))

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            group = [item]
            stop = False
            while len(group) < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[_Item]) -> None:
        conn = self.conn
        outcomes: dict[int, tuple[bool, Any]] = {}
        batches: dict[BatchJob, list[int]] = {}
        for n, item in enumerate(group):
            if item.batch is not None:
                batches.setdefault(item.batch, []).append(n)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for batch, members in batches.items():
                if len(members) < 2:
                    continue
                conn.execute("SAVEPOINT batch")
                try:
                    results = batch(conn, [group[n].arg for n in members])
                    conn.execute("RELEASE batch")
                except Exception:  # one item refused: run them one by one below
                    conn.execute("ROLLBACK TO batch")
                    conn.execute("RELEASE batch")
                    continue
                for n, result in zip(members, results, strict=True):
                    outcomes[n] = (True, result)
            for n, item in enumerate(group):
                if n in outcomes:
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    outcomes[n] = (True, item.job(conn))
                    conn.execute("RELEASE job")
                except Exception as e:  # one job's failure must not sink the others
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes[n] = (False, e)
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as e:
            self.failed_commits += 1
            log.error("database commit failed: %s", e)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = StoreError(f"database write failed: {e}")
            outcomes = {n: (False, error) for n in range(len(group))}
        self._settle(group, outcomes)

    @staticmethod
    def _settle(group: list[_Item], outcomes: dict[int, tuple[bool, Any]]) -> None:
        """Hand every result back: one wake-up per event loop, not one per job."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, bool, Any]]] = {}
        for n, item in enumerate(group):
            ok, value = outcomes[n]
            if not ok and isinstance(value, sqlite3.Error):
                value = StoreError(f"database error: {value}")
            if item.loop is None:
                _resolve(item.future, ok, value)
            else:
                per_loop.setdefault(item.loop, []).append((item.future, ok, value))
        for loop, entries in per_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, entries)
            except RuntimeError:
                pass  # that loop is closed: nobody waits any more


def _resolve(fut: Any, ok: bool, value: Any) -> None:
    if fut.done():  # cancelled by its waiter
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _resolve_all(entries: list[tuple[Any, bool, Any]]) -> None:
    for fut, ok, value in entries:
        _resolve(fut, ok, value)
