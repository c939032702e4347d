"""Stripe webhooks end to end: the relay under uvicorn, the sandbox as the track API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKENDS, Relay, Sandbox, row_counts, stripe_event, stripe_post

# Every test on both backends: SQLite, and PostgreSQL (a server started for the tests)
pytestmark = pytest.mark.parametrize("relay_backend", BACKENDS, indirect=True)


def count(db: Path, table: str) -> int:
    return row_counts(db, (table,))[table]


async def post_all(url: str, posts: list[tuple[bytes, dict[str, str]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(url, content=b, headers=h) for b, h in posts))


def checkout(amount: int = 4999, currency: str = "usd") -> tuple[dict[str, object], str]:
    visitor = str(uuid.uuid4())
    event = stripe_event()
    obj = event["data"]["object"]  # type: ignore[index]
    obj["amount_total"] = amount  # type: ignore[index]
    obj["currency"] = currency  # type: ignore[index]
    obj["metadata"]["visitor_id"] = visitor  # type: ignore[index]
    return event, visitor


def test_concurrent_events_and_retries_become_exactly_one_track_event_each(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "2s"')
    events = [checkout() for _ in range(60)]
    first = [stripe_post(e) for e, _ in events]
    # Stripe re-signs each retry with a new timestamp.
    retries = [stripe_post(e, timestamp=int(time.time()) - 30) for e, _ in events]
    url = f"{relay.url}/webhooks/stripe"
    answers = asyncio.run(post_all(url, first + retries))
    assert all(r.status_code == 200 for r in answers), [
        r.text for r in answers if r.status_code != 200
    ]
    bodies = [r.json() for r in answers]
    assert sum(b["accepted"] for b in bodies) == 60
    assert sum(b["duplicates"] for b in bodies) == 60

    delivered = sandbox.wait_for(60, timeout=20)
    time.sleep(0.5)  # nothing more may come
    delivered = sandbox.events()
    assert len(delivered) == 60
    by_order = {e["payload"]["order_id"]: e for e in delivered}
    for event, visitor in events:
        track = by_order[event["data"]["object"]["id"]]  # type: ignore[index]
        assert track["name"] == "purchase"
        assert track["payload"]["amount"] == "49.99"
        assert track["payload"]["currency"] == "USD"
        assert track["visitor_id"] == visitor
        assert track["url"] == "https://example.com/pricing"
    requests = sandbox.requests()
    assert requests["total"] <= 4
    assert requests["by_status"] == {"200": requests["total"]}


def test_a_retry_after_the_answer_is_a_duplicate(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox)
    event, _ = checkout()
    r1 = relay.post("stripe", *stripe_post(event))
    r2 = relay.post("stripe", *stripe_post(event, timestamp=int(time.time()) + 1))
    assert r1.json() == {"ok": True, "accepted": 1, "duplicates": 0}
    assert r2.json() == {"ok": True, "accepted": 0, "duplicates": 1}
    assert len(sandbox.wait_for(1)) == 1
    time.sleep(0.6)
    assert len(sandbox.events()) == 1


def test_trickled_events_go_as_partial_batches_after_flush_interval(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "300ms"')
    sent_at = []
    for _ in range(30):
        event, _ = checkout()
        sent_at.append(time.monotonic())
        assert relay.post("stripe", *stripe_post(event)).status_code == 200
        time.sleep(0.05)
    assert len(sandbox.wait_for(30, timeout=10)) == 30
    sizes = [r["events"] for r in sandbox.requests()["requests"]]
    assert sum(sizes) == 30
    assert len(sizes) >= 2 and all(s < 25 for s in sizes), sizes


def test_first_partial_batch_waits_for_flush_interval(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "1500ms"')
    event, _ = checkout()
    posted = time.time()
    assert relay.post("stripe", *stripe_post(event)).status_code == 200
    time.sleep(0.8)
    assert sandbox.events() == []  # a lone event waits for company
    delivered = sandbox.wait_for(1, timeout=5)
    assert len(delivered) == 1
    assert delivered[0]["received_at"] - posted >= 1.4


@pytest.mark.parametrize(
    "case",
    [
        "wrong secret",
        "missing header",
        "ten minutes old",
        "an hour ahead",
        "flipped byte",
        "garbage header",
    ],
)
def test_bad_signatures_get_401_and_store_nothing(
    case: str, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox)
    event, _ = checkout()
    if case == "wrong secret":
        body, headers = stripe_post(event, secret="whsec_not_the_one")
    elif case == "ten minutes old":
        body, headers = stripe_post(event, timestamp=int(time.time()) - 600)
    elif case == "an hour ahead":
        body, headers = stripe_post(event, timestamp=int(time.time()) + 3600)
    else:
        body, headers = stripe_post(event)
        if case == "missing header":
            del headers["stripe-signature"]
        elif case == "flipped byte":
            body = body.replace(b"4999", b"4998")
        else:
            headers["stripe-signature"] = "t=abc,v1=zz"
    r = relay.post("stripe", body, headers)
    assert r.status_code == 401
    assert r.json()["ok"] is False and r.json()["error"] == "invalid_signature"
    db = relay.config.relay.database
    assert count(db, "webhooks") == 0
    assert count(db, "dedupe") == 0
    assert count(db, "outbox") == 0


def test_secret_rotation_accepts_either_secret(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    from tests.conftest import MAPPINGS

    sources = f"""
[sources.stripe]
provider = "stripe"
secret = ["whsec_new_secret", "whsec_old_secret"]
mapping = "{MAPPINGS / "stripe.toml"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    for secret in ("whsec_new_secret", "whsec_old_secret"):
        event, _ = checkout()
        assert relay.post("stripe", *stripe_post(event, secret=secret)).status_code == 200
    event, _ = checkout()
    assert relay.post("stripe", *stripe_post(event, secret="whsec_other")).status_code == 401


def test_answers_for_unknown_source_bad_body_and_oversized_body(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox, relay="max_body_bytes = 2048")
    event, _ = checkout()
    r = relay.post("nope", *stripe_post(event))
    assert (r.status_code, r.json()["error"]) == (404, "unknown_source")
    body, headers = stripe_post({"no": "id"})
    r = relay.post("stripe", body, headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    big = stripe_event(padding="x" * 4000)
    r = relay.post("stripe", *stripe_post(big))
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert count(relay.config.relay.database, "webhooks") == 0


def test_restart_keeps_dedupe_memory_and_queue(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=503)  # the track API is down: events wait in the outbox
    relay = relay_factory(sandbox, track='flush_interval = "100ms"')
    events = [checkout()[0] for _ in range(5)]
    for e in events:
        assert relay.post("stripe", *stripe_post(e)).json()["accepted"] == 1
    time.sleep(0.5)
    relay.stop()
    assert sandbox.events() == []
    sandbox.clear_faults()
    relay.start()
    assert len(sandbox.wait_for(5)) == 5
    for e in events:
        r = relay.post("stripe", *stripe_post(e))
        assert r.json() == {"ok": True, "accepted": 0, "duplicates": 1}
    time.sleep(0.5)
    assert len(sandbox.events()) == 5


def test_backlog_is_sent_within_the_rate_limit_without_a_429(
    sandbox_factory: Callable[..., Sandbox], relay_factory: Callable[..., Relay]
) -> None:
    """The track API's window is 60 s; the sandbox and the relay here count over 4 s, so the
    window rolls over within the test (the algorithm does not depend on its length). The
    flush interval is longer than the test: on a slow machine, posting the 300 may take longer
    than 5 s, and a batch left waiting that long is rightly sent partial."""
    window = 4.0
    sandbox = sandbox_factory(requests_per_minute=10, window=window)
    relay = relay_factory(
        sandbox, track='requests_per_minute = 10\nflush_interval = "60s"', rate_window=window
    )
    posts = [stripe_post(checkout()[0]) for _ in range(300)]
    answers = asyncio.run(post_all(f"{relay.url}/webhooks/stripe", posts))
    assert all(r.status_code == 200 for r in answers)
    # 12 full batches: 10 go in the first window, the last 2 when the window allows.
    deadline = time.monotonic() + 30
    while len(sandbox.events()) < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = sandbox.requests()
    assert log["by_status"] == {"200": 12}
    sizes = [r["events"] for r in log["requests"]]
    assert sizes == [25] * 12
    times = [r["at"] for r in log["requests"]]
    assert times[9] - times[0] < window  # the first ten in the first window
    assert times[10] - times[0] >= window  # then the window
    assert len(sandbox.events()) == 300


def test_a_source_without_verification_is_announced_loudly(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import MAPPINGS

    sources = f"""
[sources.open]
provider = "stripe"
verify = false
mapping = "{MAPPINGS / "stripe.toml"}"
"""
    with caplog.at_level("WARNING", logger="relay"):
        relay = relay_factory(sandbox, sources=sources)
    assert any("WITHOUT verification" in r.getMessage() for r in caplog.records)
    event, _ = checkout()
    body, headers = stripe_post(event)
    del headers["stripe-signature"]
    assert relay.post("open", body, headers).json()["accepted"] == 1
