"""`relay serve` as a real process: SIGHUP reloads mappings, logs are one line per webhook and
per batch (text or JSON), no secret is ever logged, SIGTERM exits 0.

A real process because the SIGHUP handler is installed only in the main thread.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, STRIPE_SECRET, Sandbox, relay_toml, stripe_event, stripe_post
from tests.servers import free_port

MAPPING = """
[[events]]
on = "charge.refunded"
name = "NAME"
[events.payload]
charge_id = "{{ data.object.id }}"
"""


class Served:
    """`relay serve` in a child process, its stderr in a file."""

    def __init__(self, folder: Path, sandbox: Sandbox, *options: str):
        self.mapping = folder / "stripe.toml"
        self.config = folder / "relay.toml"
        self.log = folder / "relay.log"
        self.port = free_port()
        sources = (
            f'[sources.stripe]\nprovider = "stripe"\nsecret = "{STRIPE_SECRET}"\n'
            f'mapping = "{self.mapping}"\n'
        )
        self.config.write_text(
            relay_toml(
                sandbox.base_url,
                folder / "relay.db",
                sources=sources,
                track='flush_interval = "50ms"',
            )
        )
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Served:
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config),
                 "--port", str(self.port), *self.options],
                stdout=err,
                stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, "relay serve did not start:\n" + self.text()
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, event: dict[str, Any], secret: str = STRIPE_SECRET) -> httpx.Response:
        body, headers = stripe_post(event, secret=secret)
        return httpx.post(f"{self.url}/webhooks/stripe", content=body, headers=headers)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.text().splitlines() if re.search(pattern, line)]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"no log line {pattern!r}:\n{self.text()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def served(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(*options: str, mapping: str = MAPPING.replace("NAME", "refund")) -> Served:
        s = Served(tmp_path, sandbox, *options)
        s.mapping.write_text(mapping)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.kill()


def names(sandbox: Sandbox, n: int) -> list[str]:
    """The names of the first n events the sandbox took, oldest first."""
    events = sandbox.wait_for(n)
    assert len(events) == n, events
    return [e["name"] for e in reversed(events)]


def test_sighup_reloads_mappings_and_refuses_a_broken_one(
    served: Callable[..., Served], sandbox: Sandbox
) -> None:
    relay = served(mapping=MAPPING.replace("NAME", "refund_v1"))
    assert relay.post(stripe_event("charge.refunded")).status_code == 200
    assert names(sandbox, 1) == ["refund_v1"]

    relay.mapping.write_text(MAPPING.replace("NAME", "refund_v2"))
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    [line] = relay.wait_for_log("mappings reloaded")
    assert str(relay.mapping) in line
    assert relay.post(stripe_event("charge.refunded")).status_code == 200
    assert names(sandbox, 2) == ["refund_v1", "refund_v2"]

    relay.mapping.write_text(MAPPING.replace("NAME", "refund_v3").replace(" }}", " | nope }}"))
    relay.proc.send_signal(signal.SIGHUP)
    [line] = relay.wait_for_log("mapping reload refused")
    assert "ERROR" in line
    assert f"{relay.mapping}:" in line and "no filter named 'nope'" in line
    assert "keeping the mappings in use" in line
    assert relay.post(stripe_event("charge.refunded")).status_code == 200
    assert names(sandbox, 3) == ["refund_v1", "refund_v2", "refund_v2"]  # the old one still works

    assert relay.proc.poll() is None
    assert relay.stop() == 0
    assert len(relay.wait_for_log("mappings reloaded")) == 1


def test_sighup_refuses_a_mapping_over_the_limits_with_one_line_and_keeps_the_old(
    served: Callable[..., Served], sandbox: Sandbox
) -> None:
    relay = served(mapping=MAPPING.replace("NAME", "refund_v1"))
    relay.mapping.write_text(
        MAPPING.replace("NAME", "refund_v2").replace("data.object.id", "10**5000")
    )
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    [line] = relay.wait_for_log("mapping reload refused")
    assert re.search(
        rf"ERROR +relay\.webhook: mapping reload refused, keeping the mappings in use: "
        rf"{re.escape(str(relay.mapping))}:6: events\[0\]\.payload\.charge_id: '\*\*' would "
        r"make an integer of about 5001 digits; a mapping makes at most 1000$",
        line,
    ), line
    assert relay.post(stripe_event("charge.refunded")).status_code == 200
    assert names(sandbox, 1) == ["refund_v1"]  # the old mapping still works
    assert relay.stop() == 0
    text = relay.text()
    assert "Traceback" not in text and "Exception in callback" not in text, text
    assert len([x for x in text.splitlines() if "ERROR" in x]) == 1, text


def test_json_logs_one_object_per_line_one_line_per_webhook_and_batch(
    served: Callable[..., Served], sandbox: Sandbox
) -> None:
    relay = served("--log-format", "json", "--log-level", "debug")
    events = [stripe_event("charge.refunded") for _ in range(3)]
    signatures = []
    for n, event in enumerate(events, start=1):
        body, headers = stripe_post(event)
        signatures.append(headers["stripe-signature"])
        assert (
            httpx.post(f"{relay.url}/webhooks/stripe", content=body, headers=headers).json()[
                "accepted"
            ]
            == 1
        )
        sandbox.wait_for(n)  # one batch each
    assert relay.post(events[0]).json()["duplicates"] == 1
    assert relay.post(events[0], secret="whsec_not_it").status_code == 401
    relay.wait_for_log("events delivered", count=3)
    assert relay.stop() == 0

    records = []
    for line in relay.text().splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert set(record) >= {"ts", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
        records.append(record)
    webhooks = [r["message"] for r in records if r["logger"] == "relay.webhook"]
    assert len(webhooks) == 5
    assert sum(m.startswith("webhook stripe 200 accepted=1 duplicates=0 ") for m in webhooks) == 3
    assert sum(m.startswith("webhook stripe 200 accepted=0 duplicates=1 ") for m in webhooks) == 1
    assert sum(m.startswith("webhook stripe 401 invalid_signature: ") for m in webhooks) == 1
    batches = [r["message"] for r in records if r["message"].startswith("batch ")]
    assert batches == [f"batch {dest_name(relay)}: 1 events delivered"] * 3
    assert sandbox.requests()["total"] == 3
    assert {r["level"] for r in records} >= {"info"}

    text = relay.text()
    for secret in (API_KEY, STRIPE_SECRET, "whsec_not_it", *signatures):
        assert secret not in text
    assert "Bearer" not in text and "authorization" not in text.lower()


def dest_name(relay: Served) -> str:
    from relay.config import load_config

    return load_config(relay.config).sources["stripe"].destination.name


def test_text_logs_are_one_readable_line_each(
    served: Callable[..., Served], sandbox: Sandbox
) -> None:
    relay = served()
    assert relay.post(stripe_event("charge.refunded")).status_code == 200
    sandbox.wait_for(1)
    relay.wait_for_log("events delivered")
    assert relay.stop() == 0
    lines = relay.text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    [webhook] = [line for line in lines if "relay.webhook" in line]
    assert re.fullmatch(
        stamp + r" INFO    relay\.webhook: webhook stripe 200 accepted=1 duplicates=0 "
        r"\(\d+ bytes, [\d.]+ ms\)",
        webhook,
    ), webhook
    [batch] = [line for line in lines if "events delivered" in line]
    assert re.fullmatch(stamp + r" INFO    relay\.forwarder: batch \S+: 1 events delivered", batch)
    for line in lines:
        assert re.match(stamp + " ", line), line  # no stray multi-line output
        with pytest.raises(ValueError):
            json.loads(line)
    assert API_KEY not in relay.text() and STRIPE_SECRET not in relay.text()


def test_reload_refuses_a_mapping_whose_examples_fail(
    tmp_path: Path, sandbox: Sandbox, relay_factory: Callable[..., Any]
) -> None:
    import shutil

    from tests.conftest import MAPPINGS

    mappings = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, mappings)
    sources = f"""
[sources.stripe]
provider = "stripe"
secret = "{STRIPE_SECRET}"
mapping = "{mappings / "stripe.toml"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    mapper = relay.runtime.mapper
    before = mapper.mappings["stripe"]
    text = (mappings / "stripe.toml").read_text()
    # Still a valid file, but its own examples now disagree with it.
    (mappings / "stripe.toml").write_text(text.replace('name = "purchase"', 'name = "order"', 1))
    assert relay.runtime.reload() is False
    assert mapper.mappings["stripe"] is before
    (mappings / "stripe.toml").write_text(text.replace("# A refund", "# Refunds", 1))
    assert relay.runtime.reload() is True
    assert mapper.mappings["stripe"] is not before
