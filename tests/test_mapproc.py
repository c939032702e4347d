"""`relay serve` with one process maps in a child process (relay/mapproc.py): the child is
there, a child killed is started again and maps what arrived meanwhile, the gateway's death
takes the child with it, and the counts it makes reach the gateway's /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import Sandbox, relay_toml, stripe_event, stripe_post
from tests.servers import free_port
from tests.test_process import RelayProcess


def mapper_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "relay.mapproc"], capture_output=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone too
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def post(p: RelayProcess) -> str:
    event = stripe_event("charge.refunded")
    body, headers = stripe_post(event)
    r = httpx.post(f"http://127.0.0.1:{p.port}/webhooks/stripe", content=body, headers=headers)
    assert r.status_code == 200, r.text
    return str(event["data"]["object"]["id"])


def test_a_killed_mapper_process_is_started_again_and_maps_what_came_meanwhile(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = tmp_path / "relay.toml"
    track = 'flush_interval = "10ms"'
    config.write_text(relay_toml(sandbox.base_url, tmp_path / "relay.db", track=track))
    p = RelayProcess(config, free_port(), tmp_path / "relay.log")
    p.start()
    try:
        assert p.proc is not None
        [child] = mapper_pids(p.proc.pid)
        first = post(p)
        assert [e["payload"]["charge_id"] for e in sandbox.wait_for(1)] == [first]
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: not alive(child))
        second = post(p)  # stored while no mapper runs: mapped by the next one
        [again] = wait_until(lambda: mapper_pids(p.proc.pid))  # type: ignore[union-attr]
        assert again != child
        delivered = sandbox.wait_for(2, timeout=20)
        assert sorted(e["payload"]["charge_id"] for e in delivered) == sorted([first, second])
        metrics = httpx.get(f"http://127.0.0.1:{p.port}/metrics").text
        assert 'relay_events_total{outcome="mapped",source="stripe"} 2.0' in metrics
        assert "mapper process exited with -9; starting it again" in p.log.read_text()
        p.proc.kill()  # the gateway dies: its mapper with it
        p.proc.wait()
        wait_until(lambda: not alive(again))
    finally:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
