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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.db import Checkpointer
from relay.errors import StoreError

log = logging.getLogger("relay.storage")

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
BatchJob = Callable[[sqlite3.Connection, list[Any]], list[Any]]


@dataclass
class _Item:
    job: Job
    future: asyncio.Future[Any]
    queued_at: float
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
    ):
        self.conn = conn
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

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run a job in the next group and await its commit."""
        return await self._enqueue(_Item(job, self._future(), time.monotonic()))  # type: ignore[no-any-return]

    async def apply(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(lambda conn: fn(conn, *args))

    async def batched(self, batch: BatchJob, arg: Any) -> Any:
        """One item of a batch job: every item of a group goes to one `batch` call, which
        returns one result per item (far cheaper than a job per item)."""
        item = _Item(lambda c: batch(c, [arg])[0], self._future(), time.monotonic(), batch, arg)
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
            self._execute(group)
            try:
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
        """BEGIN IMMEDIATE; while another process writes, again shortly, until the oldest job
        of the group has waited `busy_timeout`."""
        deadline = min(i.queued_at for i in group.items) + self.busy_timeout
        pause = 0.001
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                left = deadline - time.monotonic()
                if not busy(e) or left <= 0:
                    raise
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 0.02)

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
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                group.outcomes[n] = (False, e)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _fail(self, group: _Group, e: sqlite3.Error) -> None:
        self.failed_commits += 1
        reason = "another process holds the database's write lock" if busy(e) else str(e)
        self.last_error = reason
        log.error("database write failed: %s", reason)
        error = StoreError(f"database write failed: {reason}")
        for item in group.items:
            _settle(item, False, error)


def busy(e: sqlite3.Error) -> bool:
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
