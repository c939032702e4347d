"""`workers = 2`: a supervisor and two worker processes on one port and one database.

Every promise of the single process holds across workers: each event stored and delivered
once whichever worker took it, metrics that count every worker, SIGTERM drains all and exits
0, SIGHUP reloads all, a dead worker is replaced, and no worker outlives its supervisor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Sandbox, stripe_event, stripe_post
from tests.test_process import RelayProcess, relay_process, wait_delivered

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading, /proc")

TWO = "workers = 2"
__all__ = ["relay_process"]  # the fixture, shared with test_process


def two_workers(
    relay_process: Callable[..., RelayProcess], sandbox: Sandbox, track: str = ""
) -> tuple[RelayProcess, int]:
    """A started relay with `workers = 2`, and its supervisor's pid."""
    relay = relay_process(sandbox, track=track, relay=TWO)
    relay.start()
    assert relay.proc is not None
    return relay, relay.proc.pid


def workers_of(supervisor: int, count: int = 2, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pids = [
                int(p)
                for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
            ]
        except OSError:
            pids = []
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def post_fresh_connection(port: int, event: dict[str, object]) -> httpx.Response:
    """One request on a connection of its own, so that the kernel picks a worker for each."""
    body, headers = stripe_post(event)
    with httpx.Client(timeout=10) as client:
        return client.post(
            f"http://127.0.0.1:{port}/webhooks/stripe",
            content=body,
            headers={**headers, "connection": "close"},
        )


def post_all(port: int, events: list[dict[str, object]], threads: int = 8) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()
    queue = list(events)

    def run() -> None:
        while True:
            with lock:
                if not queue:
                    return
                event = queue.pop()
            r = post_fresh_connection(port, event)
            with lock:
                statuses.append(r.status_code)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    return statuses


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"connection": "close"}).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_workers_share_the_webhooks_and_store_and_deliver_each_once(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    relay, supervisor = two_workers(relay_process, sandbox, track='flush_interval = "2s"')
    pids = workers_of(supervisor)
    assert len(pids) == 2
    cpu_before = [cpu_seconds(p) for p in pids]

    events = [stripe_event() for _ in range(400)]
    assert post_all(relay.port, events) == [200] * 400
    # Senders retry: the same events again, to whichever worker, are duplicates.
    retries = events[:100]
    answers = [post_fresh_connection(relay.port, e).json() for e in retries]
    assert answers == [{"ok": True, "accepted": 0, "duplicates": 1}] * 100

    # Both workers took webhooks (the one that does not forward works only for them).
    worked = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
    assert min(worked) > 0.05, worked

    delivered = wait_delivered(sandbox, 400, timeout=60)
    assert sorted(delivered) == sorted(e["data"]["object"]["id"] for e in events)

    # Whichever worker answers /metrics counts the webhooks of both.
    for _ in range(6):
        m = scrape(relay.port)
        stripe = frozenset({("source", "stripe")})
        assert m[("relay_webhooks_total", stripe | {("outcome", "accepted")})] == 400
        assert m[("relay_webhooks_total", stripe | {("outcome", "duplicate")})] == 100
        assert m[("relay_events_total", stripe | {("outcome", "mapped")})] == 400
        assert m[("relay_store_commit_seconds_count", frozenset())] >= 1
        assert not any(dict(labels).get("pid") for _, labels in m)

    for _ in range(6):  # any worker says ready
        r = httpx.get(f"http://127.0.0.1:{relay.port}/readyz", headers={"connection": "close"})
        assert (r.status_code, r.json()) == (200, {"ok": True, "problems": [], "paused": {}})

    assert relay.signal(signal.SIGTERM) == 0
    log = relay.log.read_text()
    assert log.count("relay stopped cleanly") == 2
    assert "Traceback" not in log
    assert not any(alive(p) for p in pids)


def test_every_worker_reports_a_destination_paused_by_the_track_api(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    relay, _ = two_workers(
        relay_process, sandbox, track='api_key = "sk_test_not_a_key_of_the_sandbox"'
    )
    assert post_fresh_connection(relay.port, stripe_event()).status_code == 200
    deadline = time.monotonic() + 15
    answers: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        answers = [
            httpx.get(
                f"http://127.0.0.1:{relay.port}/readyz", headers={"connection": "close"}
            ).json()
            for _ in range(8)
        ]
        if all(a["paused"] for a in answers):
            break
        time.sleep(0.2)
    for a in answers:
        [(_destination, reason)] = dict(a["paused"]).items()  # type: ignore[call-overload]
        assert "401" in reason or "key" in reason.lower(), reason
    relay.signal(signal.SIGTERM)


def test_sighup_reloads_every_worker(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    relay, supervisor = two_workers(relay_process, sandbox)
    workers_of(supervisor)
    time.sleep(0.5)  # both workers have their SIGHUP handler
    os.kill(supervisor, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while relay.log.read_text().count("mappings reloaded") < 2:
        assert time.monotonic() < deadline, relay.log.read_text()[-2000:]
        time.sleep(0.05)
    assert relay.proc.poll() is None
    assert relay.signal(signal.SIGTERM) == 0


def test_a_killed_worker_is_started_again_and_nothing_acknowledged_is_lost(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    relay, supervisor = two_workers(relay_process, sandbox, track='flush_interval = "2s"')
    events = [stripe_event() for _ in range(300)]
    acked: list[str] = []

    def send() -> None:
        for event in events:
            while True:  # like a sender: retry until a 200
                try:
                    if post_fresh_connection(relay.port, event).status_code == 200:
                        acked.append(str(event["data"]["object"]["id"]))  # type: ignore[index]
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

    sender = threading.Thread(target=send)
    sender.start()
    for index in (1, 0):  # the one that only receives, then the one that also forwards
        time.sleep(0.5)
        before = workers_of(supervisor)
        victim = before[index]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            now = workers_of(supervisor)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, relay.log.read_text()[-2000:]
            time.sleep(0.1)
    sender.join(120)
    assert len(acked) == 300
    delivered = wait_delivered(sandbox, 300, timeout=60)
    assert set(acked) <= set(delivered)
    assert len(delivered) - len(set(delivered)) <= 25  # at most the batch in flight at the kill
    log = relay.log.read_text()
    assert log.count("exited with -9; starting it again") == 2
    assert relay.signal(signal.SIGTERM) == 0


def test_workers_stop_when_the_supervisor_is_killed(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    relay, supervisor = two_workers(relay_process, sandbox)
    pids = workers_of(supervisor)
    assert relay.signal(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.05)
    with socket.socket() as s:  # and the port is free again
        s.bind(("127.0.0.1", relay.port))


def test_a_port_already_in_use_is_one_line_and_exit_1(tmp_path: Path, sandbox: Sandbox) -> None:
    from tests.conftest import relay_toml

    config = tmp_path / "relay.toml"
    config.write_text(relay_toml(sandbox.base_url, tmp_path / "relay.db", relay=TWO))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--config", str(config), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"relay.port: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_workers_option_overrides_the_config_and_is_checked(tmp_path: Path) -> None:
    from relay.config import load_config
    from relay.errors import ConfigError
    from tests.conftest import relay_toml

    config = tmp_path / "relay.toml"
    config.write_text(relay_toml("http://127.0.0.1:1/api/v1", tmp_path / "relay.db", relay=TWO))
    assert load_config(config).relay.workers == 2
    config.write_text(
        relay_toml("http://127.0.0.1:1/api/v1", tmp_path / "relay.db", relay="workers = 0")
    )
    with pytest.raises(ConfigError, match="workers: must be between 1 and 64, not 0"):
        load_config(config)
    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--workers" in done.stderr


def test_a_mailgun_token_seen_by_one_worker_is_refused_by_the_other(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    """The token ledger is in the shared database: a signature block lifted onto a forged event
    is refused whichever worker the forgery reaches."""
    import json

    from tests.conftest import MAPPINGS, refused, relay_toml
    from tests.test_e2e_email import MAILGUN_KEY, mailgun_event, mailgun_post

    relay = relay_process(sandbox, relay=TWO)
    sources = f"""
[sources.mailgun]
provider = "mailgun"
secret = "{MAILGUN_KEY}"
mapping = "{MAPPINGS / "mailgun.toml"}"
"""
    database = relay.config.parent / "relay.db"
    relay.config.write_text(relay_toml(sandbox.base_url, database, sources=sources, relay=TWO))
    relay.start()
    assert relay.proc is not None
    assert len(workers_of(relay.proc.pid)) == 2

    def post(body: bytes, headers: dict[str, str]) -> httpx.Response:
        with httpx.Client(timeout=10) as client:  # a connection of its own: any worker
            return client.post(
                f"http://127.0.0.1:{relay.port}/webhooks/mailgun",
                content=body,
                headers={**headers, "connection": "close"},
            )

    body, headers = mailgun_post(mailgun_event("delivered"))
    assert post(body, headers).json() == {"ok": True, "accepted": 1, "duplicates": 0}
    forged = json.loads(body)
    # Sixteen tries on fresh connections: the kernel sends some to each worker.
    for _ in range(16):
        forged["event-data"] = mailgun_event("clicked")
        refused(post(json.dumps(forged).encode(), headers))
        retry = post(body, headers)
        assert retry.json() == {"ok": True, "accepted": 0, "duplicates": 1}
    assert relay.signal(signal.SIGTERM) == 0
