"""SendGrid and Mailgun webhooks end to end: the relay under uvicorn, the sandbox as track API.

Every request is signed the way the sender signs it: SendGrid with an ECDSA P-256 key pair
(the relay holds the public half), Mailgun with the webhook signing key over timestamp + token.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from relay.providers import mailgun, sendgrid
from tests.conftest import MAPPINGS, TABLES, Relay, Sandbox, refused, settled

MAILGUN_KEY = "key-e2e-mailgun-signing-0123456789abcdef"
EXAMPLES = MAPPINGS / "examples" / "mailgun"
# What each SendGrid event type becomes (mappings/sendgrid.toml); processed makes nothing.
SENDGRID_NAMES = {
    "open": "email_open",
    "click": "email_click",
    "delivered": "email_delivered",
    "bounce": "email_bounce",
    "unsubscribe": "email_unsubscribe",
    "processed": None,
}


@dataclass
class Email:
    relay: Relay
    sandbox: Sandbox
    private_key: ec.EllipticCurvePrivateKey
    tmp: Path

    @property
    def db(self) -> Path:
        return self.relay.db

    def rows(self) -> dict[str, int]:
        return self.relay.rows()


@pytest.fixture
def email(sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path) -> Email:
    public, private_path = sendgrid.generate_keypair(tmp_path / "sendgrid")
    sources = f"""
[sources.sendgrid]
provider = "sendgrid"
public_key = "{public}"
mapping = "{MAPPINGS / "sendgrid.toml"}"

[sources.mailgun]
provider = "mailgun"
secret = "{MAILGUN_KEY}"
mapping = "{MAPPINGS / "mailgun.toml"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    return Email(relay, sandbox, sendgrid.load_private_key(private_path), tmp_path)


def recipient_hash(address: str) -> str:
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


# -- SendGrid ------------------------------------------------------------------------------


def sendgrid_events(types: list[str]) -> list[dict[str, Any]]:
    """One realistic event per type, each its own recipient, message, visitor and campaign."""
    events = sendgrid.sample_batch(types, time.time())
    for i, event in enumerate(events):
        tag = uuid.uuid4().hex[:10]
        event["email"] = f"Reader.{tag}@Example.com"
        event["sg_message_id"] = f"{tag}.recvd-5f4b9c6d8-x2qkp-1-6630F2A1-B.{i}"
        event["visitor_id"] = str(uuid.uuid4())
        event["campaign_id"] = f"campaign-{i % 4}"
    return events


def sendgrid_post(
    key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]], timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A batch as SendGrid posts it: a JSON array ending in CRLF, signed over timestamp + body."""
    body = json.dumps(events).encode() + b"\r\n"
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return body, {
        "content-type": "application/json",
        "user-agent": "SendGrid Event API",
        sendgrid.TIMESTAMP_HEADER: ts,
        sendgrid.SIGNATURE_HEADER: sendgrid.sign(key, ts, body),
    }


def check_sendgrid_forwarded(delivered: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """Exactly one track event per mapped SendGrid event, carrying that event's fields."""
    expected = [e for e in events if SENDGRID_NAMES[e["event"]]]
    assert len(delivered) == len(expected)
    by_hash = {t["payload"]["recipient_sha256"]: t for t in delivered}
    assert len(by_hash) == len(delivered), "an event was forwarded twice"
    for event in expected:
        track = by_hash[recipient_hash(event["email"])]
        assert track["name"] == SENDGRID_NAMES[event["event"]]
        assert track["visitor_id"] == event["visitor_id"]
        assert track["payload"]["campaign_id"] == event["campaign_id"]
        assert track["payload"]["message_id"] == event["sg_message_id"]
        if event["event"] == "click":
            assert track["url"] == event["url"]
            assert track["payload"]["url"] == event["url"]
        if event["event"] == "bounce":
            assert track["payload"]["status"] == "5.1.1"
            assert track["payload"]["bounce_type"] == "bounce"


def test_sendgrid_batch_and_its_retry_become_each_mapped_event_once(email: Email) -> None:
    order = ["open", "click", "delivered", "bounce", "unsubscribe", "processed"]
    types = [order[i % len(order)] for i in range(50)]
    events = sendgrid_events(types)

    first = email.relay.post("sendgrid", *sendgrid_post(email.private_key, events))
    assert first.json() == {"ok": True, "accepted": 50, "duplicates": 0}
    # SendGrid re-signs a retried batch with a new timestamp.
    retry = sendgrid_post(email.private_key, events, timestamp=int(time.time()) + 2)
    second = email.relay.post("sendgrid", *retry)
    assert second.json() == {"ok": True, "accepted": 0, "duplicates": 50}

    delivered = settled(email.sandbox, 42)
    names = Counter(t["name"] for t in delivered)
    assert names == {
        "email_open": 9,
        "email_click": 9,
        "email_delivered": 8,
        "email_bounce": 8,
        "email_unsubscribe": 8,
    }
    check_sendgrid_forwarded(delivered, events)
    rows = email.rows()
    assert rows["webhooks"] == 1  # the retry added nothing
    assert rows["dedupe"] == 50
    assert rows["outbox"] == 42


def test_sendgrid_batch_with_some_events_already_seen(email: Email) -> None:
    seen = sendgrid_events(["delivered", "open", "click", "open", "bounce"] * 2)
    r = email.relay.post("sendgrid", *sendgrid_post(email.private_key, seen))
    assert r.json() == {"ok": True, "accepted": 10, "duplicates": 0}

    new = sendgrid_events(["open", "click", "processed", "unsubscribe", "delivered", "open"])
    new += sendgrid_events(["open"])
    # A later batch repeats four of the earlier events among seven new ones.
    mixed = [new[0], seen[1], new[1], new[2], seen[4], new[3], seen[7], new[4], new[5], seen[9]]
    mixed.append(new[6])
    r = email.relay.post("sendgrid", *sendgrid_post(email.private_key, mixed))
    assert r.json() == {"ok": True, "accepted": 7, "duplicates": 4}

    delivered = settled(email.sandbox, 16)
    check_sendgrid_forwarded(delivered, seen + new)
    assert Counter(t["name"] for t in delivered) == {
        "email_open": 4 + 3,
        "email_click": 2 + 1,
        "email_delivered": 2 + 1,
        "email_bounce": 2,
        "email_unsubscribe": 1,
    }


def test_sendgrid_batch_near_768_kb_is_accepted_under_the_default_limit(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    public, private_path = sendgrid.generate_keypair(tmp_path)
    sources = f"""
[sources.sendgrid]
provider = "sendgrid"
public_key = "{public}"
mapping = "{MAPPINGS / "sendgrid.toml"}"
"""
    # The forwarder may send the resulting backlog as fast as the sandbox allows.
    relay = relay_factory(sandbox, sources=sources, track="requests_per_minute = 6000")
    assert relay.config.relay.max_body_bytes == 1_048_576
    key = sendgrid.load_private_key(private_path)
    # SendGrid sends a batch when it reaches 768 KB: mostly `processed` (not mapped) here.
    types = ["processed", "processed", "delivered", "processed", "open", "processed", "deferred"]
    events: list[dict[str, Any]] = []
    while len(json.dumps(events)) < 760_000:
        events += sendgrid_events(types)
    body, headers = sendgrid_post(key, events)
    assert 760_000 <= len(body) <= 768 * 1024

    r = relay.post("sendgrid", body, headers)
    assert r.json() == {"ok": True, "accepted": len(events), "duplicates": 0}
    mapped = [e for e in events if e["event"] in ("delivered", "open")]
    delivered = settled(sandbox, len(mapped))
    assert len(delivered) == len(mapped)
    assert Counter(t["name"] for t in delivered) == {
        "email_delivered": len(mapped) // 2,
        "email_open": len(mapped) // 2,
    }
    assert {t["payload"]["recipient_sha256"] for t in delivered} == {
        recipient_hash(e["email"]) for e in mapped
    }


# -- Mailgun -------------------------------------------------------------------------------


def mailgun_post(
    event_data: dict[str, Any], key: str = MAILGUN_KEY, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A JSON webhook as Mailgun posts it: the signature block beside the event."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    doc = {
        "signature": {"timestamp": ts, "token": token, "signature": mailgun.sign(key, ts, token)},
        "event-data": event_data,
    }
    return json.dumps(doc).encode(), {"content-type": "application/json"}


def mailgun_event(event_type: str, **variables: str) -> dict[str, Any]:
    event = mailgun.sample_event(event_type, time.time())
    event["user-variables"] = {"visitor_id": str(uuid.uuid4()), **variables}
    return event


def resigned_fields(key: str = MAILGUN_KEY, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    return {"timestamp": ts, "token": token, "signature": mailgun.sign(key, ts, token)}


def legacy_form(name: str, key: str = MAILGUN_KEY) -> bytes:
    """A legacy urlencoded example webhook, signed afresh (the example's signature is old)."""
    fields = dict(parse_qsl((EXAMPLES / name).read_text().strip(), keep_blank_values=True))
    fields.update(resigned_fields(key))
    return urlencode(fields).encode()


MULTIPART_TYPE = "multipart/form-data; boundary=----MailgunFormBoundary7MA4YWxkTrZu0gW"


def legacy_multipart(key: str = MAILGUN_KEY) -> bytes:
    """The multipart bounce example (with its attached message), signed afresh."""
    body = (EXAMPLES / "legacy-bounced.multipart").read_bytes()
    for field, value in resigned_fields(key).items():
        pattern = rb'(name="' + field.encode() + rb'"\r\n\r\n)[^\r]*(\r\n)'
        body, n = re.subn(pattern, rb"\g<1>" + value.encode() + rb"\g<2>", body)
        assert n == 1, field
    return body


def test_mailgun_click_and_delivered_carry_url_campaign_and_visitor(email: Email) -> None:
    clicked = mailgun_event("clicked", campaign_id="summer-sale")
    clicked["url"] = "https://example.com/summer?utm_source=newsletter&utm_campaign=summer-sale"
    clicked["recipient"] = "Bob.Stone@Example.com"
    delivered = mailgun_event("delivered", campaign_id="welcome-series")
    for event in (clicked, delivered):
        r = email.relay.post("mailgun", *mailgun_post(event))
        assert r.json() == {"ok": True, "accepted": 1, "duplicates": 0}

    tracked = {t["name"]: t for t in settled(email.sandbox, 2)}
    assert sorted(tracked) == ["email_click", "email_delivered"]
    click = tracked["email_click"]
    assert click["url"] == clicked["url"]
    assert click["payload"] == {
        "url": clicked["url"],
        "campaign_id": "summer-sale",
        "message_id": clicked["message"]["headers"]["message-id"],
        "recipient_sha256": recipient_hash("bob.stone@example.com"),
        "device": "desktop",
    }
    assert click["visitor_id"] == clicked["user-variables"]["visitor_id"]
    done = tracked["email_delivered"]
    assert done["visitor_id"] == delivered["user-variables"]["visitor_id"]
    assert done["payload"]["campaign_id"] == "welcome-series"
    assert done["url"] is None


def test_mailgun_legacy_urlencoded_and_multipart_webhooks(email: Email) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = email.relay.post("mailgun", legacy_form("legacy-clicked.form"), form)
    assert r.json() == {"ok": True, "accepted": 1, "duplicates": 0}
    r = email.relay.post("mailgun", legacy_multipart(), {"content-type": MULTIPART_TYPE})
    assert r.json() == {"ok": True, "accepted": 1, "duplicates": 0}

    tracked = {t["name"]: t for t in settled(email.sandbox, 2)}
    assert sorted(tracked) == ["email_bounce", "email_click"]
    visitor = "3f2a6c1e-9b4d-4e8a-a1f0-5c7d2b9e8f41"
    click = tracked["email_click"]
    assert click["visitor_id"] == visitor
    assert click["url"] == "https://example.com/pricing?utm_source=newsletter"
    assert click["payload"] == {
        "url": "https://example.com/pricing?utm_source=newsletter",
        "campaign_id": "newsletter",
        "message_id": "20240501120000.1a2b3c4d5e6f7a8b@mg.example.com",
        "recipient_sha256": recipient_hash("alice.smith@example.com"),
        "device": "mobile",
    }
    bounce = tracked["email_bounce"]
    assert bounce["visitor_id"] == visitor
    assert bounce["payload"] == {
        "campaign_id": "spring-2024",
        "message_id": "20240501120000.1a2b3c4d5e6f7a8b@mg.example.com",
        "recipient_sha256": recipient_hash("nobody@example.org"),
        "reason": "5.1.1 The email account that you tried to reach does not exist.",
        "code": "550",
    }
    # The attached message is not part of the event, but the webhook is kept as received.
    conn = sqlite3.connect(email.db)
    try:
        stored = [row[0] for row in conn.execute("SELECT content_type FROM webhooks ORDER BY id")]
    finally:
        conn.close()
    assert stored == ["application/x-www-form-urlencoded", "multipart/form-data"]


def test_mailgun_retries_are_duplicates(email: Email) -> None:
    opened = mailgun_event("opened")
    json_hook = mailgun_post(opened)
    form_hook = legacy_form("legacy-opened.form")
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert email.relay.post("mailgun", *json_hook).json()["accepted"] == 1
    assert email.relay.post("mailgun", form_hook, form).json()["accepted"] == 1
    # Mailgun retries with the very same body.
    assert email.relay.post("mailgun", *json_hook).json() == {
        "ok": True,
        "accepted": 0,
        "duplicates": 1,
    }
    assert email.relay.post("mailgun", form_hook, form).json() == {
        "ok": True,
        "accepted": 0,
        "duplicates": 1,
    }
    tracked = settled(email.sandbox, 2)
    assert sorted(t["name"] for t in tracked) == ["email_open", "email_open"]
    assert email.rows()["webhooks"] == 2


def test_mailgun_signature_lifted_onto_another_event_is_refused(email: Email) -> None:
    body, headers = mailgun_post(mailgun_event("delivered"))
    assert email.relay.post("mailgun", body, headers).json()["accepted"] == 1
    forged = json.loads(body)
    forged["event-data"] = mailgun_event("clicked")  # the block signs timestamp + token only
    refused(email.relay.post("mailgun", json.dumps(forged).encode(), headers))
    assert email.rows()["webhooks"] == 1
    assert [t["name"] for t in settled(email.sandbox, 1)] == ["email_delivered"]


def test_mailgun_token_ledger_survives_a_restart(email: Email) -> None:
    """The ledger is in the database: a restarted relay still knows which event a token
    vouched for."""
    body, headers = mailgun_post(mailgun_event("delivered"))
    assert email.relay.post("mailgun", body, headers).json()["accepted"] == 1
    email.relay.restart()
    forged = json.loads(body)
    forged["event-data"] = mailgun_event("clicked")
    refused(email.relay.post("mailgun", json.dumps(forged).encode(), headers))
    retry = email.relay.post("mailgun", body, headers)  # Mailgun's own retry, after the restart
    assert retry.json() == {"ok": True, "accepted": 0, "duplicates": 1}
    assert email.rows()["webhooks"] == 1
    assert [t["name"] for t in settled(email.sandbox, 1)] == ["email_delivered"]


def test_mailgun_signature_lifted_onto_another_source_with_the_same_key_is_refused(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sources = "".join(
        f"""
[sources.{name}]
provider = "mailgun"
secret = "{MAILGUN_KEY}"
mapping = "{MAPPINGS / "mailgun.toml"}"
"""
        for name in ("mailgun-eu", "mailgun-us")
    )
    relay = relay_factory(sandbox, sources=sources)
    body, headers = mailgun_post(mailgun_event("delivered"))
    assert relay.post("mailgun-eu", body, headers).json()["accepted"] == 1
    forged = json.loads(body)
    forged["event-data"] = mailgun_event("clicked")
    refused(relay.post("mailgun-us", json.dumps(forged).encode(), headers))
    assert relay.rows()["webhooks"] == 1


# -- Rejections ----------------------------------------------------------------------------


def sendgrid_case(email: Email, case: str) -> tuple[bytes, dict[str, str]]:
    events = sendgrid_events(["delivered", "open", "click"])
    if case == "wrong key":
        _, other = sendgrid.generate_keypair(email.tmp / "other")
        return sendgrid_post(sendgrid.load_private_key(other), events)
    if case == "stale timestamp":
        return sendgrid_post(email.private_key, events, timestamp=int(time.time()) - 3600)
    body, headers = sendgrid_post(email.private_key, events)
    if case == "missing header":
        del headers[sendgrid.SIGNATURE_HEADER]
    elif case == "flipped byte":
        at = body.index(b"Example.com")
        body = body[:at] + bytes([body[at] ^ 0x20]) + body[at + 1 :]  # E -> e
    return body, headers


def mailgun_case(case: str) -> tuple[bytes, dict[str, str]]:
    event = mailgun_event("delivered")
    if case == "wrong key":
        return mailgun_post(event, key="key-not-the-signing-key")
    if case == "stale timestamp":
        return mailgun_post(event, timestamp=int(time.time()) - 3600)
    body, headers = mailgun_post(event)
    doc = json.loads(body)
    if case == "missing header":  # Mailgun's signature travels in the body: drop the block
        del doc["signature"]
        return json.dumps(doc).encode(), headers
    # Mailgun signs timestamp + token only: flip a byte of the token inside the body.
    token = doc["signature"]["token"]
    flipped = token[:5] + ("a" if token[5] != "a" else "b") + token[6:]
    return body.replace(token.encode(), flipped.encode()), headers


CASES = ["flipped byte", "wrong key", "missing header", "stale timestamp"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", ["sendgrid", "mailgun"])
def test_bad_signatures_get_401_and_store_nothing(email: Email, provider: str, case: str) -> None:
    body, headers = sendgrid_case(email, case) if provider == "sendgrid" else mailgun_case(case)
    r = email.relay.post(provider, body, headers)
    refused(r)
    assert MAILGUN_KEY not in r.text
    assert email.rows() == dict.fromkeys(TABLES, 0)


def test_mailgun_legacy_form_with_the_wrong_key_is_refused(email: Email) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    refused(email.relay.post("mailgun", legacy_form("legacy-clicked.form", "key-wrong"), form))
    body = legacy_multipart("key-wrong")
    refused(email.relay.post("mailgun", body, {"content-type": MULTIPART_TYPE}))
    assert email.rows() == dict.fromkeys(TABLES, 0)
