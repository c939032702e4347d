"""The writer and the checkpointer, on a real SQLite file.

Webhooks' batch items run on the event loop inside a transaction the thread commits; other
jobs run in the thread. These tests hold both to the same promises: a group shares one commit,
a failing item sinks nothing else, another process's write lock is waited out, nothing waits
forever on a closed store, and the write-ahead log does not grow without bound.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay.db import Checkpointer, Writer
from relay.errors import StoreError


def _make_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")


def insert_many(conn: sqlite3.Connection, items: list[tuple[str, int]]) -> list[int]:
    """A batch job: one row per item; an item with v < 0 is refused (the whole call raises)."""
    if any(v < 0 for _, v in items):
        raise ValueError("negative")
    conn.executemany("INSERT INTO t (k, v) VALUES (?, ?)", items)
    return [v * 2 for _, v in items]


@pytest.fixture(params=[False, True], ids=["commit-in-thread", "commit-on-loop"])
def on_loop(request: pytest.FixtureRequest) -> bool:
    """Both ways the event loop's groups are committed (workers > 1 commit on the loop)."""
    return bool(request.param)


@pytest.fixture
def writer(tmp_path: Path, on_loop: bool) -> Any:
    w = Writer(tmp_path / "relay.db", commit_on_loop=on_loop)
    w.call(_make_table)
    yield w
    w.close()


def rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT k, v FROM t"))
    finally:
        conn.close()


def test_batch_items_share_one_commit(writer: Writer) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(
            *(writer.run_batched(insert_many, (f"k{n}", n)) for n in range(200))
        )

    before = writer.commits
    results = asyncio.run(main())
    assert results == [n * 2 for n in range(200)]
    assert rows(writer.path) == {f"k{n}": n for n in range(200)}
    # all 200 were waiting when the first group began: one or two commits, not 200
    assert writer.commits - before <= 2


def test_a_refused_item_fails_alone(writer: Writer) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(
            writer.run_batched(insert_many, ("a", 1)),
            writer.run_batched(insert_many, ("bad", -1)),
            writer.run_batched(insert_many, ("b", 2)),
            writer.run_batched(insert_many, ("a", 3)),  # duplicate primary key
            return_exceptions=True,
        )

    a, bad, b, dup = asyncio.run(main())
    assert (a, b) == (2, 4)
    assert isinstance(bad, ValueError)
    assert isinstance(dup, StoreError) and "UNIQUE" in str(dup)
    assert rows(writer.path) == {"a": 1, "b": 2}


def test_loop_items_and_thread_jobs_interleave(writer: Writer) -> None:
    def bump(conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT INTO t (k, v) VALUES ('counter', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1"
        )
        return int(conn.execute("SELECT v FROM t WHERE k = 'counter'").fetchone()[0])

    async def main() -> None:
        jobs = []
        for n in range(300):
            jobs.append(writer.run_batched(insert_many, (f"k{n}", n)))
            if n % 3 == 0:
                jobs.append(writer.run(bump))
        await asyncio.gather(*jobs)

    asyncio.run(main())
    stored = rows(writer.path)
    assert stored.pop("counter") == 100
    assert stored == {f"k{n}": n for n in range(300)}


def test_another_process_holding_the_write_lock_is_waited_out(writer: Writer) -> None:
    other = sqlite3.connect(writer.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # as a second worker or `relay dead-letters replay` would
    other.execute("INSERT INTO t (k, v) VALUES ('other', 0)")
    release_at = time.monotonic() + 0.3
    timer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    timer.start()

    async def main() -> list[Any]:
        return await asyncio.gather(
            writer.run_batched(insert_many, ("x", 1)),
            writer.run(lambda conn: conn.execute("INSERT INTO t VALUES ('y', 2)").rowcount),
        )

    try:
        assert asyncio.run(main()) == [2, 1]
        assert time.monotonic() >= release_at - 0.05  # it waited for the lock, not failed
    finally:
        timer.join()
        other.close()
    assert rows(writer.path) == {"other": 0, "x": 1, "y": 2}


def test_a_lock_never_released_fails_the_thread_job_after_the_busy_timeout(tmp_path: Path) -> None:
    w = Writer(tmp_path / "relay.db", busy_timeout=0.3)
    w.call(_make_table)
    other = sqlite3.connect(w.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            w.call(lambda conn: conn.execute("INSERT INTO t VALUES ('z', 1)"))
    finally:
        other.execute("ROLLBACK")
        other.close()
        w.close()


def test_a_lock_never_released_fails_the_waiting_webhooks_after_the_busy_timeout(
    tmp_path: Path, on_loop: bool
) -> None:
    w = Writer(tmp_path / "relay.db", busy_timeout=0.3, commit_on_loop=on_loop)
    w.call(_make_table)
    other = sqlite3.connect(w.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(w.run_batched(insert_many, (f"k{n}", n)) for n in range(3)),
            return_exceptions=True,
        )

    try:
        started = time.monotonic()
        results = asyncio.run(main())
        assert 0.25 <= time.monotonic() - started < 5
        assert all(isinstance(r, StoreError) and "locked" in str(r) for r in results), results
        other.execute("ROLLBACK")
        # the lock is free again: the next webhook is written at once
        assert asyncio.run(w.run_batched(insert_many, ("after", 7))) == 14
    finally:
        other.close()
        w.close()
    assert rows(w.path) == {"after": 7}


def test_closing_fails_what_still_waits_and_refuses_more(tmp_path: Path, on_loop: bool) -> None:
    w = Writer(tmp_path / "relay.db", commit_on_loop=on_loop)
    w.call(_make_table)

    async def main() -> None:
        pending = asyncio.ensure_future(w.run_batched(insert_many, ("late", 1)))
        w.close()  # before the loop got to write it
        with pytest.raises(StoreError, match="closed"):
            await pending
        with pytest.raises(StoreError, match="closed"):
            await w.run_batched(insert_many, ("later", 1))
        with pytest.raises(StoreError, match="closed"):
            await w.run(lambda conn: None)

    asyncio.run(main())
    assert rows(w.path) == {}


def test_a_log_past_its_bound_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    w = Writer(path)
    w.call(_make_table)
    w._checkpointer.close()  # driven by hand below
    ck = Checkpointer(path, restart_pages=64)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        # As under sustained load: every commit finds the log in use, so it only grows.
        for n in range(40):
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM t").fetchone()
            w.call(
                lambda conn, n=n: conn.execute(
                    "INSERT INTO t VALUES (?, ?)", ("x" * 4000 + str(n), n)
                )
            )
            reader.execute("COMMIT")
        frames = ck.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        assert frames >= 64
        ck.checkpoint()
        assert ck.restarts == 1
        w.call(lambda conn: conn.execute("INSERT INTO t VALUES ('after', 1)"))
        assert ck.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] < 8
        assert len(rows(path)) == 41
    finally:
        reader.close()
        ck.close()
        w.close()


def test_the_writer_checkpoints_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    w = Writer(path)
    try:
        w.call(_make_table)
        w.call(lambda conn: conn.execute("INSERT INTO t VALUES ('a', 1)"))
        deadline = time.monotonic() + 5
        while w._checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w._checkpointer.checkpoints >= 1
        # the database file itself (not only the log) holds the row now
        main_file = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            assert main_file.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
        finally:
            main_file.close()
    finally:
        w.close()


def test_a_webhook_waits_at_most_the_busy_timeout_whatever_it_waits_behind(
    tmp_path: Path, on_loop: bool
) -> None:
    """A webhook that arrives while the thread's own transaction waits for another process's
    lock waits behind it, then for the lock: together never longer than the busy timeout."""
    w = Writer(tmp_path / "relay.db", busy_timeout=1.0, commit_on_loop=on_loop)
    w.call(_make_table)
    other = sqlite3.connect(w.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def main() -> tuple[float, Any, Any]:
        job = asyncio.ensure_future(
            w.run(lambda conn: conn.execute("INSERT INTO t VALUES ('j', 1)"))
        )
        await asyncio.sleep(0.5)  # the thread waits for the lock, with its transaction begun
        started = time.monotonic()
        webhook = await asyncio.gather(w.run_batched(insert_many, ("x", 1)), return_exceptions=True)
        waited = time.monotonic() - started
        return waited, webhook[0], (await asyncio.gather(job, return_exceptions=True))[0]

    try:
        waited, webhook, job = asyncio.run(main())
        assert isinstance(webhook, StoreError) and "locked" in str(webhook), webhook
        assert isinstance(job, StoreError) and "locked" in str(job), job
        assert 0.9 <= waited <= 1.2, waited
    finally:
        other.execute("ROLLBACK")
        other.close()
        w.close()


def test_a_short_wait_gives_up_sooner_and_the_others_keep_waiting(tmp_path: Path) -> None:
    """Readiness writes by the webhooks' road with a short timeout: it answers soon, and the
    webhooks waiting beside it keep their own time and get written once the lock is free."""
    w = Writer(tmp_path / "relay.db", busy_timeout=5.0)
    w.call(_make_table)
    other = sqlite3.connect(w.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def main() -> tuple[float, Any, Any]:
        webhook = asyncio.ensure_future(w.run_batched(insert_many, ("x", 1)))
        started = time.monotonic()
        probe = await asyncio.gather(
            w.run_batched(insert_many, ("probe", 2), 0.3), return_exceptions=True
        )
        waited = time.monotonic() - started
        other.execute("ROLLBACK")
        return waited, probe[0], await webhook

    try:
        waited, probe, webhook = asyncio.run(main())
        assert isinstance(probe, StoreError) and "0.3 s" in str(probe), probe
        assert 0.25 <= waited <= 0.6, waited
        assert webhook == 2
    finally:
        other.close()
        w.close()
    assert rows(w.path) == {"x": 1}
