"""A 429's Retry-After, read as RFC 9110 defines it and held within [1 s, max_backoff]; the
API key's requests stay within requests_per_minute whatever the API answers; a long wait is
shown in /readyz and `relay status`."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from relay.answers import RateLimited, classify
from relay.cli import main
from tests.conftest import API_KEY, Relay, Sandbox
from tests.test_delivery import post_events, wait_until

NOW = 1_700_000_000.0


def http_date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC), usegmt=True)


def wait_for(headers: dict[str, str], body: Any = None, max_wait: float = 300.0) -> float:
    response = httpx.Response(429, headers=headers, json=body if body is not None else {})
    outcome = classify(response, max_wait=max_wait, now=NOW)
    assert isinstance(outcome, RateLimited)
    return outcome.retry_after


@pytest.mark.parametrize(
    ("header", "wait"),
    [
        ("30", 30.0),
        ("0", 1.0),  # never a tight loop
        ("00012", 12.0),
        ("99999999999999999999", 300.0),  # valid, but held to max_backoff
        ("1e9", 60.0),  # not delay-seconds: ignored, so one whole window
        ("inf", 60.0),
        ("nan", 60.0),
        ("-5", 60.0),
        ("1.5", 60.0),
        ("soon", 60.0),
        (http_date(NOW + 120), 120.0),
        (http_date(NOW - 3600), 1.0),  # a date already past: the floor
        (http_date(NOW + 86400 * 365), 300.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 1.0),  # the obsolete forms are HTTP-dates too
        ("Sun Nov  6 08:49:37 1994", 1.0),
    ],
)
def test_retry_after_header(header: str, wait: float) -> None:
    assert wait_for({"retry-after": header}) == wait


@pytest.mark.parametrize(
    ("body", "wait"),
    [
        ({"retry_after": 1e9}, 300.0),
        ({"retry_after": 10**400}, 300.0),
        ({"retry_after": 0}, 1.0),
        ({"retry_after": -1}, 60.0),
        ({"retry_after": "5"}, 60.0),
        ({"retry_after": True}, 60.0),
    ],
)
def test_retry_after_in_the_body(body: dict[str, Any], wait: float) -> None:
    assert wait_for({}, body) == wait


def test_nan_and_infinity_in_the_body_are_held_too() -> None:
    for token, wait in (("NaN", 60.0), ("Infinity", 300.0), ("-Infinity", 60.0)):
        response = httpx.Response(429, content=f'{{"retry_after": {token}}}'.encode())
        assert classify(response, max_wait=300.0, now=NOW) == RateLimited(wait), token


def test_max_backoff_caps_and_the_floor_wins_over_a_tiny_max_backoff() -> None:
    assert wait_for({"retry-after": "30"}, max_wait=2.0) == 2.0
    assert wait_for({"retry-after": "30"}, max_wait=0.5) == 1.0


def test_the_detail_says_what_the_api_asked() -> None:
    response = httpx.Response(429, headers={"retry-after": "1e9"}, json={})
    outcome = classify(response, max_wait=300.0, now=NOW)
    assert isinstance(outcome, RateLimited)
    assert "'1e9' ignored" in outcome.detail and "60 s" in outcome.detail


# -- against the sandbox ------------------------------------------------------------------


def requests_at(sandbox: Sandbox) -> list[float]:
    return [r["at"] for r in sandbox.requests()["requests"]]


@pytest.mark.parametrize("header", ["0", "-1", "nan"])
def test_a_zero_or_unusable_retry_after_makes_no_tight_loop(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], header: str
) -> None:
    sandbox.fault(status=429, retry_after_header=header)
    relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "2s"')
    post_events(relay, 1)
    assert wait_until(lambda: len(requests_at(sandbox)) >= 1, timeout=5)
    time.sleep(3.0)
    sent = requests_at(sandbox)
    assert 2 <= len(sent) <= 5, len(sent)  # one a second or slower, not 60 in a moment
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 0.95, gaps


def test_never_more_than_requests_per_minute_whatever_the_api_answers(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=429, retry_after_header="0")
    relay = relay_factory(
        sandbox, track='flush_interval = "100ms"\nrequests_per_minute = 3\nmax_backoff = "1s"'
    )
    post_events(relay, 1)
    time.sleep(4.5)
    assert len(requests_at(sandbox)) == 3  # the window is full until a minute has passed


@pytest.mark.parametrize("header", ["1e9", "inf", "99999999999999999999"])
def test_an_endless_retry_after_waits_max_backoff_then_delivers(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], header: str
) -> None:
    sandbox.fault(status=429, retry_after_header=header, count=1)
    relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "2s"')
    post_events(relay, 3)
    assert wait_until(lambda: len(sandbox.events()) == 3, timeout=8)
    first, second = requests_at(sandbox)
    assert 1.9 <= second - first <= 4


def test_an_http_date_is_waited_for(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "30s"')
    until = float(int(time.time() + 4))  # an HTTP-date has whole seconds
    sandbox.fault(status=429, retry_after_header=http_date(until), count=1)
    post_events(relay, 1)
    assert wait_until(lambda: len(sandbox.events()) == 1, timeout=15)
    first, second = requests_at(sandbox)
    # Not before the date, and not the 60 s the relay waits when it cannot read the header.
    assert second >= until - 0.05 and second - first <= 10


def test_a_long_wait_shows_in_readyz_and_status(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=429, retry_after_header="inf", count=1)
    relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "30s"')
    dest = relay.config.sources["stripe"].destination.name
    post_events(relay, 1)
    assert wait_until(lambda: bool(httpx.get(f"{relay.url}/readyz").json()["paused"]), timeout=5)
    ready = httpx.get(f"{relay.url}/readyz")
    assert ready.status_code == 200  # the relay still takes and keeps webhooks
    reason = ready.json()["paused"][dest]
    assert reason.startswith("rate-limited by the track API until 20"), reason
    assert "HTTP 429" in reason and "'inf' ignored" in reason and "max_backoff" in reason
    result = CliRunner().invoke(main, ["status", "--config", str(relay.config_path)])
    assert result.exit_code == 0, result.output
    assert f"PAUSED: {reason}" in result.output
    data = json.loads(
        CliRunner().invoke(main, ["status", "--json", "--config", str(relay.config_path)]).stdout
    )
    assert data["destinations"][0]["paused"] == reason
    assert API_KEY not in ready.text + result.output
