"""Hostile input against every provider's endpoint: never a 5xx, never a stored row, still up.

Property-based (hypothesis): random bodies, headers and content types; huge and truncated
bodies; and bodies that are garbage but carry a valid signature, made the way each sender
signs. The relay runs for real under uvicorn with one source per provider.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import sandbox as sandbox_mod
from relay.app import create_app
from relay.config import load_config
from relay.providers import hubspot, mailgun, sendgrid, standard
from tests.conftest import API_KEY, MAPPINGS, stripe_event, wait_mapped
from tests.servers import ThreadedServer

STRIPE = "whsec_hostile"
MAILGUN = "key-hostile-0123456789"
HUBSPOT = "hubspot-client-secret"
STANDARD = "whsec_" + base64.b64encode(b"hostile-standard-secret-bytes").decode()
HMAC = "shopify-secret"
TOKEN = "shared-token-0123456789"
PROVIDERS = ["stripe", "mailgun", "sendgrid", "hubspot", "standard", "hmac"]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Env:
    def __init__(self, url: str, db: Path, sendgrid_key: Path):
        self.url = url
        self.db = db
        self.client = httpx.Client(timeout=10)
        self.private_key = sendgrid.load_private_key(sendgrid_key)

    def rows(self) -> int:
        wait_mapped(self.db)
        conn = sqlite3.connect(self.db)
        try:
            return sum(
                conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("webhooks", "unmapped", "outbox", "dedupe")
            )
        finally:
            conn.close()

    def post(self, source: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.client.post(f"{self.url}/webhooks/{source}", content=body, headers=headers)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("hostile")
    public, private = sendgrid.generate_keypair(tmp)
    sb = ThreadedServer(sandbox_mod.create_app([API_KEY], [1], 6000, tmp / "sandbox.db")).start()
    db = tmp / "relay.db"
    (tmp / "relay.toml").write_text(f"""
[relay]
database = "{db}"
max_body_bytes = 65536

[track]
base_url = "{sb.url}/api/v1"
api_key = "{API_KEY}"
website_id = 1

[sources.stripe]
provider = "stripe"
secret = "{STRIPE}"
mapping = "{MAPPINGS / "stripe.toml"}"

[sources.mailgun]
provider = "mailgun"
secret = "{MAILGUN}"
mapping = "{MAPPINGS / "mailgun.toml"}"

[sources.sendgrid]
provider = "sendgrid"
public_key = "{public}"
mapping = "{MAPPINGS / "sendgrid.toml"}"

[sources.hubspot]
provider = "hubspot"
secret = "{HUBSPOT}"
mapping = "{MAPPINGS / "hubspot.toml"}"

[sources.standard]
provider = "standard"
secret = "{STANDARD}"
mapping = "{MAPPINGS / "standard.toml"}"

[sources.hmac]
provider = "hmac"
secret = "{HMAC}"
signature_header = "X-Shopify-Hmac-SHA256"
encoding = "base64"
id_header = "X-Shopify-Webhook-Id"
type_header = "X-Shopify-Topic"
mapping = "{MAPPINGS / "standard.toml"}"

[sources.token]
provider = "hmac"
verify = "token"
token = "{TOKEN}"
token_field = "token"
mapping = "{MAPPINGS / "standard.toml"}"
""")
    relay = ThreadedServer(create_app(load_config(tmp / "relay.toml"))).start()
    yield Env(relay.url, db, private)
    relay.stop()
    sb.stop()


def signed(env: Env, provider: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    """`body` with a valid signature, the way each sender signs."""
    now = int(time.time())
    ct = {"content-type": "application/json"}
    if provider == "stripe":
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode("utf-8", "replace"), STRIPE, timestamp=now
        )
        return body.decode("utf-8", "replace").encode(), {**ct, "stripe-signature": header}
    if provider == "mailgun":
        # Mailgun signs timestamp + token, inside the body: garbage goes in event-data.
        token = uuid.uuid4().hex
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = body.decode("utf-8", "replace")
        doc = {
            "signature": {
                "timestamp": str(now),
                "token": token,
                "signature": mailgun.sign(MAILGUN, str(now), token),
            },
            "event-data": data,
        }
        return json.dumps(doc).encode(), ct
    if provider == "sendgrid":
        return body, {
            **ct,
            "x-twilio-email-event-webhook-timestamp": str(now),
            "x-twilio-email-event-webhook-signature": sendgrid.sign(
                env.private_key, str(now), body
            ),
        }
    if provider == "hubspot":
        ts = str(now * 1000)
        url = f"{env.url}/webhooks/hubspot"
        return body, {
            **ct,
            "x-hubspot-request-timestamp": ts,
            "x-hubspot-signature-v3": hubspot.sign_v3(HUBSPOT, "POST", url, body, ts),
        }
    if provider == "standard":
        text = body.decode("utf-8", "replace").encode()
        msg = "msg_" + uuid.uuid4().hex
        return text, {
            **ct,
            "webhook-id": msg,
            "webhook-timestamp": str(now),
            "webhook-signature": standard.sign(STANDARD, msg, now, text),
        }
    digest = base64.b64encode(hmac.new(HMAC.encode(), body, hashlib.sha256).digest()).decode()
    return body, {
        **ct,
        "x-shopify-hmac-sha256": digest,
        "x-shopify-webhook-id": uuid.uuid4().hex,
        "x-shopify-topic": "orders/create",
    }


def check(env: Env, response: httpx.Response, before: int, allowed: set[int]) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code in allowed, (response.status_code, response.text)
    body = response.json()
    assert body["ok"] is (response.status_code == 200)
    if response.status_code != 200:
        assert isinstance(body["error"], str)
        assert env.rows() == before, "a refused request stored something"


header_names = st.sampled_from(
    [
        "content-type",
        "stripe-signature",
        "x-twilio-email-event-webhook-signature",
        "x-twilio-email-event-webhook-timestamp",
        "x-hubspot-signature-v3",
        "x-hubspot-request-timestamp",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-signature",
        "x-shopify-hmac-sha256",
        "authorization",
        "x-random",
    ]
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120).map(
    str.strip
)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/octet-stream",
        "application/json; charset=latin-1",
        "",
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.mark.parametrize("provider", PROVIDERS)
@SETTINGS
@given(
    body=st.binary(max_size=2048),
    headers=st.dictionaries(header_names, header_values, max_size=6),
    content_type=content_types,
)
def test_random_bodies_and_headers_are_refused(
    env: Env, provider: str, body: bytes, headers: dict[str, str], content_type: str
) -> None:
    before = env.rows()
    r = env.post(provider, body, {**headers, "content-type": content_type})
    check(env, r, before, {400, 401})


@pytest.mark.parametrize("provider", PROVIDERS)
@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=1024).map(lambda b: b), json_values.map(lambda v: json.dumps(v).encode())
    )
)
def test_valid_signatures_over_garbage(env: Env, provider: str, data: bytes) -> None:
    before = env.rows()
    body, headers = signed(env, provider, data)
    r = env.post(provider, body, headers)
    # A correctly signed body is either a well-formed event (200) or refused as a body (400).
    check(env, r, before, {200, 400})


@pytest.mark.parametrize("provider", PROVIDERS)
@SETTINGS
@given(cut=st.integers(min_value=1, max_value=200), content_type=content_types)
def test_truncated_and_retyped_valid_webhooks(
    env: Env, provider: str, cut: int, content_type: str
) -> None:
    body, headers = signed(env, provider, json.dumps([{"id": "x" * 50, "type": "t"}]).encode())
    before = env.rows()
    r = env.post(provider, body[:-cut], headers)  # the signature no longer matches
    check(env, r, before, {400, 401})
    r = env.post(provider, body, {**headers, "content-type": content_type})
    assert r.status_code < 500


@pytest.mark.parametrize("provider", PROVIDERS)
def test_huge_bodies_get_413_without_being_read_whole(env: Env, provider: str) -> None:
    before = env.rows()
    r = env.post(provider, b"{" + b" " * 200_000 + b"}", {"content-type": "application/json"})
    check(env, r, before, {413})

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while streaming
        for _ in range(100):
            yield b"x" * 4096

    r = env.client.post(f"{env.url}/webhooks/{provider}", content=chunks())
    check(env, r, before, {413})


def test_still_up_and_ready_after_all_that(env: Env) -> None:
    assert env.client.get(f"{env.url}/healthz").status_code == 200
    assert env.client.get(f"{env.url}/readyz").json()["ok"] is True


def test_methods_and_paths_answer_json(env: Env) -> None:
    r = env.client.get(f"{env.url}/webhooks/stripe")
    assert r.status_code == 405 and r.json()["ok"] is False
    r = env.client.post(f"{env.url}/nowhere")
    assert r.status_code == 404 and r.json()["ok"] is False


def test_a_huge_unknown_source_name_is_not_repeated_whole(env: Env) -> None:
    r = env.client.post(f"{env.url}/webhooks/{'a' * 8000}", content=b"{}")
    assert r.status_code == 404 and r.json()["error"] == "unknown_source"
    message = r.json()["message"]
    assert message.startswith("no source named 'aaaa") and len(message) < 150, len(message)


def _with_lone_surrogate(where: str) -> bytes:
    """A paid Checkout Session whose JSON text holds the escape \\ud800 (a lone surrogate)."""
    event: dict[str, Any] = stripe_event()
    obj = event["data"]["object"]
    marker = "LONE"
    if where == "id":
        event["id"] = f"evt_{marker}"
    elif where == "type":
        event["type"] = f"checkout.session.completed{marker}"
    elif where == "mapped":
        obj["metadata"]["plan"] = f"pro{marker}"
    elif where == "unmapped":
        obj["customer_details"]["name"] = f"Jenny {marker}"
    elif where == "key":
        obj["metadata"][f"note{marker}"] = "x"
    elif where == "array":
        event["tags"] = [1, {"deep": [f"a{marker}"]}]
    text = json.dumps(event)
    assert text.count(marker) == 1
    return text.replace(marker, "\\ud800").encode()


@pytest.mark.parametrize("where", ["id", "type", "mapped", "unmapped", "key", "array"])
def test_a_lone_surrogate_anywhere_in_a_signed_body_is_refused_every_time(
    env: Env, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    body, headers = signed(env, "stripe", _with_lone_surrogate(where))
    before = env.rows()
    with caplog.at_level("INFO"):
        for _ in range(2):  # the sender's retry gets the same answer, not a 503
            r = env.post("stripe", body, headers)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "invalid_body"
            assert "surrogate" in r.json()["message"]
    assert env.rows() == before
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= 40]


@pytest.mark.parametrize("provider", ["mailgun", "sendgrid", "hubspot", "standard", "hmac"])
def test_every_json_provider_refuses_lone_surrogates(env: Env, provider: str) -> None:
    event = {
        "id": "e\\ud800",
        "eventId": 1,
        "sg_event_id": "x",
        "event": "delivered",
        "type": "t",
        "subscriptionType": "contact.creation",
        "objectId": 1,
        "occurredAt": 1,
        "note": "\\udfff\\ud800",
    }
    text = json.dumps([event] if provider in ("sendgrid", "hubspot") else event)
    text = text.replace("\\\\u", "\\u")  # the escapes as a sender writes them
    body, headers = signed(env, provider, text.encode())
    before = env.rows()
    r = env.post(provider, body, headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_body" and "surrogate" in r.json()["message"]
    assert env.rows() == before


@pytest.mark.parametrize(
    ("token", "status"), [("\\ud800", 401), (f"{TOKEN}\\udfff", 401), (TOKEN, 400)]
)
def test_a_lone_surrogate_near_a_body_token_is_refused(env: Env, token: str, status: int) -> None:
    body = b'{"token": "TOKEN", "id": "e1", "note": "\\ud800"}'.replace(b"TOKEN", token.encode())
    before = env.rows()
    r = env.post("token", body, {"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert env.rows() == before
