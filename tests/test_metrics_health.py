"""/healthz, /readyz and /metrics of a running relay: what they say, and no secret in them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, STRIPE_SECRET, Relay, Sandbox, stripe_event, stripe_post


def scrape(relay: Relay) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{relay.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def endpoints_text(relay: Relay) -> str:
    return "".join(httpx.get(f"{relay.url}{p}").text for p in ("/healthz", "/readyz", "/metrics"))


def test_healthz(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(sandbox)
    response = httpx.get(f"{relay.url}/healthz")
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert httpx.head(f"{relay.url}/healthz").status_code == 200
    ready = httpx.get(f"{relay.url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"ok": True, "problems": [], "paused": {}})


def test_counters_move_with_webhooks_and_batches(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox)
    dest = relay.config.sources["stripe"].destination.name
    before = scrape(relay)
    assert value(before, "relay_webhooks_total", source="stripe", outcome="accepted") == 0

    refunds = [stripe_event("charge.refunded") for _ in range(2)]
    fitted = stripe_event("charge.refunded")
    fitted["data"]["object"]["metadata"]["visitor_id"] = "not-a-uuid"  # dropped to fit
    for event in [*refunds, fitted, stripe_event("customer.created")]:
        assert relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1
    assert relay.post("stripe", *stripe_post(refunds[0])).json()["duplicates"] == 1
    assert relay.post("stripe", *stripe_post(refunds[1], secret="whsec_wrong")).status_code == 401
    assert relay.post("nope", *stripe_post(refunds[1])).status_code == 404

    sandbox.wait_for(3)
    wait_until(lambda: value(scrape(relay), "relay_events_forwarded_total", destination=dest) == 3)
    m = scrape(relay)
    stripe, unknown, to = {"source": "stripe"}, {"source": "_unknown"}, {"destination": dest}
    expected: list[tuple[str, dict[str, str], float]] = [
        ("relay_webhooks_total", {**stripe, "outcome": "accepted"}, 4),
        ("relay_webhooks_total", {**stripe, "outcome": "duplicate"}, 1),
        ("relay_webhooks_total", {**stripe, "outcome": "invalid_signature"}, 1),
        ("relay_webhooks_total", {**unknown, "outcome": "unknown_source"}, 1),
        ("relay_events_total", {**stripe, "outcome": "mapped"}, 3),
        ("relay_events_total", {**stripe, "outcome": "ignored"}, 1),
        ("relay_events_total", {**stripe, "outcome": "duplicate"}, 1),
        ("relay_events_fitted_total", stripe, 1),
        ("relay_events_forwarded_total", to, 3),
        ("relay_outbox_depth", to, 0),
        ("relay_outbox_oldest_age_seconds", to, 0),
        ("relay_dead_letters", to, 0),
    ]
    for name, labels, want in expected:
        assert value(m, name, **labels) == want, (name, labels)
    batches = value(m, "relay_batches_total", destination=dest, status="200")
    assert batches >= 1
    assert value(m, "relay_forward_latency_seconds_count", destination=dest) == batches
    assert value(m, "relay_forward_latency_seconds_sum", destination=dest) > 0
    # every answered webhook waited for a commit; batches add their own commits
    commits = value(m, "relay_store_commit_seconds_count")
    assert commits >= 4
    assert value(m, "relay_store_commit_seconds_bucket", le="+Inf") == commits
    assert 0 < value(m, "relay_store_commit_seconds_sum") < commits * 5

    text = endpoints_text(relay)
    assert API_KEY not in text and STRIPE_SECRET not in text and "whsec_wrong" not in text


def test_queue_gauges_and_rate_limit_waits(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(
        sandbox,
        track='requests_per_minute = 1\nflush_interval = "50ms"',
        relay='shutdown_grace = "1s"',
    )
    dest = relay.config.sources["stripe"].destination.name
    relay.post("stripe", *stripe_post(stripe_event("charge.refunded")))
    sandbox.wait_for(1)
    relay.post("stripe", *stripe_post(stripe_event("charge.refunded")))  # must wait a minute
    wait_until(lambda: value(scrape(relay), "relay_rate_limit_waits_total", destination=dest) == 1)
    time.sleep(0.2)
    m = scrape(relay)
    assert value(m, "relay_outbox_depth", destination=dest) == 1
    assert value(m, "relay_outbox_oldest_age_seconds", destination=dest) >= 0.2
    assert len(sandbox.events()) == 1


def test_mapping_failures_show_as_failed_events_and_dead_letters(
    tmp_path: Path, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[events]]\non = "charge.refunded"\nname = "x"\n'
        '[events.payload]\na = "{{ data.object.currency | cents }}"\n'
    )
    relay = relay_factory(
        sandbox,
        sources=f'[sources.stripe]\nprovider = "stripe"\nsecret = "{STRIPE_SECRET}"\n'
        f'mapping = "{mapping}"\n',
    )
    dest = relay.config.sources["stripe"].destination.name
    relay.post("stripe", *stripe_post(stripe_event("charge.refunded")))
    m = scrape(relay)
    assert value(m, "relay_events_total", source="stripe", outcome="failed") == 1
    assert value(m, "relay_dead_letters", destination=dest) == 1


# -- /readyz --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, to fill up. Ask for it before relay_factory: it must outlive the relay."""
    where = tmp_path / "disk"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(filler: Path) -> None:
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_not_ready_then_ready(
    relay: Relay, expected: str, break_it: Callable[[], None], repair: Callable[[], None]
) -> None:
    assert httpx.get(f"{relay.url}/readyz").status_code == 200
    break_it()
    response = httpx.get(f"{relay.url}/readyz")
    assert response.status_code == 503
    body: dict[str, Any] = response.json()
    assert body["ok"] is False
    [problem] = body["problems"]
    assert problem.startswith("store not writable: ") and expected in problem, problem
    assert httpx.get(f"{relay.url}/healthz").status_code == 200  # alive, just not ready
    # A webhook that cannot be stored is refused with 503, so that the sender retries.
    refused = relay.post("stripe", *stripe_post(stripe_event("charge.refunded")))
    assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
    repair()
    ready = httpx.get(f"{relay.url}/readyz")
    assert (ready.status_code, ready.json()["problems"]) == (200, [])


def test_readyz_is_503_when_the_disk_is_full(
    small_disk: Path, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    """Root ignores file permissions, so "not writable" is made for real: the database lives
    on a tiny tmpfs, which a filler file fills up."""
    relay = relay_factory(sandbox, relay=f'database = "{small_disk / "relay.db"}"')
    filler = small_disk / "filler"
    check_not_ready_then_ready(
        relay, "database or disk is full", lambda: fill(filler), filler.unlink
    )


def test_readyz_is_503_when_the_database_turns_read_only(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    """Where no tmpfs can be mounted, the same check with a fault injected into the writer's
    own connection (`PRAGMA query_only`): the readiness write still goes the real way."""
    relay = relay_factory(sandbox)
    writer = relay.runtime.store.writer

    def break_it() -> None:
        # On the writer's own connection, between two of its groups (the relay is idle).
        writer.conn.execute("PRAGMA query_only = 1")

    def repair() -> None:
        # Not through the writer: it cannot even begin a transaction now.
        writer.conn.execute("PRAGMA query_only = 0")

    check_not_ready_then_ready(relay, "readonly", break_it, repair)


def test_readyz_lists_paused_destinations(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=401)
    relay = relay_factory(sandbox)
    dest = relay.config.sources["stripe"].destination.name
    relay.post("stripe", *stripe_post(stripe_event("charge.refunded")))
    wait_until(lambda: bool(httpx.get(f"{relay.url}/readyz").json()["paused"]))
    response = httpx.get(f"{relay.url}/readyz")
    # Paused is reported, not a reason to take the relay out of rotation: it still takes
    # webhooks and keeps them.
    assert response.status_code == 200
    assert response.json() == {
        "ok": True, "problems": [], "paused": {dest: "HTTP 401 unauthorized"}
    }  # fmt: skip
    assert value(scrape(relay), "relay_destination_paused", destination=dest) == 1
    assert API_KEY not in endpoints_text(relay)


def test_readyz_is_503_at_once_while_another_process_holds_the_write_lock(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    """Webhooks would wait for the lock and then fail: readiness says so without waiting
    out the busy timeout (10 s) itself."""
    relay = relay_factory(sandbox)
    assert httpx.get(f"{relay.url}/readyz").status_code == 200
    other = sqlite3.connect(relay.db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # as `relay dead-letters replay` or a stuck process would
    try:
        started = time.monotonic()
        response = httpx.get(f"{relay.url}/readyz", timeout=5)
        assert time.monotonic() - started < 2
        assert response.status_code == 503
        [problem] = response.json()["problems"]
        assert problem.startswith("store not writable: ") and "locked" in problem, problem
    finally:
        other.execute("ROLLBACK")
        other.close()
    ready = httpx.get(f"{relay.url}/readyz")
    assert (ready.status_code, ready.json()["problems"]) == (200, [])


def test_readyz_is_503_when_the_disk_is_too_full_for_a_webhook(
    small_disk: Path, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    """The write-ahead log keeps the space of earlier writes: a tiny readiness write still
    fits in it on a full disk, while a webhook's rows do not."""
    relay = relay_factory(sandbox, relay=f'database = "{small_disk / "relay.db"}"')

    def post(size: int) -> httpx.Response:
        event = stripe_event("charge.refunded")
        event["data"]["object"]["metadata"]["note"] = "n" * size
        return relay.post("stripe", *stripe_post(event))

    assert post(300_000).status_code == 200  # the log grows to hold it
    time.sleep(1.0)  # the checkpointer copies it into the database: the log starts over
    assert post(10).status_code == 200
    filler = small_disk / "filler"
    fill(filler)
    response = httpx.get(f"{relay.url}/readyz")
    refused = post(800_000)  # more than the log has room for
    assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
    assert response.status_code == 503, response.text
    [problem] = response.json()["problems"]
    assert problem.startswith("store not writable: database or disk is full"), problem
    filler.unlink()
    assert httpx.get(f"{relay.url}/readyz").status_code == 200
    assert post(800_000).status_code == 200
