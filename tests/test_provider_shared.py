"""Basic credentials and shared tokens, and how `verify` picks them for a source."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigTable
from relay.errors import ConfigError, InvalidSignature
from relay.providers import build_source_parts
from relay.providers.base import WebhookRequest
from relay.providers.hmac import HmacProvider
from relay.providers.shared import BasicAuth, SharedToken
from relay.providers.stripe import StripeProvider

USER, PASSWORD, TOKEN = "relay", "p4ss:with:colons", "tok_9f8e7d6c5b4a"


def table(data: dict[str, Any], name: str = "crm") -> ConfigTable:
    return ConfigTable(data, Path("relay.toml"), f"sources.{name}")


def req(headers: dict[str, str], body: bytes = b"{}") -> WebhookRequest:
    lowered = {k.lower(): v for k, v in headers.items()}
    return WebhookRequest("POST", "http://127.0.0.1/webhooks/crm", lowered, body, 0.0)


def basic_header(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


# -- Basic ---------------------------------------------------------------------------------

BASIC = BasicAuth.from_config(table({"username": USER, "password": PASSWORD}))


def test_basic_accepts_the_configured_credentials() -> None:
    BASIC.verify(req(basic_header(f"{USER}:{PASSWORD}".encode())))
    BASIC.verify(
        req({"Authorization": "basic " + base64.b64encode(b"relay:" + PASSWORD.encode()).decode()})
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": f"Bearer {TOKEN}"}, "missing"),
        ({"Authorization": "Basic"}, "missing"),
        ({"Authorization": "Basic !!!"}, "malformed"),
        ({"Authorization": "Basic cmVsYXk6"[:-1]}, "malformed"),  # broken padding
        ({"Authorization": "Basic wqk="[:-1] + "é"}, "malformed"),  # not ASCII
        (basic_header(b"\xff\xfe:" + PASSWORD.encode()), "malformed"),  # not UTF-8
        (basic_header(f"{USER}{PASSWORD}".encode()), "wrong"),  # no colon
        (basic_header(f"{USER}:{PASSWORD}x".encode()), "wrong"),
        (basic_header(f"{USER}x:{PASSWORD}".encode()), "wrong"),
        (basic_header(f"{USER.upper()}:{PASSWORD}".encode()), "wrong"),
        (basic_header(f":{PASSWORD}".encode()), "wrong"),
        (basic_header(f"{USER}:".encode()), "wrong"),
    ],
)
def test_basic_rejections(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        BASIC.verify(req(headers))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"password": PASSWORD}, "username"),
        ({"username": USER}, "password"),
        ({"username": USER, "password": ""}, "password"),
        ({"username": 1, "password": "x"}, "username"),
    ],
)
def test_basic_config(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        BasicAuth.from_config(table(data))
    assert e.value.key == f"sources.crm.{key}"
    assert PASSWORD not in str(e.value)


def test_basic_secrets_stay_hidden() -> None:
    assert PASSWORD not in repr(BASIC.password) and USER not in repr(vars(BASIC))


# -- tokens --------------------------------------------------------------------------------


def token(**keys: str) -> SharedToken:
    return SharedToken.from_config(table({"token": TOKEN, **keys}))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Relay-Token": TOKEN},
        {"x-relay-token": f"Bearer {TOKEN}"},
        {"X-Relay-Token": f"bearer   {TOKEN}"},
    ],
)
def test_token_in_a_header(headers: dict[str, str]) -> None:
    token(token_header="X-Relay-Token").verify(req(headers))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"X-Relay-Token": ""}, "missing"),
        ({"X-Relay-Token": "Bearer "}, "missing"),
        ({"X-Relay-Token": TOKEN + "x"}, "wrong"),
        ({"X-Relay-Token": TOKEN[:-1]}, "wrong"),
        ({"X-Relay-Token": f"Token {TOKEN}"}, "wrong"),
        ({"X-Relay-Token": "é" + TOKEN}, "wrong"),
        ({"Authorization": f"Bearer {TOKEN}"}, "missing"),  # another header
    ],
)
def test_token_header_rejections(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        token(token_header="X-Relay-Token").verify(req(headers))


def test_token_in_a_json_body_field() -> None:
    t = token(token_field="auth.token")
    t.verify(req({}, json.dumps({"auth": {"token": TOKEN}, "lead_id": "1"}).encode()))
    for body in [{"auth": {"token": "nope"}}, {"auth": {"token": 7}}, {"auth": TOKEN}, {}]:
        with pytest.raises(InvalidSignature):
            t.verify(req({}, json.dumps(body).encode()))
    for raw in [b"not json", b"[1]", b"\xff"]:
        with pytest.raises(InvalidSignature, match="missing"):
            t.verify(req({}, raw))


def test_token_in_a_form_body_field() -> None:
    t = token(token_field="token")
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
    t.verify(req(form, f"lead_id=42&token={TOKEN}".encode()))
    with pytest.raises(InvalidSignature, match="wrong"):
        t.verify(req(form, b"lead_id=42&token=guess"))
    with pytest.raises(InvalidSignature, match="missing"):
        t.verify(req(form, b"lead_id=42"))


def test_a_json_body_token_is_removed_after_verifying() -> None:
    t = token(token_field="auth.token")
    body = {"lead_id": "1", "auth": {"token": TOKEN, "kind": "shared"}, "name": "Zoë"}
    request = req({}, json.dumps(body).encode())
    t.verify(request)
    kept = t.without_token(request)
    assert json.loads(kept.body) == {"lead_id": "1", "auth": {"kind": "shared"}, "name": "Zoë"}
    assert TOKEN.encode() not in kept.body
    assert kept.headers == request.headers and kept.received_at == request.received_at
    # A repeated key is read as its last value; written again, no copy of it is left.
    twice = f'{{"token": "{TOKEN}", "id": 1, "token": "{TOKEN}"}}'.encode()
    flat = token(token_field="token")
    flat.verify(req({}, twice))
    assert json.loads(flat.without_token(req({}, twice)).body) == {"id": 1}
    # A lone surrogate escape survives, escaped.
    odd = json.dumps({"token": TOKEN, "text": "\ud800"}).encode()
    assert json.loads(flat.without_token(req({}, odd)).body) == {"text": "\ud800"}


def test_a_form_body_token_is_removed_and_the_rest_kept_byte_for_byte() -> None:
    t = token(token_field="token")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    raw = f"lead_id=42&token=guess&name=J%C3%B6rg+R&%74oken={TOKEN}&t=1".encode()
    request = req(form, raw)
    t.verify(request)  # the last value of a repeated field counts, as the provider reads it
    assert t.without_token(request).body == b"lead_id=42&name=J%C3%B6rg+R&t=1"


def test_a_header_token_leaves_the_body_alone() -> None:
    t = token(token_header="X-Relay-Token")
    request = req({"X-Relay-Token": TOKEN}, b'{"token": "not the credential"}')
    assert t.without_token(request) is request


@pytest.mark.parametrize(
    ("keys", "key"),
    [
        ({}, "token_header"),
        ({"token_header": "X-T", "token_field": "token"}, "token_header"),
        ({"token_header": ""}, "token_header"),
        ({"token_header": "  "}, "token_header"),
        ({"token_field": ""}, "token_field"),
    ],
)
def test_token_config(keys: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        token(**keys)
    assert e.value.key == f"sources.crm.{key}"
    assert TOKEN not in str(e.value)


def test_token_is_required() -> None:
    with pytest.raises(ConfigError) as e:
        SharedToken.from_config(table({"token_header": "X-T"}))
    assert e.value.key == "sources.crm.token"


# -- how a source picks its verifier -------------------------------------------------------


def test_signature_is_the_default() -> None:
    provider, verifier = build_source_parts("stripe", table({"secret": "whsec_x"}))
    assert isinstance(provider, StripeProvider) and verifier is provider


def test_basic_and_token_make_signing_keys_optional() -> None:
    provider, verifier = build_source_parts(
        "hmac", table({"verify": "basic", "username": USER, "password": PASSWORD})
    )
    assert isinstance(provider, HmacProvider) and isinstance(verifier, BasicAuth)
    provider, verifier = build_source_parts(
        "stripe", table({"verify": "token", "token": TOKEN, "token_header": "X-T"})
    )
    assert isinstance(provider, StripeProvider) and isinstance(verifier, SharedToken)


def test_verify_false_must_be_explicit() -> None:
    provider, verifier = build_source_parts("hmac", table({"verify": False}))
    assert isinstance(provider, HmacProvider) and verifier is None
    with pytest.raises(ConfigError) as e:
        build_source_parts("hmac", table({}))  # no verify key: the signature, so a secret
    assert e.value.key == "sources.crm.secret"


@pytest.mark.parametrize(
    ("provider", "data", "key"),
    [
        ("hmac", {"verify": "none"}, "verify"),
        ("hmac", {"verify": True}, "verify"),
        ("hmac", {"verify": "basic", "username": USER}, "password"),
        ("hmac", {"verify": "token", "token": TOKEN}, "token_header"),
        ("mystery", {}, "provider"),
    ],
)
def test_bad_verify_config(provider: str, data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_source_parts(provider, table(data))
    assert e.value.key == f"sources.crm.{key}"
