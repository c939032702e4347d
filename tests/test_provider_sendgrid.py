"""SendGrid provider: ECDSA verification, batches, samples, config and dev key pairs."""

from __future__ import annotations

import base64
import json
import stat
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from sendgrid.helpers.eventwebhook import EventWebhook

from relay.config import ConfigTable
from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers import provider_class
from relay.providers.base import WebhookRequest
from relay.providers.sendgrid import (
    SendGridProvider,
    generate_keypair,
    load_public_key,
    public_key_text,
    sign,
)

NOW = 1_714_550_400.0
SIG = "x-twilio-email-event-webhook-signature"
TS = "x-twilio-email-event-webhook-timestamp"

# sendgrid-python's own unit-test vector (the payload ends with CRLF)
VECTOR_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw"
    "+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
VECTOR_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEA"
    "yBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
)
VECTOR_TIMESTAMP = "1600112502"
VECTOR_PAYLOAD = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]\r\n'
)


@pytest.fixture(scope="module")
def private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def sendgrid(private_key: ec.EllipticCurvePrivateKey) -> SendGridProvider:
    return SendGridProvider(private_key.public_key(), 900.0, private_key)


def events(**custom: Any) -> list[dict[str, Any]]:
    common = {"email": "alice@example.com", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001"}
    return [
        {
            **common,
            "event": "processed",
            "sg_event_id": "cHJvY2Vzc2VkLTEyMw",
            "timestamp": 1714550390,
        },
        {
            **common,
            "event": "open",
            "sg_event_id": "b3Blbi00NTY",
            "timestamp": 1714550395,
            **custom,
        },
    ]


def signed(
    key: ec.EllipticCurvePrivateKey,
    body: bytes,
    timestamp: str = str(int(NOW)),
    at: float = NOW,
    **headers: str,
) -> WebhookRequest:
    all_headers = {
        "content-type": "application/json",
        SIG: sign(key, timestamp, body),
        TS: timestamp,
    }
    all_headers.update(headers)
    return WebhookRequest("POST", "https://relay.example.com/webhooks/sg", all_headers, body, at)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# -- the public vector --------------------------------------------------------------------------


def vector_request(
    payload: bytes = VECTOR_PAYLOAD, at: float = float(VECTOR_TIMESTAMP)
) -> WebhookRequest:
    headers = {"content-type": "application/json", SIG: VECTOR_SIGNATURE, TS: VECTOR_TIMESTAMP}
    return WebhookRequest("POST", "https://relay.example.com/webhooks/sg", headers, payload, at)


def test_public_vector_verifies_and_parses() -> None:
    p = SendGridProvider(load_public_key(VECTOR_KEY))
    p.verify(vector_request())
    [event] = p.parse(vector_request())
    assert event.key == "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA"
    assert event.type == "dropped"
    assert event.data["reason"] == "Bounced Address"


def test_public_vector_agrees_with_sendgrid_library() -> None:
    hook = EventWebhook(VECTOR_KEY)
    assert hook.verify_signature(VECTOR_PAYLOAD.decode(), VECTOR_SIGNATURE, VECTOR_TIMESTAMP)
    assert not hook.verify_signature(
        VECTOR_PAYLOAD.decode()[:-2], VECTOR_SIGNATURE, VECTOR_TIMESTAMP
    )


def test_public_vector_needs_the_raw_bytes() -> None:
    p = SendGridProvider(load_public_key(VECTOR_KEY))
    with pytest.raises(InvalidSignature, match="no signature matches"):
        p.verify(
            vector_request(VECTOR_PAYLOAD.rstrip(b"\r\n"))
        )  # what a re-serialising reader sees


# -- freshly signed webhooks --------------------------------------------------------------------


def test_valid_batch_is_one_event_per_item(
    sendgrid: SendGridProvider, private_key: ec.EllipticCurvePrivateKey
) -> None:
    visitor = str(uuid.uuid4())
    items = events(visitor_id=visitor, campaign_id="spring-2024")
    req = signed(private_key, dumps(items))
    sendgrid.verify(req)
    parsed = sendgrid.parse(req)
    assert [(e.key, e.type) for e in parsed] == [
        ("cHJvY2Vzc2VkLTEyMw", "processed"),
        ("b3Blbi00NTY", "open"),
    ]
    assert [e.data for e in parsed] == items
    assert parsed[1].data["visitor_id"] == visitor  # custom args are top-level keys


def test_signatures_made_here_verify_with_sendgrid_library(
    private_key: ec.EllipticCurvePrivateKey,
) -> None:
    body = dumps(events())
    signature = sign(private_key, "1714550400", body)
    hook = EventWebhook(public_key_text(private_key))
    assert hook.verify_signature(body.decode(), signature, "1714550400")


def _flip_byte(body: bytes) -> bytes:
    i = body.index(b"alice")
    return body[:i] + b"A" + body[i + 1 :]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda k, o, b: replace(signed(k, b), body=_flip_byte(b)), "no signature matches"),
        (lambda k, o, b: signed(o, b), "no signature matches"),
        (lambda k, o, b: signed(k, b, **{TS: str(int(NOW) + 1)}), "no signature matches"),
        (
            lambda k, o, b: signed(k, b, **{SIG: ""}),
            "missing X-Twilio-Email-Event-Webhook-Signature",
        ),
        (
            lambda k, o, b: signed(k, b, **{TS: ""}),
            "missing X-Twilio-Email-Event-Webhook-Timestamp",
        ),
        (lambda k, o, b: signed(k, b, at=NOW + 901), "timestamp outside the tolerance"),
        (lambda k, o, b: signed(k, b, at=NOW - 901), "timestamp outside the tolerance"),
        (lambda k, o, b: signed(k, b, timestamp="yesterday"), "malformed timestamp"),
        (lambda k, o, b: signed(k, b, **{SIG: "not base64!"}), "malformed signature"),
        (lambda k, o, b: signed(k, b, **{SIG: "AAAA"}), "no signature matches"),
        (
            lambda k, o, b: signed(k, b, **{SIG: base64.b64encode(b"0" * 72).decode()}),
            "no signature matches",
        ),
        (lambda k, o, b: signed(k, b, **{SIG: "ü"}), "malformed signature"),
    ],
    ids=[
        "flipped-body-byte",
        "wrong-key",
        "changed-timestamp",
        "no-signature",
        "no-timestamp",
        "stale",
        "future",
        "timestamp-not-a-number",
        "bad-base64",
        "short-der",
        "not-der",
        "non-ascii",
    ],
)
def test_refused_signatures(
    change: Any,
    reason: str,
    sendgrid: SendGridProvider,
    private_key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    req = change(private_key, other_key, dumps(events()))
    with pytest.raises(InvalidSignature) as info:
        sendgrid.verify(req)
    assert info.value.reason.startswith(reason)


def test_missing_headers_are_refused(sendgrid: SendGridProvider) -> None:
    req = WebhookRequest(
        "POST",
        "https://relay.example.com/webhooks/sg",
        {"content-type": "application/json"},
        dumps(events()),
        NOW,
    )
    with pytest.raises(InvalidSignature, match="missing"):
        sendgrid.verify(req)


def test_tolerance_is_configurable(private_key: ec.EllipticCurvePrivateKey) -> None:
    p = SendGridProvider(private_key.public_key(), tolerance=60)
    p.verify(signed(private_key, b"[]", at=NOW + 60))
    with pytest.raises(InvalidSignature):
        p.verify(signed(private_key, b"[]", at=NOW + 61))


@settings(max_examples=200, deadline=None)
@given(signature=st.text(max_size=120), timestamp=st.text(max_size=20))
def test_any_header_gives_invalid_signature_never_a_crash(signature: str, timestamp: str) -> None:
    key = load_public_key(VECTOR_KEY)
    headers = {SIG: signature, TS: timestamp}
    req = WebhookRequest("POST", "https://relay.example.com/", headers, VECTOR_PAYLOAD, NOW)
    with pytest.raises(InvalidSignature):
        SendGridProvider(key).verify(req)


# -- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        dumps({"event": "open", "sg_event_id": "x"}),
        dumps([events()[0], "open"]),
        dumps([{"event": "open", "email": "alice@example.com"}]),
        dumps([{"event": "open", "sg_event_id": 42}]),
        dumps([{"event": "open", "sg_event_id": ""}]),
        dumps([{"sg_event_id": "b3Blbi00NTY"}]),
        dumps([{"sg_event_id": "b3Blbi00NTY", "event": ["open"]}]),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "object-not-array",
        "item-not-object",
        "no-sg-event-id",
        "int-sg-event-id",
        "empty-sg-event-id",
        "no-event",
        "event-not-text",
    ],
)
def test_bad_bodies_are_invalid_body(
    body: bytes, sendgrid: SendGridProvider, private_key: ec.EllipticCurvePrivateKey
) -> None:
    req = signed(private_key, body)
    sendgrid.verify(req)  # authentic: the refusal is the body's, and it is the whole webhook's
    with pytest.raises(InvalidBody):
        sendgrid.parse(req)


def test_empty_batch_has_no_events(sendgrid: SendGridProvider) -> None:
    req = WebhookRequest("POST", "https://relay.example.com/", {}, b"[]", NOW)
    assert sendgrid.parse(req) == []


# -- config -------------------------------------------------------------------------------------


def table(tmp_path: Path, **values: Any) -> ConfigTable:
    return ConfigTable({"provider": "sendgrid", **values}, tmp_path / "relay.toml", "sources.sg")


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_registry_points_at_this_provider() -> None:
    assert provider_class("sendgrid") is SendGridProvider


def test_from_config(tmp_path: Path, private_key: ec.EllipticCurvePrivateKey) -> None:
    (tmp_path / "dev.pem").write_bytes(_pem(private_key))
    p = SendGridProvider.from_config(
        table(
            tmp_path,
            public_key=public_key_text(private_key),
            private_key_file="dev.pem",
            tolerance="2m",
        )
    )
    assert p.tolerance == 120
    assert p.public_key is not None and public_key_text(p.public_key) == public_key_text(
        private_key
    )
    p.verify(signed(private_key, dumps(events())))
    assert SendGridProvider.from_config(table(tmp_path, public_key=VECTOR_KEY)).tolerance == 900


def test_public_key_as_pem_or_wrapped_is_accepted(tmp_path: Path) -> None:
    der = base64.b64decode(VECTOR_KEY)
    pem = (
        load_public_key(VECTOR_KEY)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    wrapped = "\n".join(VECTOR_KEY[i : i + 40] for i in range(0, len(VECTOR_KEY), 40))
    for text in (pem, wrapped, f"  {VECTOR_KEY}\n"):
        p = SendGridProvider.from_config(table(tmp_path, public_key=text))
        assert p.public_key is not None
        assert base64.b64decode(public_key_text(p.public_key)) == der


def _spki(key: Any) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@pytest.mark.parametrize(
    ("public_key", "reason"),
    [
        ("not a key", "is not a SendGrid verification key"),
        (base64.b64encode(b"valid base64, not DER").decode(), "is not a SendGrid verification key"),
        (VECTOR_KEY[:-8], "is not a SendGrid verification key"),
        ("rsa", "must be an EC P-256"),
        ("p384", "must be an EC P-256"),
        ("", "is not a SendGrid verification key"),
    ],
    ids=["text", "not-der", "truncated", "rsa", "p384", "empty"],
)
def test_bad_public_key_is_a_config_error_naming_it(
    tmp_path: Path, public_key: str, reason: str
) -> None:
    if public_key == "rsa":
        public_key = _spki(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif public_key == "p384":
        public_key = _spki(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigError) as info:
        SendGridProvider.from_config(table(tmp_path, public_key=public_key))
    assert info.value.key == "sources.sg.public_key"
    assert reason in info.value.reason
    assert str(tmp_path / "relay.toml") in info.value.message


def test_public_key_is_required_when_signed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SendGridProvider.from_config(table(tmp_path))
    assert info.value.key == "sources.sg.public_key"
    assert SendGridProvider.from_config(table(tmp_path), signed=False).public_key is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        (
            b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
            "not an unencrypted PEM",
        ),
        ("rsa", "not an EC P-256"),
        ("other", "does not pair with public_key"),
    ],
    ids=["missing", "garbage", "rsa", "unpaired"],
)
def test_bad_private_key_file_is_a_config_error_naming_it(
    tmp_path: Path, content: Any, reason: str, other_key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "dev.pem"
    if content == "rsa":
        path.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    elif content == "other":
        path.write_bytes(_pem(other_key))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        SendGridProvider.from_config(
            table(tmp_path, public_key=VECTOR_KEY, private_key_file="dev.pem")
        )
    assert info.value.key == "sources.sg.private_key_file"
    assert reason in info.value.reason


# -- samples ------------------------------------------------------------------------------------


def _sample_request(sample: Any, at: float = NOW + 2) -> WebhookRequest:
    return WebhookRequest(
        "POST", "http://127.0.0.1:8000/webhooks/sg", sample.headers, sample.body, at
    )


def test_default_sample_is_a_signed_mixed_batch(sendgrid: SendGridProvider) -> None:
    sample = sendgrid.sample(None, "http://127.0.0.1:8000/webhooks/sg", NOW)
    req = _sample_request(sample)
    sendgrid.verify(req)
    parsed = sendgrid.parse(req)
    assert [e.type for e in parsed] == ["processed", "delivered", "open"]
    assert len({e.key for e in parsed}) == 3
    assert len({e.data["sg_message_id"] for e in parsed}) == 1  # one message's story
    assert EventWebhook(public_key_text(sendgrid.private_key)).verify_signature(  # type: ignore[arg-type]
        sample.body.decode(), sample.headers[SIG], sample.headers[TS]
    )


@pytest.mark.parametrize("event_type", SendGridProvider.sample_types)
def test_samples_verify_and_parse(event_type: str, sendgrid: SendGridProvider) -> None:
    sample = sendgrid.sample(event_type, "http://127.0.0.1:8000/webhooks/sg", NOW)
    req = _sample_request(sample)
    sendgrid.verify(req)
    [event] = sendgrid.parse(req)
    assert event.type == event_type
    assert uuid.UUID(event.data["visitor_id"]).version == 4
    assert event.data["campaign_id"] and event.data["email"]
    if event_type == "click":
        assert event.data["url"].startswith("https://")
    if event_type in ("bounce", "dropped"):
        assert event.data["reason"]


def test_sample_needs_a_private_key(tmp_path: Path) -> None:
    p = SendGridProvider.from_config(table(tmp_path, public_key=VECTOR_KEY))
    with pytest.raises(ConfigError) as info:
        p.sample(None, "http://127.0.0.1:8000/webhooks/sg", NOW)
    assert info.value.key == "sources.sg.private_key_file"


# -- dev key pairs ------------------------------------------------------------------------------


def test_generate_keypair_makes_then_reuses_a_private_file(tmp_path: Path) -> None:
    public, path = generate_keypair(tmp_path / "dev")
    assert path == tmp_path / "dev" / "sendgrid-private.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(load_public_key(public)) == public
    assert [p.name for p in path.parent.iterdir()] == ["sendgrid-private.pem"]  # no temp file left

    again, same_path = generate_keypair(tmp_path / "dev")
    assert (again, same_path) == (public, path)
    assert generate_keypair(tmp_path / "elsewhere")[0] != public

    p = SendGridProvider.from_config(table(tmp_path, public_key=public, private_key_file=str(path)))
    p.verify(_sample_request(p.sample("click", "http://127.0.0.1/webhooks/sg", NOW)))


def test_generate_keypair_refuses_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "sendgrid-private.pem").write_text("damaged")
    with pytest.raises(ConfigError, match="delete it to make a new one"):
        generate_keypair(tmp_path)


SAMPLE_NAMES = {
    "processed": [],
    "delivered": ["email_delivered"],
    "open": ["email_open"],
    "click": ["email_click"],
    "bounce": ["email_bounce"],
    "dropped": ["email_dropped"],
    "deferred": [],
    "unsubscribe": ["email_unsubscribe"],
    "group_unsubscribe": ["email_unsubscribe"],
    "spamreport": ["email_complaint"],
}


@pytest.mark.parametrize("event_type", SendGridProvider.sample_types)
def test_samples_make_track_events_with_the_default_mapping(
    event_type: str, sendgrid: SendGridProvider
) -> None:
    """What `relay send-test` posts shows up downstream, linked to the sample's visitor."""
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).parent.parent / "mappings" / "sendgrid.toml")
    sample = sendgrid.sample(event_type, "http://127.0.0.1/webhooks/sg", NOW)
    [event] = sendgrid.parse(_sample_request(sample))
    result = mapping.apply(event, "sg", {})
    assert not result.failures
    assert [m.event.name for m in result.outputs] == SAMPLE_NAMES[event_type]
    for m in result.outputs:
        assert m.event.visitor_id == event.data["visitor_id"]
        assert m.event.payload["campaign_id"] == "spring-2024"


def test_every_default_rule_has_an_example() -> None:
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).parent.parent / "mappings" / "sendgrid.toml")
    p = SendGridProvider(None)
    used: set[int] = set()
    for example in mapping.examples:
        req = WebhookRequest(
            "POST", "https://relay.example.com/", {}, example.path.read_bytes(), NOW
        )
        for event in p.parse(req):
            used.update(m.rule for m in mapping.apply(event, "sg", {}).outputs)
    assert used == set(range(len(mapping.rules)))
