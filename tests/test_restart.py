"""What outlives a relay killed with SIGKILL: webhooks not mapped yet, the requests it sent in
the current rate-limit window, its pauses. Each test kills a real `relay serve` process."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import STRIPE_SECRET, Sandbox, relay_toml, stripe_event, stripe_post
from tests.servers import free_port
from tests.test_process import RelayProcess

# About 10 ms of CPU per event (the mapping deadline is 50 ms): the mapper falls behind the
# acknowledgements, so a kill right after the last 200 finds webhooks stored but not mapped.
SLOW_MAPPING = """
[[events]]
on = "charge.refunded"
name = "refund"
[events.payload]
charge_id = "{% for i in range(70000) %}{% endfor %}{{ data.object.id }}"
"""


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def start(
    tmp_path: Path, sandbox: Sandbox, track: str = "", mapping: str | None = None
) -> RelayProcess:
    sources = None
    if mapping is not None:
        (tmp_path / "mapping.toml").write_text(mapping)
        sources = (
            f'[sources.stripe]\nprovider = "stripe"\nsecret = "{STRIPE_SECRET}"\n'
            f'mapping = "{tmp_path / "mapping.toml"}"\n'
        )
    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml(sandbox.base_url, tmp_path / "relay.db", sources=sources, track=track)
    )
    p = RelayProcess(config, free_port(), tmp_path / "relay.log")
    p.start()
    return p


def post(p: RelayProcess, n: int, client: httpx.Client) -> list[str]:
    ids = []
    for _ in range(n):
        event = stripe_event("charge.refunded")
        body, headers = stripe_post(event)
        r = client.post(f"http://127.0.0.1:{p.port}/webhooks/stripe", content=body, headers=headers)
        assert r.status_code == 200, r.text
        ids.append(event["data"]["object"]["id"])
    return ids


def test_a_kill_between_commit_and_mapping_is_mapped_and_delivered_once_after_restart(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    p = start(tmp_path, sandbox, mapping=SLOW_MAPPING)
    db = tmp_path / "relay.db"
    try:
        with httpx.Client(timeout=10) as client, ThreadPoolExecutor(4) as pool:
            acked = [i for ids in pool.map(lambda _: post(p, 15, client), range(4)) for i in ids]
        assert p.signal(signal.SIGKILL) == -signal.SIGKILL
        unmapped = count(db, "SELECT count(*) FROM unmapped")
        assert unmapped > 0, "every webhook was mapped before the kill: nothing was tested"
        assert count(db, "SELECT count(*) FROM webhooks") == 60
        p.start()
        delivered = sandbox.wait_for(60, timeout=30)
    finally:
        p.stop()
    got = Counter(e["payload"]["charge_id"] for e in delivered)
    assert got == Counter(acked), (unmapped, got)  # each once, none lost
    assert count(db, "SELECT count(*) FROM unmapped") == 0
    assert count(db, "SELECT count(*) FROM outbox") == 60
    assert "mapped " in p.log.read_text() and "not mapped" in p.log.read_text()


def test_a_relay_killed_after_filling_the_window_waits_for_it_after_restart(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    """The sandbox allows 5 requests a minute and so does the relay: the first life sends 5
    batches of one event, is killed, and the second life must not send before the window the
    first one filled has room again (a relay that forgot would get 429 at once)."""
    sandbox = sandbox_factory(requests_per_minute=5)
    track = 'requests_per_minute = 5\nbatch_size = 1\nflush_interval = "10ms"'
    p = start(tmp_path, sandbox, track=track)
    try:
        with httpx.Client(timeout=10) as client:
            post(p, 5, client)
            assert len(sandbox.wait_for(5, timeout=15)) == 5
            assert p.signal(signal.SIGKILL) == -signal.SIGKILL
            p.start()
            post(p, 3, client)
            time.sleep(3)  # a relay that lost its request log sends within milliseconds
        requests = sandbox.requests()["by_status"]
    finally:
        p.stop()
    assert requests == {"200": 5}, requests
    assert len(sandbox.events()) == 5
    db = tmp_path / "relay.db"
    assert count(db, "SELECT count(*) FROM outbox WHERE state = 0") == 3  # waiting, kept


def test_a_pause_outlives_a_restart_until_a_probe_succeeds(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    sandbox.fault(status=404)
    p = start(tmp_path, sandbox)
    try:
        with httpx.Client(timeout=10) as client:
            post(p, 2, client)
            url = f"http://127.0.0.1:{p.port}/readyz"
            deadline = time.monotonic() + 10
            while not client.get(url).json()["paused"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert p.signal(signal.SIGKILL) == -signal.SIGKILL
            p.start()
            paused = client.get(url).json()["paused"]
            assert len(paused) == 1 and "404" in next(iter(paused.values())), paused
            sandbox.clear_faults()
            assert len(sandbox.wait_for(2, timeout=15)) == 2
            deadline = time.monotonic() + 5
            while client.get(url).json()["paused"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        p.stop()
