"""The SQLite writer and the checkpointer, on a real file.

One task owns the write connection: it runs every waiting job's statements in one transaction
on the event loop and commits in a thread. These tests hold it to its promises: a group shares
one commit, a failing item sinks nothing else, another process's write lock is waited out, each
job waits at most its own time for that lock, nothing waits forever on a closed writer, and the
write-ahead log does not grow without bound.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from relay.errors import StoreError
from relay.storage.sqlite_schema import connect
from relay.storage.writer import Checkpointer, Writer


def insert_many(conn: sqlite3.Connection, items: list[tuple[str, int]]) -> list[int]:
    """A batch job: one row per item; an item with v < 0 is refused (the whole call raises)."""
    if any(v < 0 for _, v in items):
        raise ValueError("negative")
    conn.executemany("INSERT INTO t (k, v) VALUES (?, ?)", items)
    return [v * 2 for _, v in items]


def insert(k: str, v: int) -> Callable[[sqlite3.Connection], int]:
    """A job of its own (not a batch item)."""
    return lambda conn: conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, v)).rowcount


@asynccontextmanager
async def opened(
    path: Path, busy_timeout: float = 10.0, commit_on_loop: bool = False
) -> AsyncIterator[Writer]:
    """A started writer on a connection set up as SQLiteStore.open sets it up."""
    conn = connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA busy_timeout = 0")
    w = Writer(conn, path, busy_timeout, commit_on_loop=commit_on_loop)
    w.start()
    try:
        yield w
    finally:
        await w.close()
        conn.close()


def run(path: Path, body: Callable[[Writer], Awaitable[Any]], busy_timeout: float = 10.0) -> Any:
    async def main() -> Any:
        async with opened(path, busy_timeout) as w:
            return await body(w)

    return asyncio.run(main())


def other_process(path: Path) -> sqlite3.Connection:
    """A connection holding the write lock, as a second worker or `relay dead-letters replay`
    would while it writes."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT k, v FROM t"))
    finally:
        conn.close()


def locked(result: Any) -> bool:
    return isinstance(result, StoreError) and "database is locked" in str(result)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


# -- group commit


def test_batch_items_share_one_commit(path: Path) -> None:
    seconds: list[float] = []

    async def body(w: Writer) -> tuple[list[Any], int]:
        w.on_commit = seconds.append
        before = w.commits
        results = await asyncio.gather(*(w.batched(insert_many, (f"k{n}", n)) for n in range(200)))
        return results, w.commits - before

    results, commits = run(path, body)
    assert results == [n * 2 for n in range(200)]
    assert rows(path) == {f"k{n}": n for n in range(200)}
    # all 200 were waiting when the first group began: one or two commits, not 200
    assert 1 <= commits <= 2
    assert len(seconds) == commits and all(s >= 0 for s in seconds)


def test_a_refused_item_fails_alone(path: Path) -> None:
    async def body(w: Writer) -> list[Any]:
        return await asyncio.gather(
            w.batched(insert_many, ("a", 1)),
            w.batched(insert_many, ("bad", -1)),
            w.batched(insert_many, ("b", 2)),
            w.batched(insert_many, ("a", 3)),  # duplicate primary key
            w.run(insert("c", 3)),
            w.run(insert("b", 9)),  # duplicate of a batch item of the same group
            return_exceptions=True,
        )

    a, bad, b, dup, c, dup_job = run(path, body)
    assert (a, b, c) == (2, 4, 1)
    assert isinstance(bad, ValueError)
    assert isinstance(dup, StoreError) and "UNIQUE" in str(dup)
    assert isinstance(dup_job, StoreError) and "UNIQUE" in str(dup_job)
    assert rows(path) == {"a": 1, "b": 2, "c": 3}


def test_batch_items_and_other_jobs_interleave(path: Path) -> None:
    def bump(conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT INTO t (k, v) VALUES ('counter', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1"
        )
        return int(conn.execute("SELECT v FROM t WHERE k = 'counter'").fetchone()[0])

    async def body(w: Writer) -> list[Any]:
        jobs: list[Awaitable[Any]] = []
        for n in range(300):
            jobs.append(w.batched(insert_many, (f"k{n}", n)))
            if n % 3 == 0:
                jobs.append(w.run(bump))
        return await asyncio.gather(*jobs)

    results = run(path, body)
    assert sorted(r for r in results[1::4]) == list(range(1, 101))  # each bump saw its own
    stored = rows(path)
    assert stored.pop("counter") == 100
    assert stored == {f"k{n}": n for n in range(300)}


def test_a_broken_transaction_fails_its_group_and_the_writer_goes_on(path: Path) -> None:
    """A full disk makes SQLite roll back the whole transaction, not one job's savepoint:
    every job of that group fails (none may say it was stored), and the next group is written."""

    async def body(w: Writer) -> tuple[list[Any], Any]:
        pages = w.conn.execute("PRAGMA page_count").fetchone()[0]
        w.conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk is nearly full
        first = await asyncio.wait_for(
            asyncio.gather(
                w.batched(insert_many, ("small", 1)),
                w.run(insert("big", 0)),
                w.run(lambda conn: conn.execute("INSERT INTO t VALUES (?, 2)", ("x" * 50_000,))),
                return_exceptions=True,
            ),
            5,
        )
        w.conn.execute("PRAGMA max_page_count = 1000000")  # space again
        after = await asyncio.wait_for(w.batched(insert_many, ("after", 7)), 5)
        return first, after

    (small, big, huge), after = run(path, body)
    for result in (small, big, huge):
        assert isinstance(result, StoreError) and "full" in str(result), result
    assert after == 14
    assert rows(path) == {"after": 7}


# -- another process's write lock


def test_another_process_holding_the_write_lock_is_waited_out(path: Path) -> None:
    run(path, lambda w: asyncio.sleep(0))  # the table
    other = other_process(path)
    other.execute("INSERT INTO t (k, v) VALUES ('other', 0)")

    async def body(w: Writer) -> tuple[list[Any], float]:
        asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        started = time.monotonic()
        results = await asyncio.gather(w.batched(insert_many, ("x", 1)), w.run(insert("y", 2)))
        return results, time.monotonic() - started

    try:
        results, waited = run(path, body)
    finally:
        other.close()
    assert results == [2, 1]
    assert waited >= 0.25  # it waited for the lock, not failed
    assert rows(path) == {"other": 0, "x": 1, "y": 2}


def test_a_lock_never_released_fails_the_waiting_jobs_after_the_busy_timeout(path: Path) -> None:
    run(path, lambda w: asyncio.sleep(0))
    other = other_process(path)

    async def body(w: Writer) -> tuple[list[Any], float, Any, float]:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(w.batched(insert_many, (f"k{n}", n)) for n in range(3)),
                w.run(insert("job", 1)),
                return_exceptions=True,
            ),
            5,
        )
        waited = time.monotonic() - started
        assert w.last_error is not None and "locked" in w.last_error
        other.execute("ROLLBACK")
        started = time.monotonic()
        after = await w.batched(insert_many, ("after", 7))  # the lock is free again
        assert w.last_error is None
        return results, waited, after, time.monotonic() - started

    try:
        results, waited, after, then = run(path, body, busy_timeout=0.3)
    finally:
        other.close()
    assert all(locked(r) for r in results), results
    assert 0.25 <= waited < 2, waited
    assert after == 14 and then < 0.2  # written at once
    assert rows(path) == {"after": 7}


def test_a_short_wait_gives_up_sooner_and_the_others_keep_waiting(path: Path) -> None:
    """Readiness writes by the webhooks' road with a short wait: it answers soon, and the
    webhooks waiting beside it keep their own time and are written once the lock is free."""
    run(path, lambda w: asyncio.sleep(0))
    other = other_process(path)

    async def body(w: Writer) -> tuple[float, Any, Any, Any]:
        webhook = asyncio.ensure_future(w.batched(insert_many, ("x", 1)))
        job = asyncio.ensure_future(w.run(insert("y", 2)))
        started = time.monotonic()
        (probe,) = await asyncio.wait_for(
            asyncio.gather(w.run(insert("probe", 3), 0.3), return_exceptions=True), 3
        )
        waited = time.monotonic() - started
        await asyncio.sleep(0.2)
        assert not webhook.done() and not job.done()  # still waiting
        other.execute("ROLLBACK")
        return waited, probe, await webhook, await job

    try:
        waited, probe, webhook, job = run(path, body, busy_timeout=5.0)
    finally:
        other.close()
    assert locked(probe), probe
    assert 0.25 <= waited <= 0.6, waited
    assert (webhook, job) == (2, 1)
    assert rows(path) == {"x": 1, "y": 2}


def test_a_webhook_waits_at_most_the_busy_timeout_whatever_it_waits_behind(path: Path) -> None:
    """A webhook that arrives while a job that may wait longer already waits for another
    process's lock still fails on its own time, and the job goes on waiting."""
    run(path, lambda w: asyncio.sleep(0))
    other = other_process(path)

    async def body(w: Writer) -> tuple[float, Any, Any]:
        job = asyncio.ensure_future(w.run(insert("j", 1), 4.0))
        await asyncio.sleep(0.3)  # the job's group waits for the lock
        started = time.monotonic()
        (webhook,) = await asyncio.wait_for(
            asyncio.gather(w.batched(insert_many, ("x", 1)), return_exceptions=True), 3
        )
        waited = time.monotonic() - started
        assert not job.done()
        other.execute("ROLLBACK")
        return waited, webhook, await job

    try:
        waited, webhook, job = run(path, body, busy_timeout=1.0)
    finally:
        other.close()
    assert locked(webhook), webhook
    assert 0.9 <= waited <= 1.3, waited
    assert job == 1
    assert rows(path) == {"j": 1}


def test_closing_fails_what_still_waits_and_refuses_more(path: Path) -> None:
    """Closing does not wait out another process's lock: what waits for it fails at once, and
    nothing is asked of a closed writer."""
    run(path, lambda w: asyncio.sleep(0))
    other = other_process(path)

    async def main() -> None:
        async with opened(path) as w:  # busy timeout 10 s
            waiting = [
                asyncio.ensure_future(w.batched(insert_many, ("late", 1))),
                asyncio.ensure_future(w.run(insert("late job", 1))),
            ]
            await asyncio.sleep(0.2)  # they wait for the lock
            asked = asyncio.ensure_future(w.batched(insert_many, ("asked", 1)))  # not queued yet
            started = time.monotonic()
            await asyncio.wait_for(w.close(), 3)
            assert time.monotonic() - started < 1
            for fut in (*waiting, asked):
                with pytest.raises(StoreError, match="closed"):
                    await fut
            with pytest.raises(StoreError, match="closed"):
                await w.batched(insert_many, ("later", 1))
            with pytest.raises(StoreError, match="closed"):
                await w.run(insert("later job", 1))

    try:
        asyncio.run(main())
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert rows(path) == {}


# -- the checkpointer


def test_a_log_past_its_bound_starts_over(path: Path) -> None:
    async def body(w: Writer) -> None:
        w._checkpointer.close()  # driven by hand below
        ck = Checkpointer(path, restart_pages=64)
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            # As under sustained load: every commit finds the log in use, so it only grows.
            for n in range(40):
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM t").fetchone()
                await w.run(insert("x" * 4000 + str(n), n))
                reader.execute("COMMIT")
            frames = ck.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            assert frames >= 64
            ck.checkpoint()
            assert ck.restarts == 1
            await w.run(insert("after", 1))
            assert ck.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] < 8
        finally:
            reader.close()
            ck.close()

    run(path, body)
    assert len(rows(path)) == 41


def test_the_writer_checkpoints_by_itself(path: Path) -> None:
    async def body(w: Writer) -> int:
        await w.run(insert("a", 1))
        deadline = time.monotonic() + 5
        while w._checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # the database file itself (not only the log) holds the row now
        main_file = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            assert main_file.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
        finally:
            main_file.close()
        return w._checkpointer.checkpoints

    assert run(path, body) >= 1


@pytest.mark.parametrize("on_loop", [False, True])
def test_the_commit_runs_in_the_thread_or_with_workers_on_the_loop(
    tmp_path: Path, on_loop: bool
) -> None:
    """With other processes writing to the file (workers), the commit runs on the loop: the
    write lock is then not held while a thread waits for the loop to give up the GIL."""
    import threading

    path = tmp_path / "relay.db"
    committed_on: list[str] = []

    async def main() -> None:
        async with opened(path, commit_on_loop=on_loop) as w:
            commit = w._commit

            def spy() -> float:
                committed_on.append(threading.current_thread().name)
                return commit()

            w._commit = spy  # type: ignore[method-assign]
            await asyncio.gather(*(w.batched(insert_many, (f"k{n}", n)) for n in range(20)))

    asyncio.run(main())
    assert rows(path) == {f"k{n}": n for n in range(20)}
    assert committed_on and all((name == "MainThread") == on_loop for name in committed_on), (
        committed_on
    )
