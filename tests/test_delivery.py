"""Delivery under the track API's failures, produced for real by the sandbox's fault switch."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from relay import store as ops
from tests.conftest import MAPPINGS, STRIPE_SECRET, Relay, Sandbox, stripe_event, stripe_post


def outbox_states(db: Path) -> dict[int, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()


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


def test_flaky_slow_api_still_gets_every_event_exactly_once(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=500, rate=0.3, latency_ms=200, seed=7)
    sandbox.fault(latency_ms=200)
    relay = relay_factory(sandbox, track='max_backoff = "1s"\nflush_interval = "200ms"')
    order_ids = post_events(relay, 500)
    assert wait_until(lambda: len(sandbox.events()) >= 500, timeout=90)
    time.sleep(0.5)
    delivered = [e["payload"]["order_id"] for e in sandbox.events()]
    assert sorted(delivered) == sorted(order_ids)  # all of them, none twice
    log = sandbox.requests()
    assert log["by_status"].get("500", 0) > 0  # the faults really happened
    assert outbox_states(relay.config.relay.database) == {ops.DELIVERED: 500}


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
    assert outbox_states(relay.config.relay.database) == {ops.PENDING: 10}
    probes = sandbox.requests()["by_status"]["401"]
    assert 2 <= probes <= 6  # probing with backoff, not hammering
    sandbox.clear_faults()
    assert wait_until(lambda: len(sandbox.events()) >= 10, timeout=10)
    time.sleep(0.3)
    assert sorted(e["payload"]["order_id"] for e in sandbox.events()) == sorted(order_ids)
    assert relay.runtime.forwarder.paused() == {}
    assert httpx.get(f"{relay.url}/readyz").json()["paused"] == {}


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
    time.sleep(0.5)
    assert sandbox.events(2) == []  # website 2 shares the key: it waits too
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
    invalid ones are written into the outbox directly, as one batch with 22 valid ones."""
    relay = relay_factory(sandbox, track='flush_interval = "10s"')
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

    def insert(conn: sqlite3.Connection) -> list[int]:
        return [
            int(
                conn.execute(
                    "INSERT INTO outbox (destination, body, created_at) VALUES (?, ?, ?)",
                    (dest, b, now),
                ).lastrowid
                or 0
            )
            for b in bodies
        ]

    ids = relay.runtime.store.writer.call(insert)
    relay.runtime.forwarder.notify(dest)
    assert wait_until(
        lambda: (
            outbox_states(relay.config.relay.database).get(ops.PENDING, 0) == 0
            and outbox_states(relay.config.relay.database).get(ops.IN_FLIGHT, 0) == 0
        )
    )
    delivered = sorted(int(e["payload"]["n"]) for e in sandbox.events())
    assert delivered == [i for i in range(25) if i not in (3, 11, 19)]
    conn = sqlite3.connect(relay.config.relay.database)
    dead = conn.execute("SELECT id, last_error FROM outbox WHERE state = 3 ORDER BY id").fetchall()
    conn.close()
    assert [d[0] for d in dead] == [ids[3], ids[11], ids[19]]
    assert all("validation_error" in d[1] for d in dead)


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


def test_broken_answers_are_retried(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    sandbox.fault(malformed=True, count=1)
    sandbox.fault(drop=True, count=1)
    sandbox.fault(status=503, latency_ms=1500, count=1)  # slower than the relay's timeout
    relay = relay_factory(
        sandbox, track='flush_interval = "100ms"\ntimeout = "500ms"\nmax_backoff = "500ms"'
    )
    order_ids = post_events(relay, 4)
    assert wait_until(lambda: len(sandbox.events()) >= 4, timeout=15)
    time.sleep(2)
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
    assert wait_until(lambda: outbox_states(db) == {ops.DEAD: 3}, timeout=10)
    conn = sqlite3.connect(db)
    reasons = [r[0] for r in conn.execute("SELECT last_error FROM outbox")]
    conn.close()
    assert all("max_event_age" in r and "HTTP 500" in r for r in reasons), reasons
    assert sandbox.events() == []


def test_retention_prunes_in_small_steps(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "100ms"')
    post_events(relay, 30)
    assert wait_until(lambda: len(sandbox.events()) == 30)
    db = relay.config.relay.database
    relay.stop()
    # Eight days later, seen from the database's side: everything is past retention.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE webhooks SET received_at = received_at - 8 * 86400")
    conn.execute("UPDATE dedupe SET seen_at = seen_at - 8 * 86400")
    conn.execute(
        "UPDATE outbox SET done_at = done_at - 8 * 86400, created_at = created_at - 8 * 86400"
    )
    conn.commit()
    steps = []
    while True:
        n = ops.prune(conn, time.time(), 48 * 3600, 7 * 86400, step=7)
        conn.commit()
        if not n:
            break
        steps.append(n)
    assert len(steps) > 3 and max(steps) <= 7 * 3
    for table in ("webhooks", "events", "dedupe", "outbox"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    conn.close()


def test_retention_keeps_dead_letters_and_their_webhooks(tmp_path: Path) -> None:
    from relay.db import connect, migrate

    conn = connect(tmp_path / "r.db")
    migrate(conn)
    old = time.time() - 30 * 86400
    conn.execute(
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) "
        "VALUES (1, 's', ?, 'application/json', '{}', x'7b7d')",
        (old,),
    )
    conn.execute(
        "INSERT INTO events (id, webhook_id, source, key, type, outcome, received_at) "
        "VALUES (1, 1, 's', 'k', 't', 'mapped', ?)",
        (old,),
    )
    conn.execute(
        "INSERT INTO outbox (destination, event_id, body, created_at, state, done_at) "
        "VALUES ('d', 1, '{}', ?, 3, ?)",
        (old, old),
    )
    while ops.prune(conn, time.time(), 48 * 3600, 7 * 86400):
        pass
    assert conn.execute("SELECT count(*) FROM webhooks").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1


def test_dedupe_keys_expire_after_the_window(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, relay='dedupe_window = "1s"\nretention = "1s"')
    event = stripe_event()
    assert relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1
    assert relay.post("stripe", *stripe_post(event)).json()["duplicates"] == 1
    time.sleep(1.2)
    assert relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1


def test_shutdown_does_not_wait_out_the_rate_limit_window(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='requests_per_minute = 1\nflush_interval = "100ms"')
    post_events(relay, 3)
    assert wait_until(lambda: len(sandbox.events()) == 3)
    post_events(relay, 3)  # these wait for the next minute's slot
    time.sleep(0.5)
    started = time.monotonic()
    relay.stop()
    assert time.monotonic() - started < 3  # not the 10 s grace, not the 60 s window
    assert outbox_states(relay.config.relay.database) == {ops.DELIVERED: 3, ops.PENDING: 3}
