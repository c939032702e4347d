"""Hostile forms posted to a Mailgun source of a relay running as its own process.

A Mailgun legacy webhook is a form whose signature travels among its fields, so the form is
parsed before anything is verified: whatever an unauthenticated sender posts must get a 400
or a 401 (never a 503 with a traceback), store nothing, and cost the event loop so little
that /healthz stays quick while several such bodies arrive at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import MAPPINGS, TABLES, Sandbox, row_counts
from tests.test_e2e_email import MAILGUN_KEY
from tests.test_process import RelayProcess, relay_process

__all__ = ["relay_process"]  # the fixture

MAX_BODY = 1_048_576  # the default max_body_bytes


def multipart(parts: list[bytes], boundary: bytes = b"b") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def name_star_without_value() -> tuple[bytes, str]:
    return multipart([b"Content-Disposition: form-data; name*\r\n\r\nx", field("event", b"x")])


def nested(depth: int = 3000) -> tuple[bytes, str]:
    """Each part a multipart of its own, `depth` deep."""
    head = b"".join(
        b'--b%d\r\nContent-Disposition: form-data; name="f%d"\r\n'
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i, i + 1)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + b"x" + tail, "multipart/form-data; boundary=b0"


def many_parts(total: int) -> tuple[bytes, str]:
    """256 fields (the most a form may have) filling `total` bytes, and no signature."""
    size = (total - 256 * 60) // 256
    return multipart([field(f"f{i}", b"x" * size) for i in range(256)])


def long_headers(total: int) -> tuple[bytes, str]:
    """Parts whose headers are as long as a part's headers may be (8 KiB), more than all
    parts' headers may be together (64 KiB)."""
    part = b'Content-Disposition: form-data; name="f"; a="' + b"x" * 8000 + b'"\r\n\r\nv'
    return multipart([part] * (total // 8100))


def unusual_headers(total: int) -> tuple[bytes, str]:
    """256 parts whose headers each take the slow road (extra parameters and headers)."""
    part = (
        b'Content-Disposition: form-data; p0=v; p1=v; name="f"\r\n'
        b"Content-Type: text/plain; a=1; b=2; c=3\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"
        b"X-D: 4\r\nX-E: 5\r\n\r\n"
    )
    return multipart([part + b"y" * ((total - 256 * 220) // 256)] * 256)


def percent_escapes(total: int) -> tuple[bytes, str]:
    return b"a=" + b"%41" * (total // 3 - 1), "application/x-www-form-urlencoded"


@pytest.fixture
def relay(sandbox: Sandbox, relay_process: Callable[..., RelayProcess]) -> Iterator[RelayProcess]:
    from tests.conftest import relay_toml

    process = relay_process(sandbox)
    sources = f"""
[sources.mailgun]
provider = "mailgun"
secret = "{MAILGUN_KEY}"
mapping = "{MAPPINGS / "mailgun.toml"}"
"""
    database = process.config.parent / "relay.db"
    process.config.write_text(relay_toml(sandbox.base_url, database, sources=sources))
    process.start()
    yield process
    process.stop()


def rows(relay: RelayProcess) -> dict[str, int]:
    return row_counts(relay.config.parent / "relay.db", TABLES)


def post(relay: RelayProcess, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{relay.port}/webhooks/mailgun",
        content=body,
        headers={"content-type": content_type},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("make", "status", "error"),
    [
        (name_star_without_value, 400, "invalid_body"),
        (nested, 401, "invalid_signature"),  # the nested part is skipped, unopened
        (lambda: many_parts(700_000), 401, "invalid_signature"),
        (lambda: multipart([field(f"f{i}", b"x") for i in range(257)]), 400, "invalid_body"),
        (lambda: long_headers(MAX_BODY - 20_000), 400, "invalid_body"),
        (lambda: unusual_headers(MAX_BODY - 1000), 401, "invalid_signature"),
        (lambda: percent_escapes(MAX_BODY - 1000), 401, "invalid_signature"),
        (
            lambda: multipart([b'Content-Disposition: form-data; name="f"\r\n' * 9 + b"\r\nv"]),
            400,
            "invalid_body",
        ),
        (lambda: (b"%zz=1", "application/x-www-form-urlencoded"), 400, "invalid_body"),
    ],
    ids=[
        "name-star-without-value",
        "3000-deep-nesting",
        "0.7-MB-of-fields",
        "257-parts",
        "long-part-headers",
        "unusual-part-headers",
        "a-megabyte-of-percent-escapes",
        "repeated-part-headers",
        "bad-percent-escape",
    ],
)
def test_hostile_forms_get_a_json_4xx_and_store_nothing(
    relay: RelayProcess, make: Callable[[], tuple[bytes, str]], status: int, error: str
) -> None:
    body, content_type = make()
    assert len(body) <= MAX_BODY
    r = post(relay, body, content_type)
    assert (r.status_code, r.json()["ok"], r.json()["error"]) == (status, False, error), r.text
    assert rows(relay) == dict.fromkeys(TABLES, 0)
    assert "Traceback" not in relay.log.read_text()


def test_hostile_forms_at_once_do_not_hold_up_the_event_loop(relay: RelayProcess) -> None:
    """Four senders post the costliest forms they can, each up to max_body_bytes, again and
    again for two seconds; meanwhile /healthz is asked every 20 ms and must keep answering
    within 200 ms."""
    bodies = [
        many_parts(700_000),
        many_parts(MAX_BODY - 1000),
        nested(),
        long_headers(MAX_BODY - 20_000),
        unusual_headers(MAX_BODY - 1000),
        percent_escapes(MAX_BODY - 1000),
        name_star_without_value(),
    ]
    assert all(len(b) <= MAX_BODY for b, _ in bodies)
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 2.0

    def sender(offset: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = offset
            while time.monotonic() < deadline:
                body, content_type = bodies[n % len(bodies)]
                r = client.post(
                    f"http://127.0.0.1:{relay.port}/webhooks/mailgun",
                    content=body,
                    headers={"content-type": content_type},
                )
                with lock:
                    statuses.append(r.status_code)
                n += 1

    def prober() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                assert client.get(f"http://127.0.0.1:{relay.port}/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=prober))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) >= 2 * len(bodies), len(statuses)
    assert sorted(set(statuses)) == [400, 401], statuses
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 0.2, sorted(latencies)[-5:]
    assert rows(relay) == dict.fromkeys(TABLES, 0)
