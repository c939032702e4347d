"""Mailgun provider: signature checks, both body shapes, dedupe keys, samples, config."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import ConfigTable, Secret
from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers import provider_class
from relay.providers.base import Token, WebhookRequest
from relay.providers.mailgun import MailgunProvider, sign

KEY = "4f1c2e9ab0d37d6e5a8c1b2f3e4d5c6b-2b0eef4c-5b1a8c3d"
OTHER_KEY = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d-1a2b3c4d-5e6f7a8b"
NOW = 1_714_550_400.0
TOKEN = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"


def provider(*keys: str, tolerance: float = 900.0) -> MailgunProvider:
    return MailgunProvider(tuple(Secret(k) for k in (keys or (KEY,))), tolerance)


def event_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "CPgfbmQMTCKtHW6uIWtuVe",
        "timestamp": 1714550398.908181,
        "log-level": "info",
        "event": "clicked",
        "recipient": "alice@example.com",
        "url": "https://example.com/pricing",
        "message": {"headers": {"message-id": "20240501.abc@mg.example.com"}},
        "tags": ["newsletter"],
        "user-variables": {"visitor_id": str(uuid.uuid4()), "campaign_id": "spring-2024"},
    }
    data.update(changes)
    return data


def signature(key: str = KEY, timestamp: str = str(int(NOW)), token: str = TOKEN) -> dict[str, str]:
    return {"timestamp": timestamp, "token": token, "signature": sign(key, timestamp, token)}


def json_body(sig: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"event-data": data if data is not None else event_data()}
    body["signature"] = sig if sig is not None else signature()
    return json.dumps(body).encode()


def request(
    body: bytes, content_type: str | None = "application/json", at: float = NOW
) -> WebhookRequest:
    headers = {"content-type": content_type} if content_type is not None else {}
    return WebhookRequest("POST", "https://relay.example.com/webhooks/mg", headers, body, at)


def legacy_fields(key: str = KEY, **changes: str) -> dict[str, str]:
    timestamp, token = str(int(NOW)), TOKEN
    fields = {
        "event": "opened",
        "recipient": "alice@example.com",
        "domain": "mg.example.com",
        "message-id": "20240501.abc@mg.example.com",
        "campaign-id": "spring-2024",
        "visitor_id": "0b8e4f5c-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        "timestamp": timestamp,
        "token": token,
        "signature": sign(key, timestamp, token),
    }
    fields.update(changes)
    return fields


ATTACHMENT = {"attachment-1": ("message.eml", b"\x00\x01 raw bytes", "message/rfc822")}


def multipart(fields: dict[str, Any]) -> WebhookRequest:
    """A multipart body as an HTTP client encodes it (httpx's encoder), with an attachment as
    legacy Mailgun webhooks carry for bounces (httpx encodes a form without files urlencoded)."""
    built = httpx.Request("POST", "https://relay.example.com/", data=fields, files=ATTACHMENT)
    assert built.headers["content-type"].startswith("multipart/form-data; boundary=")
    return request(built.read(), built.headers["content-type"])


# -- the public vector and valid webhooks ------------------------------------------------------


def test_public_vector() -> None:
    digest = sign(
        "TEST_WEBHOOK_SIGNING_KEY",
        "1534108637",
        "651869375b9df3c98fc15c4889b102119add1235c38fc92824",
    )
    assert digest == "2a75affe24846ead9e37e614a5e7643a04abf4d5b49b34d224ede9af23a00ccc"
    body = json_body(
        {
            "timestamp": "1534108637",
            "token": "651869375b9df3c98fc15c4889b102119add1235c38fc92824",
            "signature": digest,
        }
    )
    provider("TEST_WEBHOOK_SIGNING_KEY").verify(request(body, at=1534108637 + 60))


def test_valid_json_webhook_is_one_event_keyed_by_id_and_timestamp() -> None:
    data = event_data()
    req = request(json_body(data=data))
    p = provider()
    p.verify(req)
    [event] = p.parse(req)
    assert event.key == "CPgfbmQMTCKtHW6uIWtuVe:1714550398.908181"
    assert event.type == "clicked"
    assert event.data == data
    assert event.data["user-variables"]["campaign_id"] == "spring-2024"


def test_same_id_on_another_day_is_another_event() -> None:
    p = provider()
    first = p.parse(request(json_body(data=event_data(timestamp=1714550398.5))))[0]
    later = p.parse(request(json_body(data=event_data(timestamp=1714636798.5))))[0]
    assert first.key != later.key


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param({**signature(), "timestamp": int(NOW)}, id="integer-timestamp"),
        pytest.param(
            {**signature(), "signature": signature()["signature"].upper()}, id="upper-hex"
        ),
        pytest.param(
            {**signature(OTHER_KEY), "parent-signature": signature()["signature"]},
            id="parent-signature",
        ),
    ],
)
def test_accepted_signature_forms(sig: dict[str, Any]) -> None:
    provider().verify(request(json_body(sig)))


def test_any_configured_key_verifies_during_rotation() -> None:
    p = provider(OTHER_KEY, KEY)
    p.verify(request(json_body(signature(KEY))))
    p.verify(request(json_body(signature(OTHER_KEY, token="b" * 50))))


# -- refusals -----------------------------------------------------------------------------------


def _flip(hex_text: str) -> str:
    return ("1" if hex_text[0] != "1" else "2") + hex_text[1:]


@pytest.mark.parametrize(
    ("sig", "at", "reason"),
    [
        (signature(OTHER_KEY), NOW, "no signature matches"),
        (
            {**signature(), "signature": _flip(signature()["signature"])},
            NOW,
            "no signature matches",
        ),
        ({**signature(), "token": TOKEN[:-1] + "1"}, NOW, "no signature matches"),
        ({**signature(), "timestamp": str(int(NOW) + 1)}, NOW, "no signature matches"),
        ({**signature(), "signature": "not hex at all ✗"}, NOW, "no signature matches"),
        ({"timestamp": str(int(NOW)), "token": TOKEN}, NOW, "missing signature"),
        ({**signature(), "token": ""}, NOW, "missing signature"),
        ({**signature(), "signature": 12345}, NOW, "missing signature"),
        ({**signature(), "timestamp": None}, NOW, "missing signature"),
        (signature(), NOW + 901, "timestamp outside the tolerance"),
        (signature(), NOW - 901, "timestamp outside the tolerance"),
        (signature(timestamp="soon"), NOW, "malformed timestamp"),
    ],
    ids=[
        "wrong-key",
        "flipped-signature",
        "changed-token",
        "changed-timestamp",
        "garbage",
        "no-signature-field",
        "empty-token",
        "signature-not-text",
        "null-timestamp",
        "stale",
        "future",
        "timestamp-not-a-number",
    ],
)
def test_refused_signatures(sig: dict[str, Any], at: float, reason: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        provider().verify(request(json_body(sig), at=at))
    assert info.value.reason.startswith(reason)


def test_tolerance_is_configurable_and_inclusive() -> None:
    provider(tolerance=60).verify(request(json_body(), at=NOW + 60))
    with pytest.raises(InvalidSignature):
        provider(tolerance=60).verify(request(json_body(), at=NOW + 61))


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"event-data": event_data()}).encode(),
        json.dumps({"signature": "2a75affe", "event-data": event_data()}).encode(),
    ],
    ids=["no-block", "block-not-an-object"],
)
def test_missing_signature_block_is_invalid_signature(body: bytes) -> None:
    with pytest.raises(InvalidSignature, match="missing signature block"):
        provider().verify(request(body))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json {", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"[1, 2]", "application/json"),
        (json_body(), "text/plain"),
        (json_body(), "application/xml"),
        (json_body(), None),
    ],
    ids=["not-json", "not-utf8", "array", "text-plain", "xml", "no-content-type"],
)
def test_unreadable_bodies_are_invalid_body(body: bytes, content_type: str | None) -> None:
    p = provider()
    with pytest.raises(InvalidBody):
        p.verify(request(body, content_type))
    with pytest.raises(InvalidBody):
        p.parse(request(body, content_type))


@pytest.mark.parametrize(
    "data",
    [
        None,
        "delivered",
        {k: v for k, v in event_data().items() if k != "id"},
        {k: v for k, v in event_data().items() if k != "event"},
        {k: v for k, v in event_data().items() if k != "timestamp"},
        event_data(id=42),
        event_data(event=""),
        event_data(timestamp=True),
    ],
    ids=["none", "string", "no-id", "no-event", "no-timestamp", "int-id", "empty-event", "bool-ts"],
)
def test_unusable_event_data_is_invalid_body(data: Any) -> None:
    body = json.dumps({"signature": signature(), "event-data": data}).encode()
    p = provider()
    p.verify(request(body))  # authentic: the refusal is the body's
    with pytest.raises(InvalidBody):
        p.parse(request(body))


# -- token replay -------------------------------------------------------------------------------


def test_mailgun_retry_with_the_same_token_is_verified_again() -> None:
    p = provider()
    body = json_body()
    p.verify(request(body))
    p.verify(request(body, at=NOW + 600))  # same token, same event: dedupe answers it


def test_each_event_carries_its_token_for_the_store_to_bind() -> None:
    """The signature covers the token, not the event: the store refuses a token that comes
    back on another event (tests/test_store_tokens.py), so verify() itself lets it pass."""
    p = provider()
    genuine = request(json_body(data=event_data(id="first-event-id")))
    forged = request(json_body(data=event_data(id="forged-event-id")), at=NOW + 5)
    for req in (genuine, forged):
        p.verify(req)
    [a], [b] = p.parse(genuine), p.parse(forged)
    assert a.token == b.token == Token(TOKEN, NOW + 900)
    assert a.key != b.key
    legacy = request(urlencode(legacy_fields()).encode(), "application/x-www-form-urlencoded")
    assert p.parse(legacy)[0].token == Token(TOKEN, NOW + 900)


def test_an_unsigned_source_binds_no_token() -> None:
    p = MailgunProvider.from_config(table(), signed=False)
    assert p.parse(request(json_body()))[0].token is None


# -- legacy form webhooks -----------------------------------------------------------------------


def test_legacy_urlencoded_webhook() -> None:
    fields = legacy_fields()
    req = request(urlencode(fields).encode(), "application/x-www-form-urlencoded")
    p = provider()
    p.verify(req)
    [event] = p.parse(req)
    assert event.type == "opened"
    assert event.key == f"{TOKEN}:{int(NOW)}"
    assert event.data == fields


def test_legacy_multipart_webhook_skips_attachments_and_keeps_utf8() -> None:
    fields = legacy_fields(recipient="jérôme@example.com", event="bounced", code="550")
    req = multipart(fields)
    p = provider()
    p.verify(req)
    [event] = p.parse(req)
    assert event.type == "bounced"
    assert event.data == fields
    assert "attachment-1" not in event.data


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_legacy_repeated_fields_last_value_counts(encoding: str) -> None:
    good = legacy_fields()
    pairs = [(k, v) for k, v in good.items() if k not in ("event", "signature")]
    last_good = [
        *pairs,
        ("event", "opened"),
        ("event", "clicked"),
        ("signature", "0" * 64),
        ("signature", good["signature"]),
    ]
    last_bad = [
        *pairs,
        ("event", "clicked"),
        ("signature", good["signature"]),
        ("signature", "0" * 64),
    ]

    def make(items: list[tuple[str, str]]) -> WebhookRequest:
        if encoding == "urlencoded":
            return request(urlencode(items).encode(), "application/x-www-form-urlencoded")
        grouped: dict[str, list[str]] = {}
        for k, v in items:
            grouped.setdefault(k, []).append(v)
        return multipart(grouped)

    p = provider()
    p.verify(make(last_good))
    assert p.parse(make(last_good))[0].type == "clicked"
    with pytest.raises(InvalidSignature):
        p.verify(make(last_bad))


def test_legacy_form_without_signature_fields_is_invalid_signature() -> None:
    fields = {k: v for k, v in legacy_fields().items() if k != "signature"}
    with pytest.raises(InvalidSignature, match="missing signature"):
        provider().verify(request(urlencode(fields).encode(), "application/x-www-form-urlencoded"))


def test_legacy_form_without_event_is_invalid_body() -> None:
    fields = {k: v for k, v in legacy_fields().items() if k != "event"}
    req = request(urlencode(fields).encode(), "application/x-www-form-urlencoded")
    provider().verify(req)
    with pytest.raises(InvalidBody):
        provider().parse(req)


BOUNDARY = "b0undary"
PART = b'--b0undary\r\nContent-Disposition: form-data; name="event"\r\n\r\nopened\r\n'


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"event=opened&recipient=%FF", "application/x-www-form-urlencoded"),
        (b"\xff\xfe=1", "application/x-www-form-urlencoded"),
        (PART + b"--b0undary--\r\n", "multipart/form-data"),
        (b"complete garbage", f"multipart/form-data; boundary={BOUNDARY}"),
        (PART, f"multipart/form-data; boundary={BOUNDARY}"),
        (
            b"--b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0undary--\r\n",
            f"multipart/form-data; boundary={BOUNDARY}",
        ),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="e"\r\n\r\n'
            b"\xff\r\n--b0undary--\r\n",
            f"multipart/form-data; boundary={BOUNDARY}",
        ),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="e"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n!!!\r\n--b0undary--\r\n",
            f"multipart/form-data; boundary={BOUNDARY}",
        ),
    ],
    ids=[
        "bad-percent-utf8",
        "raw-not-utf8",
        "no-boundary",
        "garbage",
        "truncated",
        "part-without-name",
        "value-not-utf8",
        "bad-base64-part",
    ],
)
def test_malformed_forms_are_invalid_body(body: bytes, content_type: str) -> None:
    """verify() decodes the signature fields alone: a bad value elsewhere may be found only
    once they match (a 401 before, a 400 after); parse() decodes the whole form."""
    p = provider()
    with pytest.raises((InvalidBody, InvalidSignature)):
        p.verify(request(body, content_type))
    with pytest.raises(InvalidBody):
        p.parse(request(body, content_type))


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=300),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            f"multipart/form-data; boundary={BOUNDARY}",
            "text/plain",
        ]
    ),
)
def test_any_body_gives_a_webhook_error_never_a_crash(body: bytes, content_type: str) -> None:
    p = provider()
    for step in (p.verify, p.parse):
        with contextlib.suppress(InvalidSignature, InvalidBody):
            step(request(PART + body if "multipart" in content_type else body, content_type))


# -- config and samples -------------------------------------------------------------------------


def table(**values: Any) -> ConfigTable:
    return ConfigTable(
        {"provider": "mailgun", **values}, Path("/etc/relay/relay.toml"), "sources.mg"
    )


def test_registry_points_at_this_provider() -> None:
    assert provider_class("mailgun") is MailgunProvider


def test_from_config() -> None:
    p = MailgunProvider.from_config(table(secret=[KEY, OTHER_KEY], tolerance="5m"))
    assert [s.reveal() for s in p.secrets] == [KEY, OTHER_KEY]
    assert p.tolerance == 300
    assert MailgunProvider.from_config(table(secret=KEY)).tolerance == 900
    assert KEY not in repr(p.secrets)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "sources.mg.secret"),
        ({"secret": ""}, "sources.mg.secret"),
        ({"secret": KEY, "tolerance": "soon"}, "sources.mg.tolerance"),
    ],
)
def test_from_config_errors_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        MailgunProvider.from_config(table(**values))
    assert info.value.key == key
    assert KEY not in info.value.message


def test_unsigned_source_needs_no_secret_but_cannot_sign_samples() -> None:
    p = MailgunProvider.from_config(table(), signed=False)
    with pytest.raises(ConfigError) as info:
        p.sample(None, "http://127.0.0.1:8000/webhooks/mg", NOW)
    assert info.value.key == "sources.mg.secret"


@pytest.mark.parametrize("event_type", MailgunProvider.sample_types)
def test_samples_verify_and_parse(event_type: str) -> None:
    p = provider()
    sample = p.sample(event_type, "http://127.0.0.1:8000/webhooks/mg", NOW)
    req = WebhookRequest(
        "POST", "http://127.0.0.1:8000/webhooks/mg", sample.headers, sample.body, NOW + 2
    )
    p.verify(req)
    [event] = p.parse(req)
    assert event.type == event_type
    assert uuid.UUID(event.data["user-variables"]["visitor_id"]).version == 4
    assert event.data["user-variables"]["campaign_id"]
    assert event.data["tags"]
    if event_type == "clicked":
        assert event.data["url"].startswith("https://")
    if event_type == "failed":
        assert event.data["severity"] == "permanent"
    with pytest.raises(InvalidSignature):
        provider(OTHER_KEY).verify(req)


def test_default_sample_is_delivered_and_samples_are_distinct() -> None:
    p = provider()
    assert p.sample_types[0] == "delivered"
    a, b = (p.sample(None, "http://127.0.0.1/webhooks/mg", NOW) for _ in range(2))
    first, second = (p.parse(request(s.body))[0] for s in (a, b))
    assert first.type == "delivered"
    assert first.key != second.key


SAMPLE_NAMES = {
    "delivered": ["email_delivered"],
    "opened": ["email_open"],
    "clicked": ["email_click"],
    "unsubscribed": ["email_unsubscribe"],
    "failed": ["email_bounce"],
    "complained": ["email_complaint"],
    "accepted": [],
}


@pytest.mark.parametrize("event_type", MailgunProvider.sample_types)
def test_samples_make_track_events_with_the_default_mapping(event_type: str) -> None:
    """What `relay send-test` posts shows up downstream, linked to the sample's visitor."""
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).parent.parent / "mappings" / "mailgun.toml")
    p = provider()
    [event] = p.parse(request(p.sample(event_type, "http://127.0.0.1/webhooks/mg", NOW).body))
    result = mapping.apply(event, "mg", {})
    assert not result.failures
    assert [m.event.name for m in result.outputs] == SAMPLE_NAMES[event_type]
    for m in result.outputs:
        assert m.event.visitor_id == event.data["user-variables"]["visitor_id"]
        assert m.event.payload["campaign_id"] == "spring-2024"


def test_every_default_rule_has_a_json_and_a_legacy_example() -> None:
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).parent.parent / "mappings" / "mailgun.toml")
    p = MailgunProvider(())
    used: dict[bool, set[int]] = {True: set(), False: set()}
    for example in mapping.examples:
        [event] = p.parse(request(example.path.read_bytes(), example.content_type))
        legacy = example.content_type != "application/json"
        used[legacy].update(m.rule for m in mapping.apply(event, "mg", {}).outputs)
    assert used[False] == used[True] == set(range(len(mapping.rules)))
