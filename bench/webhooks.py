"""Distinct, correctly signed Stripe webhooks, made before any clock starts.

Each one is a complete HTTP/1.1 request (about 1.2 KB, body about 1 KB): a realistic
`checkout.session.completed` event with its own event id, its metadata padded to bring the
body to ~1 KB, signed the way Stripe signs, with a timestamp taken when it is made (so it stays
inside the relay's 300 s tolerance for any run that starts within a minute or two).

Generation is spread over processes, one share per output, so that each wrk thread can load
a file of its own and no request is sent twice.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import stripe

from relay.providers.stripe import sample_event

EVENT_TYPE = "checkout.session.completed"
BODY_BYTES = 1024  # the target body size; the padding makes every body exactly this long
PATH = "/webhooks/stripe"


def _padded_event(now: float) -> dict[str, Any]:
    event = sample_event(EVENT_TYPE, now)
    event["data"]["object"]["metadata"]["note"] = ""
    return event


def _pad_for(now: float) -> int:
    """Characters of padding that bring a body to BODY_BYTES (ids have fixed lengths)."""
    bare = json.dumps(_padded_event(now), separators=(",", ":"))
    return max(0, BODY_BYTES - len(bare))


def body(now: float, pad: int) -> bytes:
    event = _padded_event(now)
    event["data"]["object"]["metadata"]["note"] = "x" * pad
    return json.dumps(event, separators=(",", ":")).encode()


def raw_request(port: int, payload: bytes, secret: str, timestamp: int) -> bytes:
    signature = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=timestamp
    )
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Stripe-Signature: {signature}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    )
    return head.encode() + payload


def make(count: int, port: int, secret: str) -> list[bytes]:
    """`count` distinct signed requests, timestamped now."""
    now = time.time()
    pad = _pad_for(now)
    ts = int(now)
    return [raw_request(port, body(now, pad), secret, ts) for _ in range(count)]


def _pool(processes: int) -> multiprocessing.pool.Pool:
    # Workers must die quietly when the pool ends them, whatever handlers the bench installed.
    return multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _write_share(args: tuple[Path, int, int, str]) -> int:
    path, count, port, secret = args
    with open(path, "wb") as out:
        for raw in make(count, port, secret):
            out.write(b"%d\n" % len(raw))
            out.write(raw)
    return count


def write_files(prefix: Path, shares: int, count: int, port: int, secret: str) -> list[Path]:
    """`count` requests split over `shares` files PREFIX.0, PREFIX.1, ... (length-prefixed)."""
    per = -(-count // shares)
    jobs = [(Path(f"{prefix}.{i}"), per, port, secret) for i in range(shares)]
    with _pool(min(shares, multiprocessing.cpu_count())) as pool:
        pool.map(_write_share, jobs)
    return [j[0] for j in jobs]


def _make_share(args: tuple[int, int, str]) -> list[bytes]:
    count, port, secret = args
    return make(count, port, secret)


def make_parallel(count: int, port: int, secret: str, workers: int | None = None) -> list[bytes]:
    """Like make(), on every core."""
    workers = workers or multiprocessing.cpu_count()
    per = -(-count // workers)
    jobs = [(min(per, count - i * per), port, secret) for i in range(workers) if count > i * per]
    with _pool(len(jobs)) as pool:
        parts = pool.map(_make_share, jobs)
    return [raw for part in parts for raw in part]


def read_file(path: Path) -> Iterator[bytes]:
    """The requests of a file written by write_files (for checks and tests)."""
    with open(path, "rb") as f:
        while line := f.readline():
            yield f.read(int(line))


def event_id(raw: bytes) -> str:
    return str(json.loads(raw.partition(b"\r\n\r\n")[2])["id"])
