"""Three relays on one PostgreSQL database act as one: behind a round-robin client that tries
the next replica when one fails, with Stripe-style retries sent to another replica, and the
sender of the API key SIGKILLed twice under load, nothing acknowledged is lost, no retry is
counted twice, and together they stay within one requests_per_minute (no 429 at a sandbox
that enforces it) with full batches."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Sandbox, relay_toml, stripe_event, stripe_post
from tests.pgserver import PASSWORD as PG_PASSWORD
from tests.servers import free_port
from tests.test_process import relay_process

__all__ = ["relay_process"]  # the fixture

WINDOW = 2.0  # the rate limit's window, for the sandbox and the relays (the API's is 60 s)
PER_WINDOW = 8  # requests_per_minute, counted over WINDOW: 4 requests (100 events) a second
LEASE = 2.0


class Replica:
    def __init__(self, config: Path, log: Path):
        self.config = config
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.replica",
                    str(self.config),
                    str(self.port),
                    str(WINDOW),
                    str(LEASE),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.alive, self.log.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError("replica did not start: " + self.log.read_text()[-3000:])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sending(self) -> bool:
        """Whether this run of the replica is the key's sender (it says so when elected)."""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        return self.alive and "sending with API key" in text

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


class RoundRobin:
    """Posts signed Stripe events to the replicas in turn, each until a 200, trying the next
    replica after a failure; sends a fifth of them again to another replica, as Stripe retries."""

    def __init__(self, replicas: list[Replica], total: int, threads: int = 6):
        self.replicas = replicas
        self.queue = [(n, stripe_event()) for n in range(total)]
        self.acked: list[str] = []
        self.retries: Counter[str] = Counter()  # what a retry's answer said
        self.statuses: Counter[int | str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _post(self, client: httpx.Client, start: int, body: bytes, headers: Any) -> Any:
        n = start
        while True:
            url = f"{self.replicas[n % len(self.replicas)].url}/webhooks/stripe"
            try:
                r = client.post(url, content=body, headers=headers)
                status: int | str = r.status_code
            except httpx.HTTPError:
                status = "connection error"
            with self.lock:
                self.statuses[status] += 1
            if status == 200:
                return r.json()
            assert status in (503, "connection error"), status
            n += 1  # the next replica
            time.sleep(0.02)

    def _run(self) -> None:
        rng = random.Random(threading.get_ident())
        with httpx.Client(timeout=10) as client:
            while True:
                with self.lock:
                    if not self.queue:
                        return
                    n, event = self.queue.pop()
                body, headers = stripe_post(event)
                answer = self._post(client, n, body, headers)
                with self.lock:
                    self.acked.append(event["data"]["object"]["id"])
                if rng.random() < 0.2:  # the sender did not see the answer: again, elsewhere
                    again = self._post(client, n + 1, body, headers)
                    with self.lock:
                        self.retries[
                            "duplicate" if again["duplicates"] == 1 else json.dumps(again)
                        ] += 1
                assert answer["accepted"] == 1, answer

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)


@pytest.fixture
def replicas(tmp_path: Path) -> Any:
    made: list[Replica] = []

    def make(config: Path, n: int) -> list[Replica]:
        for i in range(n):
            made.append(Replica(config, tmp_path / f"replica{i}.log"))
        return made

    yield make
    for r in made:
        r.stop()


def test_three_replicas_act_as_one_relay(
    pg_url: str,
    sandbox_factory: Callable[..., Sandbox],
    replicas: Callable[..., list[Replica]],
    tmp_path: Path,
) -> None:
    sandbox = sandbox_factory(requests_per_minute=PER_WINDOW, window=WINDOW)
    sandbox.fault(latency_ms=30)  # so that a batch may be in flight when the kill comes
    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml(
            sandbox.base_url,
            pg_url,  # type: ignore[arg-type]
            track=f'flush_interval = "2s"\nmax_backoff = "1s"\nrequests_per_minute = {PER_WINDOW}',
        )
    )
    group = replicas(config, 3)
    for r in group:
        r.start()
    for r in group:
        r.wait_ready()
    total = 1500
    client = RoundRobin(group, total)
    started = time.time()
    client.start()
    kills: list[float] = []
    for at in (3.0, 7.0):
        time.sleep(max(0.0, started + at - time.time()))
        deadline = time.monotonic() + 5
        while not any(r.sending() for r in group) and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = next((r for r in group if r.sending()), group[0])
        victim.kill()
        kills.append(time.time())
        time.sleep(0.3)
        victim.start()
    client.join(120)
    assert client.done
    acked = set(client.acked)
    assert len(acked) == total

    deadline = time.monotonic() + 120
    while True:
        delivered = [e["payload"]["order_id"] for e in sandbox.events(limit=10_000)]
        if acked <= set(delivered) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2 * WINDOW)  # anything more on its way would arrive
    delivered = [e["payload"]["order_id"] for e in sandbox.events(limit=10_000)]
    requests = sandbox.requests()
    sent = [q for q in requests["requests"] if q["status"] == 200]
    mean_batch = sum(q["events"] for q in sent) / len(sent)
    twice = len(delivered) - len(set(delivered))
    failover = [min(q["at"] for q in sent if q["at"] > k) - k for k in kills]
    print(
        f"\nreplicas: acknowledged {len(acked)}, delivered {len(set(delivered))}, "
        f"delivered twice {twice}, retries answered {dict(client.retries)}, "
        f"429s {requests['by_status'].get('429', 0)}, requests {len(sent)}, "
        f"mean batch {mean_batch:.2f}, failover {[round(f, 2) for f in failover]} s, "
        f"answers {dict(client.statuses)}"
    )
    assert acked <= set(delivered), f"lost {len(acked - set(delivered))} acknowledged events"
    assert set(client.retries) == {"duplicate"}  # every retry elsewhere: a duplicate
    # Only a batch in flight at a kill may go twice (at most once more each).
    assert twice <= len(kills) * 25, twice
    assert requests["by_status"].get("429", 0) == 0, requests["by_status"]
    assert mean_batch >= 24.0, mean_batch
    assert all(f < 2 * WINDOW + 3 for f in failover), failover


def test_workers_on_postgres_are_replicas(
    pg_url: str, sandbox: Sandbox, relay_process: Callable[..., Any]
) -> None:
    """`relay serve --workers 2` on PostgreSQL: each worker forwards and keeps house, one of
    them at a time sends with the API key; each event once, retries duplicates."""
    from tests.test_workers import post_all, post_fresh_connection, wait_delivered

    relay = relay_process(
        sandbox, track='flush_interval = "300ms"', relay=f'database = "{pg_url}"\nworkers = 2'
    )
    relay.start()
    events = [stripe_event() for _ in range(300)]
    assert post_all(relay.port, events) == [200] * 300
    answers = [post_fresh_connection(relay.port, e).json() for e in events[:50]]
    assert answers == [{"ok": True, "accepted": 0, "duplicates": 1}] * 50
    delivered = wait_delivered(sandbox, 300, timeout=60)
    assert sorted(delivered) == sorted(e["data"]["object"]["id"] for e in events)
    assert relay.signal(signal.SIGTERM) == 0
    log = relay.log.read_text()
    assert "(replicas)" in log and log.count("relay stopped cleanly") == 2
    assert log.count("sending with API key") == 1, log  # one sender, no failover
    assert "Traceback" not in log and PG_PASSWORD not in log
