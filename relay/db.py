"""The SQLite file: numbered migrations, the writer, and the checkpointer.

Every write goes through the writer: one connection, one transaction at a time, many jobs per
transaction (group commit) so that many concurrent webhooks share one fsync. A job that fails
is rolled back alone; a commit that fails fails every job of the group.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import sqlite3
import threading
import time
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
    # 2: the token ledger: which event each signed single-use token (Mailgun's) vouched for,
    # across sources (two sources may share a signing key)
    """
    CREATE TABLE tokens (
        token TEXT PRIMARY KEY,
        source TEXT NOT NULL,             -- where it came first
        key TEXT NOT NULL,                -- the dedupe key of the event it came with
        seen_at REAL NOT NULL,
        expires_at REAL NOT NULL          -- when the signature's age check refuses it anyway
    ) WITHOUT ROWID;
    CREATE INDEX tokens_expiry ON tokens (expires_at);
    """,
]


@dataclass
class _Item:
    """One job in the writer's queue, and where its result goes."""

    job: Job
    future: concurrent.futures.Future[Any] | asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop | None = None
    batch: BatchJob | None = None  # jobs of the same batch function run as one call
    arg: Any = None
    # A batch item not yet written by then fails: the lock was not free for `timeout` s.
    deadline: float = math.inf
    timeout: float = math.inf


BatchJob = Callable[[sqlite3.Connection, list[Any]], list[Any]]


def connect(
    path: Path, *, readonly: bool = False, checkpointer: bool = False
) -> sqlite3.Connection:
    """A connection to the relay's file. Raises StoreError naming the file when it cannot be
    opened (a directory, not a database, no permission, a read-only disk)."""
    try:
        return _connect(path, readonly, checkpointer)
    except (sqlite3.Error, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StoreError(f"cannot open the database {path}: {reason}") from None


def _connect(path: Path, readonly: bool, checkpointer: bool) -> sqlite3.Connection:
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
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        if checkpointer:
            conn.execute("PRAGMA synchronous = FULL")
            return conn
        if not readonly:
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            # FULL: a commit is on disk before any webhook of it is answered, also across power
            # loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = OFF")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, migrations: list[str] = MIGRATIONS) -> int:
    """Apply the migrations this file has not seen yet; returns the schema version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise StoreError(
            f"the database has schema version {version}, newer than this relay knows "
            f"({len(migrations)}); upgrade the relay"
        )
    for number, sql in enumerate(migrations[version:], start=version + 1):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql};\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("database migrated to version %d", number)
    return len(migrations)


class Writer:
    """The one connection that writes, and the thread that commits. Jobs are functions of it.

    Jobs in general (:meth:`run`, :meth:`call`) run in the writer thread: it takes all that
    wait, runs each in a savepoint of its own inside one transaction and commits once (group
    commit), so that many share one fsync; a failing job is rolled back alone.

    Webhooks take a shorter road (:meth:`run_batched`): the event loop begins a transaction,
    runs one batch call for every webhook that waits, and hands the COMMIT (the fsync) to the
    thread, or with `commit_on_loop` commits itself. The thread gives up the GIL for every
    SQLite step and must win it back from a busy event loop each time (up to the switch
    interval): a group the thread wrote itself would pay that once per statement, the loop's
    group pays it once.

    One transaction is open at a time, the loop's or the thread's. Another process that writes
    (a second worker, the CLI) makes BEGIN busy: the loop tries again a millisecond later, the
    thread waits as SQLite's busy timeout would. Each webhook waits at most `busy_timeout` from
    the moment it arrived, whatever it waits behind (the other process's lock, or a thread
    transaction that itself waits for that lock); then it fails, and its sender retries.
    """

    def __init__(
        self,
        path: Path,
        max_group: int = 512,
        busy_timeout: float = 10.0,
        commit_on_loop: bool = False,
    ):
        self.path = path
        # Where the loop's groups are committed. In the thread (the default), the loop goes on
        # serving requests during the fsync. On the loop, for processes that share the file
        # with other writers (workers > 1): the write lock is then held for the statements and
        # the fsync only, not also for the thread's wait to win the GIL back.
        self.commit_on_loop = commit_on_loop
        self.max_group = max_group
        self.busy_timeout = busy_timeout
        self.conn = connect(path)
        migrate(self.conn)
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
        self.conn.execute(f"PRAGMA journal_size_limit = {16 << 20}")  # kept when it starts over
        self.conn.execute("PRAGMA busy_timeout = 0")  # waits are ours: see _begin
        self.commits = 0
        self.failed_commits = 0
        self.on_commit: Callable[[float], None] | None = None  # seconds each COMMIT took
        self._closed = False
        # shared with the thread, under _cv
        self._cv = threading.Condition()
        self._jobs: collections.deque[_Item] = collections.deque()
        self._to_commit: _LoopTxn | None = None
        self._loop_txn = False  # the event loop has a transaction open
        self._thread_txn = False  # the thread has one open
        self._loop_waiting = False  # the loop waits for the thread's transaction to end
        self._stopping = False
        # the event loop's own
        self._pending: list[_Item] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._pending_deadline = math.inf  # the earliest deadline of _pending (or earlier)
        self._expiry: asyncio.TimerHandle | None = None  # fails _pending items on time
        self._expiry_loop: asyncio.AbstractEventLoop | None = None
        self._expiry_at = math.inf
        self._checkpointer = Checkpointer(path)
        self._thread = threading.Thread(target=self._run, name="relay-writer", daemon=True)
        self._thread.start()

    # -- jobs for the thread

    def _put(self, item: _Item) -> None:
        if self._closed:
            item.future.set_exception(StoreError("the store is closed"))
            return
        with self._cv:
            self._jobs.append(item)
            self._cv.notify()

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

    async def apply(self, fn: Callable[..., T], *args: Any) -> T:
        """Await fn(connection, *args) in the writer."""
        return await self.run(lambda conn: fn(conn, *args))

    # -- batch items written on the event loop

    async def run_batched(self, batch: BatchJob, arg: Any, timeout: float | None = None) -> Any:
        """Await one item of a batch job: every item of a group goes to one `batch` call,
        which returns one result per item (far cheaper than a job per item).

        The item fails with StoreError if its group cannot begin within `timeout` seconds
        (`busy_timeout` by default) because the write lock is not free."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        timeout = self.busy_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        item = _Item(lambda conn: batch(conn, [arg])[0], fut, loop, batch, arg, deadline, timeout)
        if self._closed:
            raise StoreError("the store is closed")
        if self._pending_loop is not None and self._pending_loop is not loop:
            self._put(item)  # another loop's items are waiting: the thread writes this one
            return await fut
        self._pending_loop = loop
        self._pending.append(item)
        self._pending_deadline = min(self._pending_deadline, deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        """On the event loop: write the waiting items, unless a transaction is open (whoever
        ends it calls this again)."""
        self._flush_scheduled = False
        loop = self._pending_loop
        if not self._pending or loop is None:
            with self._cv:
                if not self._loop_txn:
                    self._pending_loop = None  # every item was written or failed
            return
        if self._closed:
            self._fail_pending(StoreError("the store is closed"))
            return
        with self._cv:
            blocked = self._loop_txn or self._thread_txn
            if blocked:
                self._loop_waiting = True
            else:
                self._loop_txn = True
        if blocked:  # whoever ends that transaction calls this again
            self._expire(time.monotonic())
            self._expire_later(loop)
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            with self._cv:
                self._loop_txn = False
                self._cv.notify()
            if _busy(e):  # another process writes: try again shortly, within each deadline
                self._expire(time.monotonic())
                if self._pending:
                    self._flush_scheduled = True
                    loop.call_later(0.001, self._flush)
                return
            log.error("database write failed: %s", e)
            self.failed_commits += 1
            self._fail_pending(StoreError(f"database write failed: {e}"))
            return
        group = self._pending[: self.max_group]
        del self._pending[: self.max_group]
        if not self._pending:
            self._pending_deadline = math.inf
        txn = _LoopTxn(loop, group)
        try:
            txn.outcomes = self._execute(group)
        except sqlite3.Error as e:
            txn.error = e
        if self.commit_on_loop:
            self._commit_here(txn)
            return
        with self._cv:
            self._to_commit = txn
            self._cv.notify()

    def _commit_here(self, txn: _LoopTxn) -> None:
        """On the event loop: commit the group it just wrote. The fsync blocks this loop, but
        the write lock is held only as long as the disk takes; see `commit_on_loop`."""
        self._end_loop_txn(txn)
        txn.loop.call_soon(self._committed, txn)

    def _committed(self, txn: _LoopTxn) -> None:
        """On the event loop: the group's commit is done (or failed); answer, then go on."""
        if txn.error is not None:
            error = StoreError(f"database write failed: {txn.error}")
            for item in txn.group:
                _settle_one(item, False, error)
        else:
            for n, item in enumerate(txn.group):
                ok, value = txn.outcomes[n]
                _settle_one(item, ok, value)
        if self._pending:
            self._flush()
        elif self._pending_loop is txn.loop:
            self._pending_loop = None

    def _fail_pending(self, error: StoreError) -> None:
        pending, self._pending = self._pending, []
        self._pending_loop = None
        self._pending_deadline = math.inf
        for item in pending:
            _settle_one(item, False, error)

    def _expire(self, now: float) -> None:
        """On the event loop: fail the waiting items whose time is up; the lock was not free."""
        if now < self._pending_deadline:
            return
        keep: list[_Item] = []
        for item in self._pending:
            if item.deadline > now:
                keep.append(item)
                continue
            _settle_one(
                item,
                False,
                StoreError(
                    f"database write failed: database is locked (the write lock was not free "
                    f"for {item.timeout:g} s; another process holds it)"
                ),
            )
        if len(keep) < len(self._pending):
            log.error(
                "database is locked: %d write(s) waited their whole time for the lock",
                len(self._pending) - len(keep),
            )
        self._pending = keep
        self._pending_deadline = min((i.deadline for i in keep), default=math.inf)

    def _expire_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """While a transaction keeps the loop's items waiting, fail each on its deadline."""
        if self._pending_deadline == math.inf:
            return
        if self._expiry is not None and self._expiry_loop is loop:
            if self._expiry_at <= self._pending_deadline:
                return  # due soon enough
            self._expiry.cancel()  # a shorter wait came in: check on its time
        self._expiry_at = self._pending_deadline
        self._expiry_loop = loop
        delay = max(0.0, self._expiry_at - time.monotonic())
        self._expiry = loop.call_later(delay, self._expiry_due, loop)

    def _expiry_due(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._expiry_loop:
            return  # a timer of a loop that has been replaced since
        self._expiry = None
        self._expire(time.monotonic())
        with self._cv:
            blocked = self._loop_txn or self._thread_txn
        if blocked and self._pending:
            self._expire_later(loop)

    # -- the thread

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self._checkpointer.close()
        self._fail_pending(StoreError("the store is closed"))
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()

    def _run(self) -> None:
        while True:
            txn: _LoopTxn | None = None
            group: list[_Item] = []
            with self._cv:
                while True:
                    if self._to_commit is not None:
                        txn, self._to_commit = self._to_commit, None
                        break
                    if self._jobs and not self._loop_txn:
                        while self._jobs and len(group) < self.max_group:
                            group.append(self._jobs.popleft())
                        self._thread_txn = True
                        break
                    if self._stopping and not self._loop_txn:
                        return
                    self._cv.wait()
            if txn is not None:
                self._commit_loop_txn(txn)
                continue
            self._commit(group)
            with self._cv:
                self._thread_txn = False
                wake, self._loop_waiting = self._loop_waiting, False
                loop = self._pending_loop
            if wake and loop is not None:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(self._flush)

    def _commit_loop_txn(self, txn: _LoopTxn) -> None:
        self._end_loop_txn(txn)
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            txn.loop.call_soon_threadsafe(self._committed, txn)

    def _end_loop_txn(self, txn: _LoopTxn) -> None:
        """Commit the loop's group, or roll it back when it broke; the connection is free."""
        if txn.error is None:
            try:
                self._commit_now()
            except sqlite3.Error as e:
                txn.error = e
        if txn.error is not None:
            self.failed_commits += 1
            log.error("database commit failed: %s", txn.error)
            self._rollback()
        with self._cv:
            self._loop_txn = False
            self._loop_waiting = False  # _committed goes on with what waits
            self._cv.notify()

    def _commit_now(self) -> None:
        started = time.perf_counter()
        self.conn.execute("COMMIT")
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        self._checkpointer.poke()

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting up to busy_timeout for another process that writes."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.0005
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _busy(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _execute(self, group: list[_Item]) -> dict[int, tuple[bool, Any]]:
        """Run a group's jobs inside the open transaction: each batch function once for all its
        items, each other job in a savepoint of its own, so one failing job sinks nothing else.
        Raises sqlite3.Error when the transaction itself is broken."""
        conn = self.conn
        outcomes: dict[int, tuple[bool, Any]] = {}
        batches: dict[BatchJob, list[int]] = {}
        for n, item in enumerate(group):
            if item.batch is not None:
                batches.setdefault(item.batch, []).append(n)
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
        return outcomes

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _commit(self, group: list[_Item]) -> None:
        try:
            self._begin()
            outcomes = self._execute(group)
            self._commit_now()
        except sqlite3.Error as e:
            self.failed_commits += 1
            log.error("database commit failed: %s", e)
            self._rollback()
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


def _busy(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class Checkpointer:
    """Copies the write-ahead log back into the database file, beside the writer.

    SQLite's own checkpoints run inside the commit that crosses 1,000 pages, and hold up every
    webhook of the next group for as long as they copy and fsync (100 ms and more under load).
    A PASSIVE checkpoint from a connection of its own runs while the writer goes on committing.
    Under sustained writes the log is never fully copied at the moment a transaction starts,
    so it would never start over and would keep growing: past `restart_pages` a RESTART
    checkpoint makes it start over, holding up writers briefly (most of it is copied by then).
    """

    def __init__(self, path: Path, interval: float = 0.2, restart_pages: int = 16_384):
        self.interval = interval
        self.restart_pages = restart_pages  # 64 MB of 4 KB pages
        self.conn = connect(path, checkpointer=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.checkpoints = 0
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name="relay-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A commit happened: a checkpoint is due within `interval`."""
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.conn.close()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.wait(self.interval):  # let commits gather: one checkpoint for many
                return
            self._wake.clear()
            try:
                self.checkpoint()
            except sqlite3.Error as e:  # the next commit tries again
                log.warning("database checkpoint failed: %s", e)

    def checkpoint(self) -> None:
        _busy, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        if frames >= self.restart_pages and copied >= frames:
            self.conn.execute("PRAGMA wal_checkpoint(RESTART)")
            self.restarts += 1


class _LoopTxn:
    """A group the event loop wrote, waiting for the thread to commit it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, group: list[_Item]) -> None:
        self.loop = loop
        self.group = group
        self.outcomes: dict[int, tuple[bool, Any]] = {}
        self.error: BaseException | None = None


def _settle_one(item: _Item, ok: bool, value: Any) -> None:
    if not ok and isinstance(value, sqlite3.Error):
        value = StoreError(f"database error: {value}")
    _resolve(item.future, ok, value)


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
