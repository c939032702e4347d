"""Limits on what a sender may make the relay read and keep: the size of a request's headers
(431), the time its headers and its body take to arrive (408), and the headers stored with a
webhook. The relay runs as `relay serve`, with the HTTP protocol it runs in production."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay import sandbox as sandbox_mod
from relay.config import load_config
from relay.errors import ConfigError
from relay.ingest import MAX_STORED_HEADER_BYTES, MAX_STORED_HEADERS
from tests.conftest import API_KEY, relay_toml, row_counts, stripe_event, stripe_post
from tests.servers import ThreadedServer, free_port
from tests.test_process import RelayProcess

MAX_HEADER_BYTES = 40000
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    sb = ThreadedServer(sandbox_mod.create_app([API_KEY], [1], 6000, tmp / "sandbox.db")).start()
    config = tmp / "relay.toml"
    config.write_text(
        relay_toml(
            f"{sb.url}/api/v1",
            tmp / "relay.db",
            relay=f'max_header_bytes = {MAX_HEADER_BYTES}\nbody_timeout = "{TIMEOUT:g}s"',
        )
    )
    process = RelayProcess(config, free_port(), tmp / "relay.log")
    process.start()
    yield process
    process.stop()
    sb.stop()


def url(relay: RelayProcess, path: str = "/webhooks/stripe") -> str:
    return f"http://127.0.0.1:{relay.port}{path}"


def db(relay: RelayProcess) -> Path:
    return relay.config.parent / "relay.db"


def peak_rss_kb(relay: RelayProcess) -> int:
    assert relay.proc is not None
    status = Path(f"/proc/{relay.proc.pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["ok"] is False and response.json()["error"] == code


@pytest.mark.parametrize(
    "headers",
    [
        {"x-big": "a" * 8_000_000},  # one 8 MB header
        {f"x-h{i}": "a" * 8000 for i in range(1000)},  # 8 MB in a thousand headers
    ],
    ids=["one", "many"],
)
def test_8_mb_of_headers_get_431_quickly_without_being_read_whole(
    relay: RelayProcess, headers: dict[str, str]
) -> None:
    before, peak = row_counts(db(relay)), peak_rss_kb(relay)
    body, signed = stripe_post(stripe_event())
    started = time.monotonic()
    r = httpx.post(url(relay), content=body, headers={**signed, **headers}, timeout=10)
    assert time.monotonic() - started < 3
    refused(r, 431, "headers_too_large")
    assert peak_rss_kb(relay) - peak < 4096  # read whole, 8 MB would be held at least once
    assert row_counts(db(relay)) == before
    assert httpx.get(url(relay, "/healthz")).status_code == 200


def test_the_header_limit_is_the_configured_one(relay: RelayProcess) -> None:
    body, signed = stripe_post(stripe_event())
    r = httpx.post(url(relay), content=body, headers={**signed, "x-pad": "a" * MAX_HEADER_BYTES})
    refused(r, 431, "headers_too_large")
    body, signed = stripe_post(stripe_event())
    r = httpx.post(url(relay), content=body, headers={**signed, "x-pad": "a" * 30000})
    assert r.status_code == 200, r.text


def test_trailers_of_a_chunked_body_count_as_headers(relay: RelayProcess) -> None:
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.sendall(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nX-Trailer: " + b"a" * 1_000_000
        )
        s.settimeout(5)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "headers_too_large"


def trickle(relay: RelayProcess, head: bytes, byte: bytes) -> tuple[bytes, float]:
    """Send `head`, then one `byte` every 0.2 s until the relay answers or closes; its answer
    and the time it took."""
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.sendall(head)
        started = time.monotonic()
        s.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < 10:
            try:
                s.send(byte)
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - started


def test_a_body_trickled_in_gets_408_after_body_timeout(relay: RelayProcess) -> None:
    before = row_counts(db(relay))
    head = (
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    answer, took = trickle(relay, head, b" ")
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
    assert row_counts(db(relay)) == before


def test_headers_trickled_in_get_408_after_body_timeout(relay: RelayProcess) -> None:
    answer, took = trickle(relay, b"POST /webhooks/stripe HTTP/1.1\r\nX-Slow: ", b"a")
    assert TIMEOUT * 0.9 < took < TIMEOUT + 2
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed(relay: RelayProcess) -> None:
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.settimeout(TIMEOUT + 3)
        started = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - started < TIMEOUT + 2


def test_a_slow_sender_does_not_hold_up_others(relay: RelayProcess) -> None:
    slow = threading.Thread(
        target=trickle, args=(relay, b"POST /webhooks/stripe HTTP/1.1\r\nX-Slow: ", b"a")
    )
    slow.start()
    body, signed = stripe_post(stripe_event())
    r = httpx.post(url(relay), content=body, headers=signed, timeout=TIMEOUT / 2)
    assert r.status_code == 200, r.text
    slow.join()


def test_only_a_bounded_set_of_headers_is_stored_with_a_webhook(relay: RelayProcess) -> None:
    event = stripe_event()
    body, signed = stripe_post(event)
    junk = {f"x-junk-{i:02d}": "j" * 1000 for i in range(35)}  # 35 KB of unsigned headers
    headers = {**junk, "authorization": "Bearer secret", **signed}  # the signature comes last
    r = httpx.post(url(relay), content=body, headers=headers)
    assert r.status_code == 200, r.text
    conn = sqlite3.connect(db(relay))
    try:
        (stored,) = conn.execute(
            "SELECT w.headers FROM webhooks w JOIN dedupe d ON d.webhook_id = w.id WHERE d.key = ?",
            (event["id"],),
        ).fetchone()
    finally:
        conn.close()
    kept = json.loads(stored)
    assert kept["stripe-signature"] == signed["stripe-signature"]
    assert kept["content-type"] == "application/json"
    assert "authorization" not in kept
    assert len(kept) <= MAX_STORED_HEADERS
    assert sum(len(k) + len(v) for k, v in kept.items()) <= MAX_STORED_HEADER_BYTES
    dropped = [k for k in junk if k not in kept]
    assert dropped and dropped == sorted(junk)[-len(dropped) :]  # the first ones are kept


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("max_header_bytes = 100", "relay.max_header_bytes: must be between 1024 and"),
        ('max_header_bytes = "big"', "relay.max_header_bytes: must be an integer"),
        ('body_timeout = "soon"', "relay.body_timeout: 'soon' is not a duration"),
        ('body_timeout = "0s"', "relay.body_timeout: must be a positive duration"),
    ],
)
def test_bad_limits_are_config_errors(tmp_path: Path, line: str, reason: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "relay.db", relay=line))
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert reason in e.value.message
