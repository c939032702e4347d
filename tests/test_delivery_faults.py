"""A store that refuses writes while a batch is at the track API: the batch's outcome is kept
until the store takes it, without a restart, and no event goes twice.

The fault is real: another connection holds the database's write lock (as a second process
would), and the relay's writer gives up on it after a short busy timeout.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from relay.storage import DEAD, DELIVERED, IN_FLIGHT
from tests.conftest import Relay, Sandbox
from tests.test_delivery import outbox_states, post_events, wait_until


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def answered(sandbox: Sandbox, status: int) -> int:
    return int(sandbox.requests()["by_status"].get(str(status), 0))


@pytest.mark.parametrize(
    ("fault", "events", "status", "expected", "kept"),
    [
        # 200 while the store refuses: recorded as delivered once it works, never re-sent.
        ({}, 5, 200, {DELIVERED: 5}, 5),
        # 401: the batch goes back to the queue once the store works; delivered after the pause.
        ({"status": 401, "count": 1}, 5, 401, {DELIVERED: 5}, 5),
        # 400 for a lone event: it becomes a dead letter once the store works.
        ({"status": 400, "count": 1}, 1, 400, {DEAD: 1}, 0),
    ],
    ids=["delivered", "paused", "dead-letter"],
)
def test_an_outcome_the_store_refused_is_recorded_once_it_works_again(
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
    fault: dict[str, Any],
    events: int,
    status: int,
    expected: dict[int, int],
    kept: int,
) -> None:
    sandbox.fault(latency_ms=1500, **fault)  # the batch stays at the API for 1.5 s
    if fault:
        sandbox.fault(latency_ms=1500)
    relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "1s"')
    writer = relay.runtime.store.writer
    writer.busy_timeout = 0.2  # store writes fail fast while locked
    worker = relay.runtime.forwarder.workers[relay.config.sources["stripe"].destination.name]
    db = relay.db
    order_ids = post_events(relay, events)
    assert wait_until(lambda: outbox_states(db).get(IN_FLIGHT, 0) == events, timeout=5)
    with write_lock(db):
        assert wait_until(lambda: answered(sandbox, status) == 1, timeout=5)
        failed = writer.failed_commits
        # The relay tries to record the answer, and tries again, in vain: the outcome waits in
        # memory (besides the request log's write, which is tried once, two tries failed).
        assert wait_until(
            lambda: bool(worker.unrecorded) and writer.failed_commits >= failed + 3, timeout=5
        )
        assert outbox_states(db).get(IN_FLIGHT, 0) == events  # nothing recorded yet
    # The store works again: the known outcome sticks, without a restart.
    assert wait_until(lambda: outbox_states(db) == expected, timeout=15), outbox_states(db)
    time.sleep(1.0)  # a second send would have arrived by now
    delivered = [e["payload"]["order_id"] for e in sandbox.events()]
    assert sorted(delivered) == sorted(order_ids[:kept])
    assert answered(sandbox, 200) == (1 if kept else 0)
    relay.restart()  # nothing was left in flight to send again
    time.sleep(1.0)
    assert len(sandbox.events()) == kept
    assert outbox_states(db) == expected
