"""The SQLite writer: one task owns the write connection; group commit.

Jobs are functions of the connection. The writer task takes every job that waits, begins one
transaction, runs each job's statements on the event loop (each in a savepoint of its own, or
jobs of one batch function in one call), and hands the COMMIT, which is the fsync, to a thread.
While the disk works the loop goes on and the next group forms. One transaction at a time, one
owner: the task.

Another process that writes (a second worker, the CLI) makes BEGIN busy: the task tries again
shortly, and fails a group whose oldest job has waited the busy timeout (the webhook gets 503
and its sender retries).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import StoreError
from relay.storage.sqlite_schema import connect

log = logging.getLogger("relay.storage")

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
BatchJob = Callable[[sqlite3.Connection, list[Any]], list[Any]]


@dataclass
class _Item:
    job: Job
    future: asyncio.Future[Any]
    deadline: float  # when it stops waiting for the write lock (time.monotonic())
    batch: BatchJob | None = None
    arg: Any = None


@dataclass
class _Group:
    items: list[_Item]
    outcomes: dict[int, tuple[bool, Any]] = field(default_factory=dict)


class Writer:
    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        busy_timeout: float = 10.0,
        max_group: int = 512,
        commit_on_loop: bool = False,
    ):
        """`commit_on_loop`: other processes write to this file too (workers). The write
        lock is held from BEGIN to the end of COMMIT; a COMMIT handed to the thread would
        hold it while the thread waits for the event loop to give up the GIL, and the other
        workers would wait with it. On the loop, the lock is held only as long as the disk
        takes, at the price of the loop waiting for the fsync."""
        self.conn = conn
        self.commit_on_loop = commit_on_loop
        self.busy_timeout = busy_timeout
        self.max_group = max_group
        self.commits = 0
        self.failed_commits = 0
        self.on_commit: Callable[[float], None] | None = None
        self.last_error: str | None = None  # the last write failure, until a commit works
        self._queue: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="relay-commit")
        self._checkpointer = Checkpointer(path)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="store writer")

    async def close(self) -> None:
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)
        self._checkpointer.close()

    # -- jobs

    async def run(self, job: Callable[[sqlite3.Connection], T], wait: float | None = None) -> T:
        """Run a job in the next group and await its commit. `wait`: how long it may wait
        for another process's write lock (default: the busy timeout)."""
        deadline = time.monotonic() + (self.busy_timeout if wait is None else wait)
        return await self._enqueue(_Item(job, self._future(), deadline))  # type: ignore[no-any-return]

    async def apply(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(lambda conn: fn(conn, *args))

    async def batched(self, batch: BatchJob, arg: Any) -> Any:
        """One item of a batch job: every item of a group goes to one `batch` call, which
        returns one result per item (far cheaper than a job per item)."""
        deadline = time.monotonic() + self.busy_timeout
        item = _Item(lambda c: batch(c, [arg])[0], self._future(), deadline, batch, arg)
        return await self._enqueue(item)

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, item: _Item) -> Any:
        if self._closing or self._wake is None:
            raise StoreError("the store is closed")
        self._queue.append(item)
        self._wake.set()
        return await item.future

    # -- the task

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            group = _Group(self._queue[: self.max_group])
            del self._queue[: self.max_group]
            try:
                await self._begin(group)
            except sqlite3.Error as e:
                self._fail(group, e)
                continue
            if not group.items:  # each gave up waiting for the lock
                continue
            try:
                self._execute(group)
            except Exception as e:  # the transaction itself broke: nothing of it stays
                self._rollback()
                self._fail(group, e)
                continue
            try:
                if self.commit_on_loop:
                    seconds = self._commit()
                else:
                    seconds = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._commit
                    )
            except sqlite3.Error as e:
                self._rollback()
                self._fail(group, e)
                continue
            self.commits += 1
            self.last_error = None
            if self.on_commit is not None:
                self.on_commit(seconds)
            self._checkpointer.poke()
            for n, item in enumerate(group.items):
                ok, value = group.outcomes[n]
                _settle(item, ok, value)

    async def _begin(self, group: _Group) -> None:
        """BEGIN IMMEDIATE; while another process writes, again shortly. Jobs asked meanwhile
        join the waiting group, so that each waits from when it was asked, not behind the
        others' longer waits. A job whose deadline passes fails alone (its webhook gets 503);
        the others go on waiting, until the writer closes."""
        pause = 0.001
        while group.items:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not busy(e):
                    raise
                if self._closing:  # nobody waits out the lock for a closed writer
                    closed = StoreError("the store is closed")
                    for item in group.items:
                        _settle(item, False, closed)
                    group.items = []
                    return
                room = self.max_group - len(group.items)
                if room > 0 and self._queue:
                    group.items += self._queue[:room]
                    del self._queue[:room]
                now = time.monotonic()
                late = [i for i in (*group.items, *self._queue) if i.deadline <= now]
                if late:
                    self._fail(_Group(late), e)
                    group.items = [i for i in group.items if i.deadline > now]
                    self._queue = [i for i in self._queue if i.deadline > now]
                    if not group.items:
                        return
                left = min(i.deadline for i in group.items) - now
                await asyncio.sleep(max(0.0, min(pause, left)))
                pause = min(pause * 2, 0.002)

    def _commit(self) -> float:
        started = time.perf_counter()
        self.conn.execute("COMMIT")
        return time.perf_counter() - started

    def _execute(self, group: _Group) -> None:
        """Each batch function once for all its items, each other job in a savepoint of its
        own: one failing job sinks nothing else."""
        conn = self.conn
        items = group.items
        batches: dict[BatchJob, list[int]] = {}
        for n, item in enumerate(items):
            if item.batch is not None:
                batches.setdefault(item.batch, []).append(n)
        for batch, members in batches.items():
            if len(members) < 2:
                continue
            conn.execute("SAVEPOINT batch")
            try:
                results = batch(conn, [items[n].arg for n in members])
                conn.execute("RELEASE batch")
            except Exception:  # one item refused: run them one by one below
                if not conn.in_transaction:  # SQLite rolled it all back (a full disk)
                    raise
                conn.execute("ROLLBACK TO batch")
                conn.execute("RELEASE batch")
                continue
            for n, result in zip(members, results, strict=True):
                group.outcomes[n] = (True, result)
        for n, item in enumerate(items):
            if n in group.outcomes:
                continue
            conn.execute("SAVEPOINT job")
            try:
                group.outcomes[n] = (True, item.job(conn))
                conn.execute("RELEASE job")
            except Exception as e:
                if not conn.in_transaction:  # the group's earlier jobs went with it
                    raise
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                group.outcomes[n] = (False, e)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _fail(self, group: _Group, e: Exception) -> None:
        self.failed_commits += 1
        reason = "database is locked (another process holds its write lock)" if busy(e) else str(e)
        self.last_error = reason
        log.error("database write failed: %s", reason)
        error = StoreError(f"database write failed: {reason}")
        for item in group.items:
            _settle(item, False, error)


def busy(e: Exception) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _settle(item: _Item, ok: bool, value: Any) -> None:
    if item.future.done():  # its waiter was cancelled
        return
    if ok:
        item.future.set_result(value)
    else:
        if isinstance(value, sqlite3.Error):
            value = StoreError(f"database error: {value}")
        item.future.set_exception(value)


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
