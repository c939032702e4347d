"""The generic HMAC provider, proven on real senders' schemes with configs taken from the docs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigTable, parse_config
from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers import build_source_parts
from relay.providers.base import Provider, Verifier, WebhookRequest
from relay.providers.hmac import HmacProvider, called_url
from relay.providers.shared import BasicAuth, SharedToken
from tests.conftest import Relay, Sandbox, settled

DOCS = Path(__file__).resolve().parent.parent / "docs" / "providers-generic.md"
NOW = 1_700_000_000.0
URL = "https://relay.example.com/webhooks/x"

ENV = {
    "SHOPIFY_CLIENT_SECRET": "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",
    "INTERCOM_CLIENT_SECRET": "3c1e5a7b-9d2f-4e6a-8b0c-1d3f5a7b9c2e",
    "TYPEFORM_WEBHOOK_SECRET": "tf-signing-secret-7Hq2",
    "CALENDLY_WEBHOOK_SIGNING_KEY": "cal_sk_4Zr9W2nQ8pLk",
    "CLOSE_WEBHOOK_SIGNATURE_KEY": "5a1f0c9e3b7d2a6f8c4e0b9d1a3f5c7e9b2d4f6a8c0e1b3d",
    "PIPEDRIVE_WEBHOOK_USER": "pipedrive",
    "PIPEDRIVE_WEBHOOK_PASSWORD": "correct horse battery staple",
    "ZOHO_WEBHOOK_TOKEN": "zt_0b8e4f2a9c7d1e3f5a6b",
}


def doc_sources() -> dict[str, dict[str, Any]]:
    """Every [sources.NAME] table of the docs' TOML blocks."""
    sources: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S):
        sources.update(tomllib.loads(block).get("sources", {}))
    return sources


def build(name: str, env: dict[str, str] = ENV) -> tuple[Provider, Verifier | None]:
    table = doc_sources()[name]
    config = ConfigTable(table, DOCS, f"sources.{name}", env=env)
    return build_source_parts(table["provider"], config)


def provider(name: str) -> HmacProvider:
    p, verifier = build(name)
    assert isinstance(p, HmacProvider) and verifier is p
    return p


def req(
    body: bytes, headers: dict[str, str], *, at: float = NOW, url: str = URL, method: str = "POST"
) -> WebhookRequest:
    return WebhookRequest(method, url, {k.lower(): v for k, v in headers.items()}, body, at)


def mac(key: bytes | str, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key.encode() if isinstance(key, str) else key, message, algorithm).digest()


# -- each sender, signed here the way that sender signs --------------------------------------

SHOPIFY_BODY = json.dumps(
    {
        "id": 820982911946154508,
        "email": "jon@example.com",
        "total_price": "199.00",
        "currency": "USD",
        "financial_status": "paid",
        "order_number": 1234,
    }
).encode()
INTERCOM_BODY = json.dumps(
    {
        "type": "notification_event",
        "app_id": "a86dr8yl",
        "id": "notif_ccd8a4d2-3d2d-4c5a",
        "topic": "contact.lead.created",
        "delivery_attempts": 1,
        "created_at": 1699999990,
        "data": {
            "type": "notification_event_data",
            "item": {
                "type": "contact",
                "role": "lead",
                "id": "6553a0e1c5b1",
                "email": "jenny@example.com",
            },
        },
    }
).encode()
TYPEFORM_BODY = json.dumps(
    {
        "event_id": "01HF6Y3Z4M8Q2W7E5R1T9Y6U3I",
        "event_type": "form_response",
        "form_response": {
            "form_id": "lT4Z3j",
            "token": "a3a12ec67a1365927098a606107fac15",
            "submitted_at": "2023-11-14T22:13:20Z",
            "hidden": {"visitor_id": "550e8400-e29b-41d4-a716-446655440000"},
        },
    }
).encode()
CALENDLY_BODY = json.dumps(
    {
        "created_at": "2023-11-14T22:13:20.000000Z",
        "created_by": "https://api.calendly.com/users/AAAAAAAAAAAAAAAA",
        "event": "invitee.created",
        "payload": {
            "email": "jenny@example.com",
            "name": "Jenny Rosen",
            "uri": "https://api.calendly.com/scheduled_events/GBGBDCAADAEDCRZ2/invitees/AAA",
        },
    }
).encode()
CLOSE_BODY = json.dumps(
    {
        "subscription_id": "whsub_2nMFkmWfGJkOH6XIFnFUQd",
        "event": {
            "id": "ev_4Qm2dSv1Nt3Rb0PYlUqGrt",
            "object_type": "lead",
            "action": "created",
            "object_id": "lead_QyNaWw4fdSwxl5Mc5daMFf",
            "date_created": "2023-11-14T22:13:20Z",
            "data": {"display_name": "Rosen Analytics"},
        },
    }
).encode()


def shopify(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {
        "X-Shopify-Hmac-SHA256": base64.b64encode(mac(secret, body)).decode(),
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Shop-Domain": "example.myshopify.com",
    }


def intercom(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"X-Hub-Signature": "sha1=" + mac(secret, body, "sha1").hex()}


def typeform(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"Typeform-Signature": "sha256=" + base64.b64encode(mac(secret, body)).decode()}


def calendly(body: bytes, secret: str, ts: int) -> dict[str, str]:
    signature = mac(secret, f"{ts}.".encode() + body).hex()
    return {"Calendly-Webhook-Signature": f"t={ts},v1={signature}"}


def close(body: bytes, secret: str, ts: int) -> dict[str, str]:
    signature = mac(bytes.fromhex(secret), str(ts).encode() + body).hex()
    return {"close-sig-hash": signature, "close-sig-timestamp": str(ts)}


Signer = Callable[[bytes, str, int], dict[str, str]]
SENDERS: list[tuple[str, str, bytes, Signer, str, str]] = [
    # source, secret variable, body, signer, expected dedupe key, expected type
    (
        "shopify",
        "SHOPIFY_CLIENT_SECRET",
        SHOPIFY_BODY,
        shopify,
        hashlib.sha256(SHOPIFY_BODY).hexdigest(),  # the id header is not signed
        "orders/create",
    ),
    (
        "intercom",
        "INTERCOM_CLIENT_SECRET",
        INTERCOM_BODY,
        intercom,
        "notif_ccd8a4d2-3d2d-4c5a",
        "contact.lead.created",
    ),
    (
        "typeform",
        "TYPEFORM_WEBHOOK_SECRET",
        TYPEFORM_BODY,
        typeform,
        "01HF6Y3Z4M8Q2W7E5R1T9Y6U3I",
        "form_response",
    ),
    (
        "calendly",
        "CALENDLY_WEBHOOK_SIGNING_KEY",
        CALENDLY_BODY,
        calendly,
        hashlib.sha256(CALENDLY_BODY).hexdigest(),
        "invitee.created",
    ),
    (
        "close",
        "CLOSE_WEBHOOK_SIGNATURE_KEY",
        CLOSE_BODY,
        close,
        "ev_4Qm2dSv1Nt3Rb0PYlUqGrt",
        "lead.created",
    ),
]
IDS = [s[0] for s in SENDERS]


@pytest.mark.parametrize(("name", "var", "body", "signer", "key", "kind"), SENDERS, ids=IDS)
def test_sender_request_verifies_and_parses(
    name: str, var: str, body: bytes, signer: Signer, key: str, kind: str
) -> None:
    p = provider(name)
    request = req(body, signer(body, ENV[var], int(NOW) - 2))
    p.verify(request)
    [event] = p.parse(request)
    assert (event.key, event.type) == (key, kind)
    assert event.data == json.loads(body)


@pytest.mark.parametrize(("name", "var", "body", "signer", "key", "kind"), SENDERS, ids=IDS)
def test_sender_wrong_secret_is_refused(
    name: str, var: str, body: bytes, signer: Signer, key: str, kind: str
) -> None:
    other = "0" * 64 if name == "close" else "not-the-secret"
    with pytest.raises(InvalidSignature, match="no signature matches"):
        provider(name).verify(req(body, signer(body, other, int(NOW))))


@pytest.mark.parametrize(("name", "var", "body", "signer", "key", "kind"), SENDERS, ids=IDS)
def test_sender_flipped_byte_is_refused(
    name: str, var: str, body: bytes, signer: Signer, key: str, kind: str
) -> None:
    headers = signer(body, ENV[var], int(NOW))
    tampered = body.replace(b'"', b"'", 1)
    with pytest.raises(InvalidSignature):
        provider(name).verify(req(tampered, headers))


@pytest.mark.parametrize(("name", "var", "body", "signer", "key", "kind"), SENDERS, ids=IDS)
def test_sender_missing_signature_is_refused(
    name: str, var: str, body: bytes, signer: Signer, key: str, kind: str
) -> None:
    p = provider(name)
    headers = signer(body, ENV[var], int(NOW))
    assert p.signature_header is not None
    del headers[next(h for h in headers if h.lower() == p.signature_header)]
    with pytest.raises(InvalidSignature, match="missing"):
        p.verify(req(body, headers))


@pytest.mark.parametrize("name", IDS)
def test_sample_verifies_with_the_same_config(name: str) -> None:
    p = provider(name)
    sample = p.sample(None, URL, NOW)
    request = req(sample.body, sample.headers, at=NOW + 1)
    p.verify(request)
    [event] = p.parse(request)
    assert event.key and event.type


def test_samples_carry_the_requested_type() -> None:
    for name, kind in [
        ("shopify", "customers/create"),
        ("intercom", "conversation.user.created"),
        ("close", "opportunity.updated"),
        ("calendly", "invitee.canceled"),
    ]:
        p = provider(name)
        sample = p.sample(kind, URL, NOW)
        request = req(sample.body, sample.headers)
        p.verify(request)
        assert p.parse(request)[0].type == kind


# -- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["calendly", "close"])
@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_timestamp_outside_tolerance_is_refused(name: str, offset: int) -> None:
    var, body, signer = next((s[1], s[2], s[3]) for s in SENDERS if s[0] == name)
    headers = signer(body, ENV[var], int(NOW) + offset)
    with pytest.raises(InvalidSignature, match="tolerance"):
        provider(name).verify(req(body, headers))


def test_calendly_header_without_timestamp_is_refused() -> None:
    signature = mac(ENV["CALENDLY_WEBHOOK_SIGNING_KEY"], CALENDLY_BODY).hex()
    with pytest.raises(InvalidSignature, match="missing timestamp"):
        provider("calendly").verify(
            req(CALENDLY_BODY, {"Calendly-Webhook-Signature": f"v1={signature}"})
        )


@pytest.mark.parametrize("header", ["garbage", "t=1700000000", "t=1700000000,v2=abcd", ""])
def test_calendly_malformed_header_is_refused(header: str) -> None:
    with pytest.raises(InvalidSignature):
        provider("calendly").verify(req(CALENDLY_BODY, {"Calendly-Webhook-Signature": header}))


def test_calendly_signature_over_body_alone_is_refused() -> None:
    signature = mac(ENV["CALENDLY_WEBHOOK_SIGNING_KEY"], CALENDLY_BODY).hex()
    header = f"t={int(NOW)},v1={signature}"
    with pytest.raises(InvalidSignature, match="no signature matches"):
        provider("calendly").verify(req(CALENDLY_BODY, {"Calendly-Webhook-Signature": header}))


def test_close_timestamp_is_part_of_the_signature() -> None:
    headers = close(CLOSE_BODY, ENV["CLOSE_WEBHOOK_SIGNATURE_KEY"], int(NOW))
    headers["close-sig-timestamp"] = str(int(NOW) + 1)
    with pytest.raises(InvalidSignature, match="no signature matches"):
        provider("close").verify(req(CLOSE_BODY, headers))


def test_close_key_is_hex_decoded() -> None:
    key = ENV["CLOSE_WEBHOOK_SIGNATURE_KEY"]
    wrong = mac(key.encode(), str(int(NOW)).encode() + CLOSE_BODY).hex()  # key used as text
    headers = {"close-sig-hash": wrong, "close-sig-timestamp": str(int(NOW))}
    with pytest.raises(InvalidSignature):
        provider("close").verify(req(CLOSE_BODY, headers))


@pytest.mark.parametrize("stamp", ["", "soon", "nan", "inf", "1e400"])
def test_close_malformed_timestamp_is_refused(stamp: str) -> None:
    headers = close(CLOSE_BODY, ENV["CLOSE_WEBHOOK_SIGNATURE_KEY"], int(NOW))
    headers["close-sig-timestamp"] = stamp
    with pytest.raises(InvalidSignature):
        provider("close").verify(req(CLOSE_BODY, headers))


def test_milliseconds_timestamps() -> None:
    p = make(
        {"timestamp_header": "X-Timestamp", "timestamp_unit": "ms", "signed": "{timestamp}.{body}"}
    )
    ms = str(int(NOW * 1000))
    headers = {"x-sig": mac("s3cret", f"{ms}.".encode() + b"{}").hex(), "x-timestamp": ms}
    p.verify(req(b"{}", headers))
    with pytest.raises(InvalidSignature, match="tolerance"):
        p.verify(req(b"{}", headers, at=NOW + 301))


# -- prefixes, encodings, templates --------------------------------------------------------


def test_intercom_signature_without_prefix_is_refused() -> None:
    plain = mac(ENV["INTERCOM_CLIENT_SECRET"], INTERCOM_BODY, "sha1").hex()
    with pytest.raises(InvalidSignature, match="malformed"):
        provider("intercom").verify(req(INTERCOM_BODY, {"X-Hub-Signature": plain}))


def test_hex_signatures_compare_case_insensitively() -> None:
    headers = intercom(INTERCOM_BODY, ENV["INTERCOM_CLIENT_SECRET"], 0)
    headers["X-Hub-Signature"] = "sha1=" + headers["X-Hub-Signature"][5:].upper()
    provider("intercom").verify(req(INTERCOM_BODY, headers))


def test_base64_signature_written_in_hex_is_refused() -> None:
    hexed = mac(ENV["SHOPIFY_CLIENT_SECRET"], SHOPIFY_BODY).hex()
    with pytest.raises(InvalidSignature):
        provider("shopify").verify(
            req(SHOPIFY_BODY, {**shopify(SHOPIFY_BODY, "x", 0), "X-Shopify-Hmac-SHA256": hexed})
        )


def make(extra: dict[str, Any], *, signed: bool = True) -> HmacProvider:
    table = {"provider": "hmac", "secret": "s3cret", "signature_header": "X-Sig", **extra}
    return HmacProvider.from_config(ConfigTable(table, Path("relay.toml"), "sources.x"), signed)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
def test_algorithms(algorithm: str) -> None:
    p = make({"algorithm": algorithm, "encoding": "base64"})
    p.verify(req(b"hi", {"x-sig": base64.b64encode(mac("s3cret", b"hi", algorithm)).decode()}))
    with pytest.raises(InvalidSignature):
        p.verify(req(b"hi", {"x-sig": base64.b64encode(mac("s3cret", b"hi", "md5")).decode()}))


def test_template_with_method_url_and_id() -> None:
    p = make(
        {
            "signed": "{method} {url}\n{id}\n{body}",
            "id_header": "X-Request-Id",
            "public_url": "https://hooks.example.com/in",
        }
    )
    received = "http://127.0.0.1:8000/webhooks/x?tenant=7"
    message = b"POST https://hooks.example.com/in?tenant=7\nreq_42\n{}"
    headers = {"x-sig": mac("s3cret", message).hex(), "x-request-id": "req_42"}
    p.verify(req(b"{}", headers, url=received))
    with pytest.raises(InvalidSignature):
        p.verify(req(b"{}", {**headers, "x-request-id": "req_43"}, url=received))
    with pytest.raises(InvalidSignature):
        p.verify(req(b"{}", headers, url=received, method="PUT"))
    with pytest.raises(InvalidSignature, match="missing x-request-id"):
        p.verify(req(b"{}", {"x-sig": headers["x-sig"]}, url=received))


def test_called_url() -> None:
    assert called_url(None, "http://a/b?c=1") == "http://a/b?c=1"
    assert called_url("https://p/q", "http://a/b?c=1") == "https://p/q?c=1"
    assert called_url("https://p/q", "http://a/b") == "https://p/q"
    assert called_url("https://p/q?pinned=1", "http://a/b?c=1") == "https://p/q?pinned=1"


def test_rotation_accepts_any_configured_secret() -> None:
    p = make({"secret": ["new-secret", "s3cret"]})
    p.verify(req(b"x", {"x-sig": mac("s3cret", b"x").hex()}))
    p.verify(req(b"x", {"x-sig": mac("new-secret", b"x").hex()}))
    with pytest.raises(InvalidSignature):
        p.verify(req(b"x", {"x-sig": mac("old-secret", b"x").hex()}))


def test_several_signature_values_in_key_value_header() -> None:
    p = make({"signature_key": "v1"})
    good = mac("s3cret", b"x").hex()
    p.verify(req(b"x", {"x-sig": f"v1={'0' * 64},v1={good}"}))


def test_base64_key_encoding() -> None:
    key = bytes(range(32))
    p = make({"secret": base64.b64encode(key).decode(), "key_encoding": "base64"})
    p.verify(req(b"x", {"x-sig": mac(key, b"x").hex()}))


# -- bodies, ids and types -----------------------------------------------------------------


def test_defaults_hash_id_and_webhook_type_for_any_body() -> None:
    p = make({})
    [event] = p.parse(req(b"plain text \xff", {}))
    assert event.key == hashlib.sha256(b"plain text \xff").hexdigest()
    assert event.type == "webhook"
    assert event.data == {"body": "plain text \ufffd"}
    [event] = p.parse(req(b'{"a": {"b": 1}}', {}))
    assert event.data == {"a": {"b": 1}}
    [event] = p.parse(req(b"[1, 2]", {}))
    assert event.data == {"body": "[1, 2]"}


def test_type_constant_and_numeric_id_field() -> None:
    p = make({"type": "lead.created", "id_field": "lead.id"})
    [event] = p.parse(req(b'{"lead": {"id": 42}}', {}))
    assert (event.key, event.type) == ("42", "lead.created")


def test_unsigned_id_and_type_headers_cannot_make_a_replayed_body_new() -> None:
    """Shopify signs the body only: a replay under a new webhook id and topic is the same
    event, keyed by the body's hash; the type is the first one seen, by the dedupe layer."""
    p = provider("shopify")
    first = req(SHOPIFY_BODY, shopify(SHOPIFY_BODY, ENV["SHOPIFY_CLIENT_SECRET"], 0))
    replay_headers = {
        **shopify(SHOPIFY_BODY, ENV["SHOPIFY_CLIENT_SECRET"], 0),
        "X-Shopify-Webhook-Id": "0f0e0d0c-0000-4000-8000-000000000001",
        "X-Shopify-Topic": "customers/create",
    }
    replay = req(SHOPIFY_BODY, replay_headers)
    for request in (first, replay):
        p.verify(request)
    [a], [b] = p.parse(first), p.parse(replay)
    assert a.key == b.key == hashlib.sha256(SHOPIFY_BODY).hexdigest()
    assert (a.type, b.type) == ("orders/create", "customers/create")
    without_id = req(SHOPIFY_BODY, {"X-Shopify-Topic": "orders/create"})
    assert p.parse(without_id)[0].key == a.key  # the unsigned header is not even needed


def test_a_signed_id_header_is_the_key() -> None:
    p = make({"signed": "{id}.{body}", "id_header": "X-Id"})
    headers = {"x-sig": mac("s3cret", b"evt_1.{}").hex(), "x-id": "evt_1"}
    p.verify(req(b"{}", headers))
    assert p.parse(req(b"{}", headers))[0].key == "evt_1"


@pytest.mark.parametrize("verify", ["basic", "token"])
def test_an_id_header_counts_when_credentials_vouch_for_the_whole_request(verify: str) -> None:
    table = {"provider": "hmac", "verify": verify, "id_header": "X-Id"}
    table |= {"username": "u", "password": "p"} if verify == "basic" else {"token": "t" * 32}
    table |= {"token_header": "X-Token"} if verify == "token" else {}
    config = ConfigTable(table, Path("relay.toml"), "sources.x")
    p, _ = build_source_parts("hmac", config)
    assert p.parse(req(b"{}", {"x-id": "evt_9"}))[0].key == "evt_9"


@pytest.mark.parametrize(
    ("extra", "body", "headers", "reason"),
    [
        ({"id_field": "id"}, b"not json", {}, "JSON object"),
        ({"id_field": "id"}, b"[]", {}, "JSON object"),
        ({"id_field": "id"}, b'{"di": 1}', {}, "no id"),
        ({"id_field": "id"}, b'{"id": true}', {}, "no id"),
        ({"id_field": "id"}, b'{"id": ""}', {}, "no id"),
        ({"id_field": "event.id"}, b'{"event": "x"}', {}, "no event.id"),
        ({"type_field": "topic"}, b'{"topic": 7}', {}, "no topic"),
        ({"type_field": ["a", "b"]}, b'{"a": "x"}', {}, "no b"),
        ({"type_header": "X-Topic"}, b"{}", {}, "missing x-topic"),
        ({"id_header": "X-Id", "signed": "{id}.{body}"}, b"{}", {}, "missing x-id"),
    ],
)
def test_bad_bodies(
    extra: dict[str, Any], body: bytes, headers: dict[str, str], reason: str
) -> None:
    with pytest.raises(InvalidBody, match=reason):
        make(extra).parse(req(body, headers))


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"algorithm": "md5"}, "algorithm"),
        ({"encoding": "base32"}, "encoding"),
        ({"key_encoding": "latin1"}, "key_encoding"),
        ({"key_encoding": "hex"}, "secret"),  # "s3cret" is not hex
        ({"key_encoding": "base64", "secret": "s3cret!"}, "secret"),
        ({"signed": "{timestamp}.{body}"}, "signed"),
        ({"signed": "{body}", "timestamp_header": "X-Ts"}, "signed"),
        ({"signed": "{payload}"}, "signed"),
        ({"signed": "{body!r}"}, "signed"),
        ({"signed": "{body"}, "signed"),
        ({"signed": "{id}.{body}"}, "signed"),
        ({"signed": "{url}"}, "signed"),  # the body would be unsigned
        ({"timestamp_header": "X-Ts", "signed": "{timestamp}"}, "signed"),
        ({"timestamp_key": "t"}, "timestamp_key"),
        ({"prefix": "v1=", "signature_key": "v1"}, "prefix"),
        (
            {
                "signature_key": "v1",
                "timestamp_key": "t",
                "timestamp_header": "X-Ts",
                "signed": "{timestamp}{body}",
            },
            "timestamp_header",
        ),
        ({"timestamp_unit": "us"}, "timestamp_unit"),
        ({"tolerance": "soon"}, "tolerance"),
        ({"id_header": "X-Id", "id_field": "id"}, "id_field"),
        ({"id_field": "a..b"}, "id_field"),
        ({"id_field": ""}, "id_field"),
        ({"type_header": "X-T", "type_field": "t"}, "type"),
        ({"type_field": []}, "type_field"),
        ({"type_field": [1]}, "type_field"),
        ({"type": ""}, "type"),
        ({"public_url": "hooks.example.com/in"}, "public_url"),
        ({"signature_header": ""}, "signature_header"),
        ({"signature_header": 5}, "signature_header"),
        ({"secret": []}, "secret"),
    ],
)
def test_bad_config_names_the_key(extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(extra)
    assert e.value.key == f"sources.x.{key}"
    assert "s3cret" not in str(e.value)


def test_signing_keys_required_only_when_signing() -> None:
    for missing in ("secret", "signature_header"):
        table = {"secret": "s3cret", "signature_header": "X-Sig"}
        del table[missing]
        with pytest.raises(ConfigError) as e:
            HmacProvider.from_config(ConfigTable(table, Path("relay.toml"), "sources.x"))
        assert e.value.key == f"sources.x.{missing}"
    unsigned = HmacProvider.from_config(ConfigTable({}, Path("relay.toml"), "sources.x"), False)
    sample = unsigned.sample(None, URL, NOW)
    assert set(sample.headers) == {"content-type"}


# -- senders that sign nothing -------------------------------------------------------------

PIPEDRIVE_BODY = json.dumps(
    {
        "data": {
            "id": 17,
            "title": "Rosen Analytics deal",
            "value": 12000,
            "currency": "USD",
            "status": "open",
        },
        "previous": None,
        "meta": {
            "action": "create",
            "entity": "deal",
            "entity_id": "17",
            "id": "8e3f0c1a-4b5d-4e6f-9a7b-2c1d0e9f8a7b",
            "version": "2.0",
            "attempt": 1,
            "timestamp": "2023-11-14T22:13:20.000Z",
        },
    }
).encode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_pipedrive_basic_auth() -> None:
    p, verifier = build("pipedrive")
    assert isinstance(verifier, BasicAuth)
    user, password = ENV["PIPEDRIVE_WEBHOOK_USER"], ENV["PIPEDRIVE_WEBHOOK_PASSWORD"]
    good = req(PIPEDRIVE_BODY, basic(user, password))
    verifier.verify(good)
    [event] = p.parse(good)
    assert (event.key, event.type) == ("8e3f0c1a-4b5d-4e6f-9a7b-2c1d0e9f8a7b", "deal.create")
    for headers in (basic(user, "guess"), basic("admin", password), {}):
        with pytest.raises(InvalidSignature):
            verifier.verify(req(PIPEDRIVE_BODY, headers))


def test_zoho_shared_token() -> None:
    p, verifier = build("zoho-leads")
    assert isinstance(verifier, SharedToken)
    body = b'{"lead_id": "4876876000000624001", "email": "jenny@example.com"}'
    good = req(body, {"X-Relay-Token": ENV["ZOHO_WEBHOOK_TOKEN"]})
    verifier.verify(good)
    [event] = p.parse(good)
    assert (event.key, event.type) == ("4876876000000624001", "lead.created")
    wrong = [{"X-Relay-Token": "zt_guess"}, {}, {"Authorization": ENV["ZOHO_WEBHOOK_TOKEN"]}]
    for headers in wrong:
        with pytest.raises(InvalidSignature):
            verifier.verify(req(body, headers))


def test_docs_configs_load_as_a_whole_relay_toml(tmp_path: Path) -> None:
    """Every docs block is a complete source: no unknown key, no missing one."""
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    sources = [b for b in blocks if "[sources." in b]
    assert len(sources) == 7
    for name in doc_sources():
        (tmp_path / "mappings").mkdir(exist_ok=True)
        (tmp_path / "mappings" / f"{name.split('-')[0]}.toml").write_text('provider = "hmac"\n')
    text = '[track]\nbase_url = "http://127.0.0.1:9"\napi_key = "k"\nwebsite_id = 1\n\n'
    text += "\n".join(sources)
    config = parse_config(tomllib.loads(text), tmp_path / "relay.toml", text, ENV)
    assert sorted(config.sources) == sorted(doc_sources())
    assert {n for n, s in config.sources.items() if s.verifier is None} == set()


def test_docs_configs_name_unset_variables() -> None:
    env = {k: v for k, v in ENV.items() if k != "SHOPIFY_CLIENT_SECRET"}
    with pytest.raises(ConfigError, match="SHOPIFY_CLIENT_SECRET") as e:
        build("shopify", env)
    assert e.value.key == "sources.shopify.secret"


def test_docs_mapping_example_maps_a_shopify_order(tmp_path: Path) -> None:
    from relay.mapping import load_mapping

    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    [text] = [b for b in blocks if "[[events]]" in b]
    (tmp_path / "shopify.toml").write_text(text)
    mapping = load_mapping(tmp_path / "shopify.toml")
    p = provider("shopify")
    request = req(SHOPIFY_BODY, shopify(SHOPIFY_BODY, ENV["SHOPIFY_CLIENT_SECRET"], 0))
    p.verify(request)
    [event] = p.parse(request)
    [out] = mapping.apply(event, "shopify", request.headers).outputs
    assert out.event.name == "purchase"
    assert out.event.payload == {
        "order_id": "820982911946154508",
        "amount": "199.00",
        "currency": "USD",
    }


def test_the_readme_shows_the_same_configs_as_the_docs() -> None:
    """The README's sender configs are copies of the tested ones: they must not drift."""
    readme = DOCS.parent.parent / "README.md"
    shown: dict[str, Any] = {}
    for block in re.findall(r"```toml\n(.*?)```", readme.read_text(encoding="utf-8"), re.S):
        sources = tomllib.loads(block).get("sources", {})
        shown.update({k: v for k, v in sources.items() if v.get("provider") == "hmac"})
    assert {"shopify", "intercom", "typeform", "calendly"} <= set(shown)
    documented = doc_sources()
    for name, table in shown.items():
        assert table == documented[name], name


def test_a_shopify_body_replayed_with_a_new_id_and_topic_is_a_duplicate_end_to_end(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    [mapping] = [b for b in blocks if "[[events]]" in b]
    (tmp_path / "shopify.toml").write_text(mapping)
    secret = ENV["SHOPIFY_CLIENT_SECRET"]
    sources = f"""
[sources.shopify]
provider = "hmac"
secret = "{secret}"
signature_header = "X-Shopify-Hmac-SHA256"
encoding = "base64"
id_header = "X-Shopify-Webhook-Id"
type_header = "X-Shopify-Topic"
mapping = "{tmp_path / "shopify.toml"}"
"""
    relay = relay_factory(sandbox, sources=sources)
    headers = shopify(SHOPIFY_BODY, secret, 0)
    first = relay.post("shopify", SHOPIFY_BODY, headers)
    assert first.json() == {"ok": True, "accepted": 1, "duplicates": 0}
    for webhook_id, topic in [
        ("0f0e0d0c-0000-4000-8000-000000000001", "orders/create"),
        ("0f0e0d0c-0000-4000-8000-000000000002", "customers/create"),
        (headers["X-Shopify-Webhook-Id"], "customers/create"),
    ]:
        replay = {**headers, "X-Shopify-Webhook-Id": webhook_id, "X-Shopify-Topic": topic}
        answer = relay.post("shopify", SHOPIFY_BODY, replay)
        assert answer.json() == {"ok": True, "accepted": 0, "duplicates": 1}, (webhook_id, topic)
    assert relay.rows() == {"webhooks": 1, "dedupe": 1, "outbox": 1}
    [delivered] = settled(sandbox, 1)
    assert delivered["name"] == "purchase"
