"""Delivery under the track API's failures, produced for real by the sandbox's fault switch."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from relay.storage import (
    DEAD,
    DELIVERED,
    PENDING,
    Incoming,
    Mapped,
    Output,
    Store,
    open_store,
    run_with,
)
from tests.conftest import (
    BACKENDS,
    MAPPINGS,
    STRIPE_SECRET,
    Relay,
    Sandbox,
    query,
    stripe_event,
    stripe_post,
    wait_mapped,
)

T = TypeVar("T")
ON_BOTH = pytest.mark.parametrize("relay_backend", BACKENDS, indirect=True)  # SQLite, PostgreSQL


def outbox_states(db: Path | str) -> dict[int, int]:
    return {
        int(state): int(n)
        for state, n in query(db, "SELECT state, count(*) FROM outbox GROUP BY state")
    }


def post_events(relay: Relay, n: int, source: str = "stripe") -> list[str]:
    order_ids = []
    for _ in range(n):
        event = stripe_event()
        r = relay.post(source, *stripe_post(event))
        assert r.status_code == 200, r.text
        order_ids.append(event["data"]["object"]["id"])
    return order_ids


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def with_store(db: Path, body: Callable[[Store], Awaitable[T]]) -> T:
    """Run `body` on a store of its own over the file `db` (the relay's, once it stopped)."""
    return run_with(open_store(db), body)


@ON_BOTH
def test_flaky_slow_api_still_gets_every_event_exactly_once(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=500, rate=0.3, latency_ms=200, seed=7)
    sandbox.fault(latency_ms=200)
    relay = relay_factory(sandbox, track='max_backoff = "1s"\nflush_interval = "200ms"')
    order_ids = post_events(relay, 500)
    db = relay.db
    # Every row recorded as delivered: nothing is left to send, so the sandbox holds all the
    # relay will ever send.
    assert wait_until(lambda: outbox_states(db) == {DELIVERED: 500}, timeout=90), outbox_states(db)
    delivered = [e["payload"]["order_id"] for e in sandbox.events()]
    assert sorted(delivered) == sorted(order_ids)  # all of them, none twice
    log = sandbox.requests()
    assert log["by_status"].get("500", 0) > 0  # the faults really happened


@ON_BOTH
def test_401_pauses_keeps_everything_then_delivers_once_cleared(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=401)
    relay = relay_factory(sandbox, track='max_backoff = "1s"\nflush_interval = "100ms"')
    order_ids = post_events(relay, 10)
    assert wait_until(lambda: bool(relay.runtime.forwarder.paused()), timeout=5)
    ready = httpx.get(f"{relay.url}/readyz").json()
    assert list(ready["paused"].values()) == ["HTTP 401 unauthorized"]
    time.sleep(2.5)  # a few probes, all refused
    assert sandbox.events() == []
    assert outbox_states(relay.db) == {PENDING: 10}
    probes = sandbox.requests()["by_status"]["401"]
    assert 2 <= probes <= 6  # probing with backoff, not hammering
    sandbox.clear_faults()
    assert wait_until(lambda: outbox_states(relay.db) == {DELIVERED: 10}, timeout=10)
    assert sorted(e["payload"]["order_id"] for e in sandbox.events()) == sorted(order_ids)
    assert relay.runtime.forwarder.paused() == {}
    assert httpx.get(f"{relay.url}/readyz").json()["paused"] == {}


@ON_BOTH
def test_402_and_403_pause_every_destination_of_the_key(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sources = two_websites()
    relay = relay_factory(
        sandbox, sources=sources, track='max_backoff = "1s"\nflush_interval = "100ms"'
    )
    sandbox.fault(status=402, for_website=1)
    post_events(relay, 3, "site1")
    assert wait_until(lambda: len(relay.runtime.forwarder.paused()) == 2, timeout=5)
    post_events(relay, 3, "site2")
    wait_mapped(relay.db)
    time.sleep(0.3)  # three flush intervals: website 2's batch is due, and held back
    assert sandbox.events(2) == []  # website 2 shares the key: it waits too
    assert outbox_states(relay.db) == {PENDING: 6}
    sandbox.clear_faults()
    assert wait_until(
        lambda: len(sandbox.events(1)) == 3 and len(sandbox.events(2)) == 3, timeout=10
    )


def two_websites() -> str:
    return f"""
[sources.site1]
provider = "stripe"
secret = "{STRIPE_SECRET}"
mapping = "{MAPPINGS / "stripe.toml"}"

[sources.site2]
provider = "stripe"
secret = "{STRIPE_SECRET}"
mapping = "{MAPPINGS / "stripe.toml"}"
website_id = 2
"""


@ON_BOTH
def test_404_on_one_website_does_not_slow_another(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=404, for_website=2)
    relay = relay_factory(
        sandbox, sources=two_websites(), track='max_backoff = "1s"\nflush_interval = "100ms"'
    )
    post_events(relay, 5, "site2")
    assert wait_until(lambda: bool(relay.runtime.forwarder.paused()), timeout=5)
    started = time.monotonic()
    post_events(relay, 5, "site1")
    assert wait_until(lambda: len(sandbox.events(1)) == 5, timeout=5)
    assert time.monotonic() - started < 2.0
    assert list(relay.runtime.forwarder.paused()) == [
        relay.config.sources["site2"].destination.name
    ]
    assert sandbox.events(2) == []
    sandbox.clear_faults()
    assert wait_until(lambda: len(sandbox.events(2)) == 5, timeout=10)


def test_invalid_events_are_found_by_bisection_and_dead_lettered(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    """The relay's own mapping never makes an invalid event (it fits them first), so the three
    invalid ones are written into the outbox directly, as one batch with 22 valid ones, by
    another connection to the relay's file (as another process would): the forwarder finds
    them when its queue has looked empty for a while."""
    relay = relay_factory(sandbox, track='flush_interval = "10s"')  # 25: a full batch at once
    dest = relay.config.sources["stripe"].destination.name
    bodies = []
    for i in range(25):
        event: dict[str, Any] = {"name": "import", "payload": {"n": str(i)}}
        if i in (3, 11, 19):
            event["name"] = "x" * 200 if i == 3 else "bad"
            if i == 11:
                event["payload"] = {f"k{j}": "v" for j in range(11)}
            if i == 19:
                event["visitor_id"] = "not-a-uuid"
        bodies.append(json.dumps(event))
    now = time.time()
    db = relay.db
    conn = sqlite3.connect(db)
    try:
        with conn:  # one transaction: the forwarder sees all 25 or none
            ids = [
                int(
                    conn.execute(
                        "INSERT INTO outbox (destination, body, created_at) VALUES (?, ?, ?)",
                        (dest, b, now),
                    ).lastrowid
                    or 0
                )
                for b in bodies
            ]
    finally:
        conn.close()
    assert wait_until(lambda: set(outbox_states(db)) == {DELIVERED, DEAD})
    delivered = sorted(int(e["payload"]["n"]) for e in sandbox.events())
    assert delivered == [i for i in range(25) if i not in (3, 11, 19)]
    conn = sqlite3.connect(db)
    dead = conn.execute(
        "SELECT id, last_error FROM outbox WHERE state = ? ORDER BY id", (DEAD,)
    ).fetchall()
    conn.close()
    assert [d[0] for d in dead] == [ids[3], ids[11], ids[19]]
    assert all("validation_error" in d[1] for d in dead)


@ON_BOTH
def test_429_waits_retry_after_then_goes_on(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=429, retry_after=2, count=1)
    relay = relay_factory(sandbox, track='flush_interval = "100ms"')
    post_events(relay, 3)
    assert wait_until(lambda: len(sandbox.events()) == 3, timeout=10)
    reqs = sandbox.requests()["requests"]
    assert [r["status"] for r in reqs] == [429, 200]
    assert reqs[1]["at"] - reqs[0]["at"] >= 2.0


@ON_BOTH
def test_broken_answers_are_retried(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    sandbox.fault(malformed=True, count=1)
    sandbox.fault(drop=True, count=1)
    sandbox.fault(status=503, latency_ms=1500, count=1)  # slower than the relay's timeout
    relay = relay_factory(
        sandbox, track='flush_interval = "100ms"\ntimeout = "500ms"\nmax_backoff = "500ms"'
    )
    order_ids = post_events(relay, 4)
    # Every row recorded as delivered: nothing is left to send again.
    assert wait_until(lambda: outbox_states(relay.db) == {DELIVERED: 4}, timeout=15)
    assert sorted(e["payload"]["order_id"] for e in sandbox.events()) == sorted(order_ids)


def test_events_too_old_go_to_the_dead_letter_queue_with_the_last_error(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=500)
    relay = relay_factory(
        sandbox,
        track='flush_interval = "100ms"\nmax_event_age = "1s"\nmax_backoff = "300ms"',
        housekeeping_interval=0.2,
    )
    post_events(relay, 3)
    db = relay.config.relay.database
    assert wait_until(lambda: outbox_states(db) == {DEAD: 3}, timeout=10)
    conn = sqlite3.connect(db)
    reasons = [r[0] for r in conn.execute("SELECT last_error FROM outbox")]
    conn.close()
    assert all("max_event_age" in r and "HTTP 500" in r for r in reasons), reasons
    assert sandbox.events() == []


PRUNE_STEP = 500  # rows of each kind one prune step removes at most (SQLiteStore)


def test_retention_prunes_in_small_steps(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "100ms"')
    post_events(relay, 30)
    db = relay.db
    assert wait_until(lambda: outbox_states(db) == {DELIVERED: 30})
    dest = relay.config.sources["stripe"].destination
    relay.stop()
    n = 3 * PRUNE_STEP  # with the relay's 30, more than three steps' worth of webhooks
    t0 = time.time()

    async def more_delivered_webhooks(s: Store) -> None:
        ingested = await asyncio.gather(
            *(
                s.ingest(Incoming("stripe", t0, "application/json", "{}", b"{}", [f"k{i}"], 60))
                for i in range(n)
            )
        )
        mapped = [
            Mapped(i.webhook_id, t0, [Output(dest.name, i.accepted[0], 0, '{"name":"x"}')])
            for i in ingested
            if i.webhook_id is not None
        ]
        assert len(mapped) == n
        await s.save_mapped(mapped)
        rows = await s.claim(dest.name, n, t0)
        assert len(rows) == n
        await s.delivered([r.id for r in rows], [None] * n, dest.name, t0)

    with_store(db, more_delivered_webhooks)

    async def prune_eight_days_later(s: Store) -> list[tuple[int, int, int]]:
        later = time.time() + 8 * 86400  # everything is past retention then
        before = await s.counts()
        steps = [(0, before.webhooks, before.dedupe_keys)]
        while removed := await s.prune(later, 48 * 3600, 7 * 86400):
            c = await s.counts()
            steps.append((removed, c.webhooks, c.dedupe_keys))
        assert await s.requests_since(dest.key_id, 0) == []  # the request log too
        c = await s.counts()
        assert c.by_state == {} and c.webhooks == 0 and c.dedupe_keys == 0
        return steps

    steps = with_store(db, prune_eight_days_later)
    assert steps[0][1:] == (n + 30, n + 30)
    assert len(steps) > 4  # the first line is the start
    for (_, webhooks, keys), (removed, webhooks_after, keys_after) in pairwise(steps):
        assert 0 <= webhooks - webhooks_after <= PRUNE_STEP, steps
        assert 0 <= keys - keys_after <= PRUNE_STEP, steps
        assert removed > 0
    conn = sqlite3.connect(db)
    try:
        for table in ("webhooks", "dedupe", "outbox", "unmapped", "sent"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    finally:
        conn.close()


def test_retention_keeps_dead_letters_and_their_webhooks(tmp_path: Path) -> None:
    old = time.time() - 30 * 86400

    def webhook(key: str) -> Incoming:
        return Incoming("s", old, "application/json", "{}", b"{}", [key], 48 * 3600)

    async def body(s: Store) -> None:
        await s.register_destination("d", "k", 1)
        dead = (await s.ingest(webhook("dead"))).webhook_id
        gone = (await s.ingest(webhook("delivered"))).webhook_id
        assert dead is not None and gone is not None
        await s.save_mapped(
            [Mapped(w, old, [Output("d", k, 0, "{}")]) for w, k in ((dead, "dead"), (gone, "x"))]
        )
        first, second = await s.claim("d", 2, old)
        await s.dead_letter([first.id], "validation_error: refused", old)
        await s.delivered([second.id], [7], "d", old)
        while await s.prune(time.time(), 48 * 3600, 7 * 86400):
            pass
        assert await s.webhook(dead) is not None  # kept with its dead letter
        assert [d.id for d in await s.dead_letters()] == [first.id]
        assert await s.webhook(gone) is None  # retention did run
        c = await s.counts()
        assert c.webhooks == 1 and c.by_state == {"d": {DEAD: 1}} and c.dedupe_keys == 0

    with_store(tmp_path / "r.db", body)


@ON_BOTH
def test_dedupe_keys_expire_after_the_window(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, relay='dedupe_window = "1s"\nretention = "1s"')
    event = stripe_event()
    started = time.time()
    assert relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1
    assert relay.post("stripe", *stripe_post(event)).json()["duplicates"] == 1
    # A duplicate does not renew the key: the event is new again once the window is over.
    assert wait_until(
        lambda: relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1, timeout=5
    )
    assert time.time() - started >= 1.0  # not before


@ON_BOTH
def test_shutdown_does_not_wait_out_the_rate_limit_window(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='requests_per_minute = 1\nflush_interval = "100ms"')
    post_events(relay, 3)
    assert wait_until(lambda: len(sandbox.events()) == 3)
    post_events(relay, 3)  # these wait for the next minute's slot
    dest = relay.config.sources["stripe"].destination.name
    metrics = relay.runtime.metrics.registry
    waits = {"destination": dest}
    assert wait_until(  # the worker waits for the rate limit's next slot now
        lambda: (metrics.get_sample_value("relay_rate_limit_waits_total", waits) or 0) >= 1
    )
    started = time.monotonic()
    relay.stop()
    assert time.monotonic() - started < 3  # not the 10 s grace, not the 60 s window
    assert outbox_states(relay.db) == {DELIVERED: 3, PENDING: 3}
