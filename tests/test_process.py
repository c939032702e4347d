"""The relay as a real process: SIGKILL at any moment loses nothing acknowledged; SIGTERM drains."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Sandbox, relay_toml, stripe_event, stripe_post
from tests.servers import free_port


class RelayProcess:
    def __init__(self, config: Path, port: int, log: Path):
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=0.5).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError("relay did not start: " + self.log.read_text()[-3000:])

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def relay_process(tmp_path: Path) -> Callable[..., RelayProcess]:
    made: list[RelayProcess] = []

    def make(sandbox: Sandbox, track: str = "", relay: str = "") -> RelayProcess:
        config = tmp_path / "relay.toml"
        config.write_text(
            relay_toml(sandbox.base_url, tmp_path / "relay.db", track=track, relay=relay)
        )
        p = RelayProcess(config, free_port(), tmp_path / "relay.log")
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        p.stop()


class Sender:
    """Posts distinct signed Stripe events from a few threads; remembers what got a 200."""

    def __init__(self, port: int, total: int, threads: int = 4):
        self.url = f"http://127.0.0.1:{port}/webhooks/stripe"
        self.queue = [stripe_event() for _ in range(total)]
        self.acked: list[str] = []
        self.statuses: Counter[int | str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                with self.lock:
                    if not self.queue:
                        return
                    event = self.queue.pop()
                body, headers = stripe_post(event)
                while True:  # like a sender: retry until the relay answers 2xx
                    try:
                        r = client.post(self.url, content=body, headers=headers)
                        status: int | str = r.status_code
                    except httpx.HTTPError:
                        status = "connection error"
                    with self.lock:
                        self.statuses[status] += 1
                    if status == 200:
                        with self.lock:
                            self.acked.append(event["data"]["object"]["id"])
                        break
                    assert status in (503, "connection error"), status
                    time.sleep(0.05)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)


def wait_delivered(sandbox: Sandbox, n: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = [e["payload"]["order_id"] for e in sandbox.events()]
        if len(set(ids)) >= n or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def test_sigkill_three_times_under_load_loses_nothing_acknowledged(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    sandbox.fault(latency_ms=30)  # so that batches are in flight when the kill comes
    relay = relay_process(
        sandbox,
        track='flush_interval = "50ms"\nmax_backoff = "500ms"\nrequests_per_minute = 6000',
    )
    relay.start()
    sender = Sender(relay.port, 2000)
    sender.start()
    rng = random.Random(42)
    kills = 0
    while kills < 3:
        time.sleep(rng.uniform(0.4, 1.2))
        assert relay.signal(signal.SIGKILL) == -signal.SIGKILL
        kills += 1
        time.sleep(0.1)
        relay.start()
    sender.join(120)
    assert sender.done
    acked = set(sender.acked)
    assert len(acked) == 2000
    delivered = wait_delivered(sandbox, len(acked), timeout=60)
    assert acked <= set(delivered), f"lost {len(acked - set(delivered))} acknowledged events"
    duplicates = len(delivered) - len(set(delivered))
    # At most the batches in flight at each kill (one batch of 25 per destination).
    assert duplicates <= kills * 25, duplicates
    assert sender.statuses[200] == 2000


def test_sigterm_under_load_exits_0_and_loses_nothing(
    sandbox: Sandbox, relay_process: Callable[..., RelayProcess]
) -> None:
    sandbox.fault(latency_ms=20)
    relay = relay_process(sandbox, track='flush_interval = "50ms"', relay='shutdown_grace = "5s"')
    relay.start()
    sender = Sender(relay.port, 600)
    sender.start()
    time.sleep(1.0)
    started = time.monotonic()
    assert relay.signal(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    log = relay.log.read_text()
    assert "Traceback" not in log
    assert "relay stopped cleanly" in log
    relay.start()  # what was queued and not yet sent goes now
    sender.join(60)
    assert sender.done
    acked = set(sender.acked)
    assert len(acked) == 600
    delivered = wait_delivered(sandbox, len(acked), timeout=30)
    assert acked <= set(delivered)
    assert set(sender.statuses) <= {200, 503, "connection error"}
    relay.signal(signal.SIGTERM)
    assert os.path.getsize(relay.config.parent / "relay.db") > 0
