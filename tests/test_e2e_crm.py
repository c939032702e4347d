"""CRM webhooks end to end: HubSpot, Standard Webhooks, generic HMAC (Shopify), Basic and token
sources (Pipedrive, Zoho), and `relay send-test` against the running relay.

The generic sources are the very TOML blocks of docs/providers-generic.md, so the docs cannot
drift from what works.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from standardwebhooks import Webhook

from relay.cli import main
from relay.providers import hubspot, sendgrid
from relay.providers.standard import sample_payload
from tests.conftest import (
    MAPPINGS,
    STRIPE_SECRET,
    TABLES,
    Relay,
    Sandbox,
    refused,
    settled,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "providers-generic.md"
HUBSPOT_SECRET = "7b0e1f52-3c9d-4a8e-b6f1-2d5c8e9a0b13"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"e2e standard webhooks signing key!").decode()
MAILGUN_KEY = "key-e2e-send-test-0123456789abcdef"
ENV = {
    "SHOPIFY_CLIENT_SECRET": "shpss_e2e_9c1f0a2b3d4e5f60718293a4b5c6d7e8",
    "PIPEDRIVE_WEBHOOK_USER": "relay-pipedrive",
    "PIPEDRIVE_WEBHOOK_PASSWORD": "tr0ub4dor&3 horse staple",
    "ZOHO_WEBHOOK_TOKEN": "zt_e2e_4f1c9a7b2d8e6f3a0b5c1d9e7f2a4b6c",
}
PUBLIC_URL = "https://relay.example.com/webhooks/hubspot"


def doc_blocks() -> list[str]:
    blocks: list[str] = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    return blocks


def doc_block(source: str) -> str:
    """The TOML block of the docs that defines [sources.<source>], as written there."""
    for block in doc_blocks():
        if f"[sources.{source}]" in block:
            return block
    raise AssertionError(f"docs/providers-generic.md has no [sources.{source}] block")


def doc_mapping() -> str:
    """The example mapping at the end of the docs (for the Shopify source)."""
    for block in doc_blocks():
        if "[[events]]" in block and 'provider = "hmac"' in block:
            return block
    raise AssertionError("docs/providers-generic.md has no example mapping")


PIPEDRIVE_MAPPING = """
provider = "hmac"

[[events]]
on = "deal.create"
name = "deal_created"
[events.payload]
deal_id = "{{ data.id }}"
amount = "{{ data.value }}"
currency = "{{ data.currency }}"
stage_id = "{{ data.stage_id }}"
"""

ZOHO_MAPPING = """
provider = "hmac"

[[events]]
on = "lead.created"
name = "lead_created"
[events.payload]
lead_id = "{{ lead_id }}"
company = "{{ company }}"
email_sha256 = "{{ email | sha256(normalize=true) }}"
"""


def crm_sources(tmp_path: Path, hubspot_public_url: str | None = None) -> str:
    """HubSpot and Standard sources, plus the docs' Shopify, Pipedrive and Zoho blocks."""
    mappings = tmp_path / "mappings"  # the docs' blocks name mappings/*.toml, beside the config
    mappings.mkdir(exist_ok=True)
    (mappings / "shopify.toml").write_text(doc_mapping())
    (mappings / "pipedrive.toml").write_text(PIPEDRIVE_MAPPING)
    (mappings / "zoho.toml").write_text(ZOHO_MAPPING)
    public = f'public_url = "{hubspot_public_url}"\n' if hubspot_public_url else ""
    return (
        f"""
[sources.hubspot]
provider = "hubspot"
secret = "{HUBSPOT_SECRET}"
mapping = "{MAPPINGS / "hubspot.toml"}"
{public}
[sources.standard]
provider = "standard"
secret = "{STANDARD_SECRET}"
mapping = "{MAPPINGS / "standard.toml"}"

"""
        + doc_block("shopify")
        + "\n"
        + doc_block("pipedrive")
        + "\n"
        + doc_block("zoho-leads")
    )


@dataclass
class Crm:
    relay: Relay
    sandbox: Sandbox

    @property
    def db(self) -> Path:
        return self.relay.db

    def rows(self) -> dict[str, int]:
        return self.relay.rows()

    def url(self, source: str) -> str:
        return f"{self.relay.url}/webhooks/{source}"


@pytest.fixture
def crm(
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Crm:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return Crm(relay_factory(sandbox, sources=crm_sources(tmp_path)), sandbox)


def ok(accepted: int, duplicates: int = 0) -> dict[str, Any]:
    return {"ok": True, "accepted": accepted, "duplicates": duplicates}


# -- HubSpot -------------------------------------------------------------------------------


def iso(ms: int) -> str:
    """occurredAt as the mapping's iso8601 filter writes it."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{ms % 1000:03d}Z" if ms % 1000 else f"{text}Z"


HUBSPOT_KINDS = [
    ("contact.creation", None),
    ("deal.creation", None),
    ("deal.propertyChange", "closedwon"),
    ("contact.deletion", None),
    ("deal.propertyChange", "contractsent"),  # a stage change that is not a win: not mapped
]
HUBSPOT_NAMES = {
    ("contact.creation", None): "lead_created",
    ("deal.creation", None): "deal_created",
    ("deal.propertyChange", "closedwon"): "deal_won",
    ("contact.deletion", None): "contact_deleted",
}


def hubspot_events(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """n realistic HubSpot events cycling through HUBSPOT_KINDS, each its own object."""
    now = time.time()
    events = []
    for i in range(n):
        kind, stage = HUBSPOT_KINDS[i % len(HUBSPOT_KINDS)]
        event = hubspot.sample_events(kind, now)[0]
        event["eventId"] = rng.randrange(1_000_000_000, 4_000_000_000)
        event["objectId"] = rng.randrange(10_000_000_000, 99_999_999_999)
        event["occurredAt"] = int(now * 1000) - rng.randrange(1, 60_000)
        if stage:
            event["propertyValue"] = stage
        events.append(event)
    return events


def hubspot_post(
    events: list[dict[str, Any]], url: str, secret: str = HUBSPOT_SECRET, ts_ms: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """An array as HubSpot posts it, signed v3 over method + the URL it called + body + time."""
    body = json.dumps(events).encode()
    ts = str(int(time.time() * 1000) if ts_ms is None else ts_ms)
    return body, {
        "content-type": "application/json",
        hubspot.TIMESTAMP_HEADER: ts,
        hubspot.V3_HEADER: hubspot.sign_v3(secret, "POST", url, body, ts),
    }


def check_hubspot_forwarded(delivered: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    expected = [
        e for e in events if (e["subscriptionType"], e.get("propertyValue")) in HUBSPOT_NAMES
    ]
    assert len(delivered) == len(expected)
    by_object = {t["payload"].get("contact_id") or t["payload"]["deal_id"]: t for t in delivered}
    assert len(by_object) == len(delivered), "an event was forwarded twice"
    for event in expected:
        track = by_object[str(event["objectId"])]
        assert (
            track["name"] == HUBSPOT_NAMES[(event["subscriptionType"], event.get("propertyValue"))]
        )
        assert track["payload"]["portal_id"] == "62515"
        assert track["payload"]["change_source"] == "CRM_UI"
        assert track["payload"]["occurred_at"] == iso(event["occurredAt"])
        if track["name"] == "deal_won":
            assert track["payload"]["stage"] == "closedwon"


def test_hubspot_batch_and_partial_retry_become_each_mapped_event_once(crm: Crm) -> None:
    rng = random.Random(20240501)
    first = hubspot_events(100, rng)
    r = crm.relay.post("hubspot", *hubspot_post(first, crm.url("hubspot")))
    assert r.json() == ok(100)

    # HubSpot retries re-send the same eventIds (attemptNumber goes up); new events ride along.
    retried = [{**e, "attemptNumber": 1} for e in first[37:57]]
    new = hubspot_events(30, rng)
    # eventId alone is not unique: the same id with another occurredAt is another event.
    new[0]["eventId"] = first[0]["eventId"]
    mixed = [e for pair in zip(retried, new, strict=False) for e in pair] + new[len(retried) :]
    assert len(mixed) == 50
    r = crm.relay.post("hubspot", *hubspot_post(mixed, crm.url("hubspot")))
    assert r.json() == ok(30, 20)

    delivered = settled(crm.sandbox, 80 + 24)
    assert Counter(t["name"] for t in delivered) == {
        "lead_created": 26,
        "deal_created": 26,
        "deal_won": 26,
        "contact_deleted": 26,
    }
    check_hubspot_forwarded(delivered, first + new)
    rows = crm.rows()
    assert rows["dedupe"] == 130
    assert rows["webhooks"] == 2


def test_hubspot_behind_a_proxy_checks_the_public_url(
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    relay = relay_factory(sandbox, sources=crm_sources(tmp_path, PUBLIC_URL))
    crm = Crm(relay, sandbox)
    local = crm.url("hubspot")
    assert local.startswith("http://127.0.0.1:")
    events = hubspot_events(3, random.Random(7))

    # Signed for the URL HubSpot called, received at the relay's own address: accepted.
    r = crm.relay.post("hubspot", *hubspot_post(events[:1], PUBLIC_URL))
    assert r.json() == ok(1)
    # The query string passes through the proxy: it is part of what HubSpot signed.
    body, headers = hubspot_post(events[1:2], PUBLIC_URL + "?portalId=62515")
    r = crm.relay.client.post(local + "?portalId=62515", content=body, headers=headers)
    assert r.json() == ok(1)
    # Signed for any other URL, the relay's own included: refused.
    for url in (local, "https://relay.example.com/webhooks/other", PUBLIC_URL + "/"):
        refused(crm.relay.post("hubspot", *hubspot_post(events[2:], url)))
    assert crm.rows()["webhooks"] == 2
    delivered = settled(sandbox, 2)
    assert sorted(t["name"] for t in delivered) == ["deal_created", "lead_created"]


# -- Standard Webhooks ---------------------------------------------------------------------


def standard_post(
    payload: dict[str, Any],
    msg_id: str | None = None,
    secret: str = STANDARD_SECRET,
    when: datetime | None = None,
    prefix: str = "webhook",
) -> tuple[bytes, dict[str, str]]:
    """Signed by the standardwebhooks package, as a sender signs."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    msg_id = msg_id or f"msg_{uuid.uuid4().hex[:27]}"
    when = when or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return body, {
        "content-type": "application/json",
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(int(when.timestamp())),
        f"{prefix}-signature": signature,
    }


def test_standard_webhooks_are_mapped_deduped_and_accept_svix_headers(crm: Crm) -> None:
    now = time.time()
    kinds = ["contact.created", "deal.created", "deal.won", "deal.lost", "invoice.paid"]
    payloads = {k: sample_payload(k, now) for k in [*kinds, "contact.updated"]}
    posts = {
        k: standard_post(p, prefix="svix" if k.startswith("deal.") else "webhook")
        for k, p in payloads.items()
    }
    for post in posts.values():
        assert crm.relay.post("standard", *post).json() == ok(1)

    # A retry keeps its webhook-id and is signed again with a new timestamp.
    contact = posts["contact.created"][1]["webhook-id"]
    retry = standard_post(payloads["contact.created"], msg_id=contact)
    assert crm.relay.post("standard", *retry).json() == ok(0, 1)
    deal = posts["deal.won"][1]["svix-id"]
    retry = standard_post(payloads["deal.won"], msg_id=deal, prefix="svix")
    assert crm.relay.post("standard", *retry).json() == ok(0, 1)

    tracked = {t["name"]: t for t in settled(crm.sandbox, 5)}
    assert len(crm.sandbox.events()) == 5  # contact.updated is not mapped
    lead, lead_data = tracked["lead_created"], payloads["contact.created"]["data"]
    assert lead["visitor_id"] == lead_data["visitor_id"]
    assert lead["url"] == "https://example.com/demo"
    assert lead["payload"] == {
        "contact_id": lead_data["id"],
        "source": "website_form",
        "company": "Rosen Analytics",
        "owner_id": "usr_2f9c1b7a",
    }
    won = payloads["deal.won"]["data"]
    assert tracked["deal_won"]["payload"] == {
        "deal_id": won["id"],
        "contact_id": won["contact_id"],
        "amount": "12000",
        "currency": "USD",
        "pipeline": "sales",
        "closed_at": won["closed_at"],
    }
    assert tracked["deal_created"]["payload"]["stage"] == "qualification"
    assert tracked["deal_lost"]["payload"]["reason"] == "budget"
    invoice = payloads["invoice.paid"]["data"]
    assert tracked["invoice_paid"]["payload"] == {
        "invoice_id": invoice["id"],
        "number": "INV-2024-0042",
        "amount": "1499.00",
        "currency": "USD",
        "contact_id": invoice["contact_id"],
    }


# -- Generic HMAC: Shopify -----------------------------------------------------------------


def shopify_order(order_id: int, total: str = "199.00") -> dict[str, Any]:
    return {
        "id": order_id,
        "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
        "name": "#1042",
        "email": "jenny.rosen@example.com",
        "created_at": "2024-05-01T12:00:00-04:00",
        "currency": "USD",
        "total_price": total,
        "subtotal_price": total,
        "financial_status": "paid",
        "line_items": [{"id": 866550311766439020, "title": "Annual plan", "quantity": 1}],
    }


def shopify_post(
    order: dict[str, Any], webhook_id: str, secret: str = ENV["SHOPIFY_CLIENT_SECRET"]
) -> tuple[bytes, dict[str, str]]:
    """Shopify's way: base64 HMAC-SHA256 of the raw body, id and topic in headers."""
    body = json.dumps(order).encode()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return body, {
        "content-type": "application/json",
        "X-Shopify-Hmac-SHA256": base64.b64encode(digest).decode(),
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Shop-Domain": "example.myshopify.com",
        "X-Shopify-API-Version": "2024-04",
    }


def test_shopify_order_through_the_documented_hmac_config(crm: Crm) -> None:
    hook = str(uuid.uuid4())
    r = crm.relay.post("shopify", *shopify_post(shopify_order(820982911946154508), hook))
    assert r.json() == ok(1)
    # Shopify's retry: the same signed body and id. The id header is not signed, so the body's
    # hash is the key: a retry is a duplicate under its id or under any other.
    retry = shopify_post(shopify_order(820982911946154508), hook)
    assert crm.relay.post("shopify", *retry).json() == ok(0, 1)
    replayed = shopify_post(shopify_order(820982911946154508), str(uuid.uuid4()))
    assert crm.relay.post("shopify", *replayed).json() == ok(0, 1)
    refused(crm.relay.post("shopify", *shopify_post(shopify_order(1), "x", secret="shpss_wrong")))

    (track,) = settled(crm.sandbox, 1)
    assert track["name"] == "purchase"
    assert track["payload"] == {
        "order_id": "820982911946154508",
        "amount": "199.00",
        "currency": "USD",
    }
    assert crm.rows()["webhooks"] == 1


# -- Rejections ----------------------------------------------------------------------------


def flip(body: bytes, needle: bytes) -> bytes:
    at = body.index(needle)
    return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]


def bad_post(crm: Crm, provider: str, case: str) -> tuple[bytes, dict[str, str]]:
    if provider == "hubspot":
        events, url = hubspot_events(2, random.Random(3)), crm.url("hubspot")
        if case == "wrong key":
            return hubspot_post(events, url, secret="not-the-client-secret")
        if case == "stale timestamp":
            return hubspot_post(events, url, ts_ms=int((time.time() - 600) * 1000))
        body, headers = hubspot_post(events, url)
        header = hubspot.V3_HEADER
    elif provider == "standard":
        payload = sample_payload("contact.created", time.time())
        if case == "wrong key":
            other = "whsec_" + base64.b64encode(b"another sender's key").decode()
            return standard_post(payload, secret=other)
        if case == "stale timestamp":
            return standard_post(payload, when=datetime.now(UTC) - timedelta(minutes=10))
        body, headers = standard_post(payload)
        header = "webhook-signature"
    else:
        order = shopify_order(450789469)
        if case == "wrong key":
            return shopify_post(order, str(uuid.uuid4()), secret="shpss_not_the_secret")
        body, headers = shopify_post(order, str(uuid.uuid4()))
        header = "X-Shopify-Hmac-SHA256"
    if case == "missing header":
        del headers[header]
    else:
        assert case == "flipped byte"
        body = flip(body, b"62515" if provider == "hubspot" else b"example.com")
    return body, headers


REJECTIONS = [
    (provider, case)
    for provider in ("hubspot", "standard", "shopify")
    for case in ("flipped byte", "wrong key", "missing header", "stale timestamp")
    if not (provider == "shopify" and case == "stale timestamp")  # Shopify signs no time
]


@pytest.mark.parametrize(("provider", "case"), REJECTIONS)
def test_bad_signatures_get_401_and_store_nothing(crm: Crm, provider: str, case: str) -> None:
    r = crm.relay.post(provider, *bad_post(crm, provider, case))
    refused(r)
    assert HUBSPOT_SECRET not in r.text and ENV["SHOPIFY_CLIENT_SECRET"] not in r.text
    assert crm.rows() == dict.fromkeys(TABLES, 0)


# -- Senders that sign nothing: HTTP Basic (Pipedrive) and a shared token (Zoho) -------------


def pipedrive_deal(deal_id: int) -> bytes:
    """A Pipedrive webhooks v2 body: `meta` says what happened, `data` is the object."""
    return json.dumps(
        {
            "meta": {
                "action": "create",
                "entity": "deal",
                "entity_id": str(deal_id),
                "id": str(uuid.uuid4()),
                "timestamp": "2024-05-01T12:00:00.000Z",
                "version": "2.0",
                "company_id": "11223344",
                "user_id": "998877",
                "webhook_id": "4512",
                "correlation_id": str(uuid.uuid4()),
                "type": "general",
            },
            "data": {
                "id": deal_id,
                "title": "Rosen Analytics deal",
                "value": 5000,
                "currency": "EUR",
                "stage_id": 3,
                "status": "open",
            },
            "previous": None,
        }
    ).encode()


def stored_headers(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("SELECT headers FROM webhooks ORDER BY id")]
    finally:
        conn.close()


def database_bytes(db: Path) -> bytes:
    """The database with its WAL: everything the relay wrote, committed or not."""
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def test_pipedrive_basic_auth_and_zoho_token_keep_credentials_out_of_the_store(
    crm: Crm,
) -> None:
    user, password = ENV["PIPEDRIVE_WEBHOOK_USER"], ENV["PIPEDRIVE_WEBHOOK_PASSWORD"]
    token = ENV["ZOHO_WEBHOOK_TOKEN"]
    client, json_type = crm.relay.client, {"content-type": "application/json"}

    def credentials(name: str, secret: str) -> str:
        return base64.b64encode(f"{name}:{secret}".encode()).decode()

    basic = credentials(user, password)

    def pipedrive(auth: tuple[str, str] | None, deal_id: int) -> httpx.Response:
        headers = dict(json_type)
        if auth is not None:  # what Pipedrive's "HTTP Auth" sends
            headers["authorization"] = f"Basic {credentials(*auth)}"
        return client.post(crm.url("pipedrive"), content=pipedrive_deal(deal_id), headers=headers)

    def zoho(headers: dict[str, str], lead_id: str) -> httpx.Response:
        body = json.dumps(
            {
                "lead_id": lead_id,
                "email": "Jenny.Rosen@Example.com",
                "company": "Rosen Analytics",
            }
        ).encode()
        return client.post(crm.url("zoho-leads"), content=body, headers={**json_type, **headers})

    for auth in (None, (user, "wrong"), ("wrong", password), (user, password + "x")):
        refused(pipedrive(auth, 1))
    wrong_scheme = {"authorization": f"Bearer {password}"}
    refused(client.post(crm.url("pipedrive"), content=pipedrive_deal(1), headers=wrong_scheme))
    for headers in ({}, {"X-Relay-Token": token[:-1]}, {"X-Relay-Token": ""}, {"token": token}):
        refused(zoho(headers, "4876876000000624001"))
    assert crm.rows() == dict.fromkeys(TABLES, 0)

    assert pipedrive((user, password), 101).json() == ok(1)
    assert zoho({"X-Relay-Token": token}, "4876876000000624001").json() == ok(1)
    assert zoho({"X-Relay-Token": f"Bearer {token}"}, "4876876000000624002").json() == ok(1)
    # Zoho fires again for the same lead: its id is the dedupe key.
    assert zoho({"X-Relay-Token": token}, "4876876000000624001").json() == ok(0, 1)

    tracked = settled(crm.sandbox, 3)
    assert Counter(t["name"] for t in tracked) == {"deal_created": 1, "lead_created": 2}
    deal = next(t for t in tracked if t["name"] == "deal_created")
    assert deal["payload"] == {
        "deal_id": "101",
        "amount": "5000",
        "currency": "EUR",
        "stage_id": "3",
    }
    leads = {t["payload"]["lead_id"]: t["payload"] for t in tracked if t["name"] == "lead_created"}
    assert sorted(leads) == ["4876876000000624001", "4876876000000624002"]
    assert leads["4876876000000624001"] == {
        "lead_id": "4876876000000624001",
        "company": "Rosen Analytics",
        "email_sha256": hashlib.sha256(b"jenny.rosen@example.com").hexdigest(),
    }

    kept = stored_headers(crm.db)
    assert len(kept) == 3
    for text in kept:
        stored = json.loads(text)
        assert "authorization" not in stored and "x-relay-token" not in stored
        assert stored["content-type"] == "application/json"
        for secret in (password, basic, token):
            assert secret not in text
    everything = database_bytes(crm.db)
    for secret in (password, basic, token):
        assert secret.encode() not in everything


# -- relay send-test -----------------------------------------------------------------------


SEND_TEST = [
    ("stripe", None, {"purchase": 1}),
    ("stripe", "invoice.paid", {"invoice_paid": 1}),
    ("mailgun", None, {"email_delivered": 1}),
    ("mailgun", "clicked", {"email_click": 1}),
    ("sendgrid", None, {"email_delivered": 1, "email_open": 1}),  # processed maps to nothing
    ("hubspot", None, {"lead_created": 1}),
    ("hubspot", "deal.propertyChange", {"deal_won": 1}),
    ("standard", None, {"lead_created": 1}),
    ("standard", "invoice.paid", {"invoice_paid": 1}),
]


def test_send_test_reaches_the_running_relay(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    public, private_path = sendgrid.generate_keypair(tmp_path / "keys")
    sources = f"""
[sources.stripe]
provider = "stripe"
secret = "{STRIPE_SECRET}"
mapping = "{MAPPINGS / "stripe.toml"}"

[sources.mailgun]
provider = "mailgun"
secret = "{MAILGUN_KEY}"
mapping = "{MAPPINGS / "mailgun.toml"}"

[sources.sendgrid]
provider = "sendgrid"
public_key = "{public}"
private_key_file = "{private_path}"
mapping = "{MAPPINGS / "sendgrid.toml"}"

[sources.hubspot]
provider = "hubspot"
secret = "{HUBSPOT_SECRET}"
mapping = "{MAPPINGS / "hubspot.toml"}"

[sources.standard]
provider = "standard"
secret = "{STANDARD_SECRET}"
mapping = "{MAPPINGS / "standard.toml"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    runner = CliRunner()
    seen: set[int] = set()
    for source, event_type, names in SEND_TEST:
        args = ["send-test", source, *([event_type] if event_type else [])]
        args += ["--config", str(relay.config_path), "--url", f"{relay.url}/webhooks/{source}"]
        result = runner.invoke(main, args)
        case = f"send-test {source} {event_type or ''}: {result.output}"
        assert result.exit_code == 0, case
        assert result.output.splitlines()[-1].startswith("200 "), case
        for secret in (STRIPE_SECRET, MAILGUN_KEY, HUBSPOT_SECRET, STANDARD_SECRET):
            assert secret not in result.output
        arrived = sandbox.wait_for(len(seen) + sum(names.values()), timeout=10)
        fresh = [t for t in arrived if t["id"] not in seen]
        assert Counter(t["name"] for t in fresh) == names, case
        seen.update(t["id"] for t in fresh)
    time.sleep(0.6)  # and nothing more comes
    assert len(sandbox.events()) == len(seen) == sum(sum(n.values()) for _, _, n in SEND_TEST)
