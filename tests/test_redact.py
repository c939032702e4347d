"""Configured secrets never pass through from outside text: a track API that echoes the key
in its errors leaves no trace of it in logs, /readyz, `relay status` or dead letters."""

from __future__ import annotations

import json
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from relay.answers import Invalid, Pause, Retry, classify
from relay.cli import main
from relay.config import REDACTED, Secret, parse_config
from relay.redact import Redactor
from relay.storage import DEAD, DELIVERED
from tests.conftest import API_KEY, STRIPE_SECRET, Relay, Sandbox
from tests.test_delivery import outbox_states, post_events, wait_until

SECRETS = {
    "track": "sk_live_TRACK_0123456789",
    "site2": "sk_live_SITE2_9876543210",
    "stripe_old": "whsec_OLD_aaaaaaaaaaaa",
    "stripe_new": "whsec_NEW_bbbbbbbbbbbb",
    "user": "pipedrive-user-x1",
    "password": "pipedrive-password-y2",
    "token": "zoho-token-zzzzzzzzzzzz",
}


def config_with_every_kind_of_secret(tmp_path: Path) -> Redactor:
    mapping = tmp_path / "m.toml"
    mapping.write_text("")
    m = json.dumps(str(mapping))
    doc = f"""
[track]
base_url = "http://127.0.0.1:9/api/v1"
api_key = "{SECRETS["track"]}"
website_id = 1

[sources.stripe]
provider = "stripe"
secret = ["{SECRETS["stripe_old"]}", "{SECRETS["stripe_new"]}"]
mapping = {m}

[sources.site2]
provider = "stripe"
secret = "{SECRETS["stripe_new"]}"
api_key = "{SECRETS["site2"]}"
website_id = 2
mapping = {m}

[sources.pipedrive]
provider = "hmac"
verify = "basic"
username = "{SECRETS["user"]}"
password = "{SECRETS["password"]}"
mapping = {m}

[sources.zoho]
provider = "hmac"
verify = "token"
token = "{SECRETS["token"]}"
token_header = "X-Relay-Token"
mapping = {m}
"""
    return Redactor.of(parse_config(tomllib.loads(doc), tmp_path / "relay.toml", doc))


def test_every_configured_secret_is_redacted(tmp_path: Path) -> None:
    redact = config_with_every_kind_of_secret(tmp_path)
    text = " | ".join(f"{name}={value}" for name, value in SECRETS.items())
    out = redact(text)
    for value in SECRETS.values():
        assert value not in out
    assert out.count(REDACTED) == len(SECRETS)
    assert out.startswith(f"track={REDACTED} | site2={REDACTED}")


def test_a_secret_inside_another_is_redacted_whole() -> None:
    redact = Redactor([Secret("abc123"), Secret("abc123def456")])
    assert redact("x abc123def456 y abc123") == f"x {REDACTED} y {REDACTED}"
    assert Redactor([])("nothing to do") == "nothing to do"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            httpx.Response(401, json={"error": f"unauthorized for Bearer {API_KEY}"}),
            Pause(401, f"HTTP 401 unauthorized for Bearer {REDACTED}", whole_key=True),
        ),
        (
            httpx.Response(404, json={"error": f"no website for {API_KEY}"}),
            Pause(404, f"HTTP 404 no website for {REDACTED}", whole_key=False),
        ),
        (
            httpx.Response(503, json={"error": f"busy ({API_KEY})"}),
            Retry(f"HTTP 503 busy ({REDACTED})"),
        ),
        (
            httpx.Response(400, text="k" * 490 + API_KEY),  # cut after redaction, not before
            Invalid("k" * 490 + REDACTED),
        ),
    ],
)
def test_answers_are_redacted_before_they_are_kept(
    response: httpx.Response, expected: object
) -> None:
    assert classify(response, Redactor([Secret(API_KEY)])) == expected


# -- against the sandbox, whose errors echo the request's key -----------------------------


def shown(relay: Relay) -> str:
    """Everything an operator sees: /readyz, `relay status`, dead letters."""
    run = CliRunner().invoke
    config = ["--config", str(relay.config_path)]
    return "\n".join(
        [
            httpx.get(f"{relay.url}/readyz").text,
            run(main, ["status", *config]).output,
            run(main, ["status", "--json", *config]).output,
            run(main, ["dead-letters", "list", "--json", *config]).output,
        ]
    )


@pytest.mark.parametrize("status", [401, 404, 400, 500])
def test_an_api_key_echoed_by_the_track_api_is_never_kept_or_shown(
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    sandbox.fault(status=status, echo_key=True, count=1)
    with caplog.at_level("INFO", logger="relay"):
        relay = relay_factory(sandbox, track='flush_interval = "100ms"\nmax_backoff = "1s"')
        post_events(relay, 1)
        db = relay.db
        done = {DEAD: 1} if status == 400 else {DELIVERED: 1}
        assert wait_until(lambda: outbox_states(db) == done, timeout=10), outbox_states(db)
        text = shown(relay)
    # the fault really echoed the key, and the relay kept what the API said, redacted
    assert any(r["fault"] for r in sandbox.requests()["requests"])
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert REDACTED in logs + text
    for secret in (API_KEY, STRIPE_SECRET):
        assert secret not in text
        assert secret not in logs
    conn = sqlite3.connect(db)
    try:
        stored = json.dumps(conn.execute("SELECT * FROM destinations").fetchall())
        stored += json.dumps(conn.execute("SELECT last_error FROM outbox").fetchall())
    finally:
        conn.close()
    assert API_KEY not in stored and REDACTED in stored
