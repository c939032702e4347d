"""Standard Webhooks: the shared vector, signatures made by the package, every malformed input."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from relay.config import ConfigTable
from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers.base import WebhookRequest
from relay.providers.standard import StandardProvider

# The vector every official Standard Webhooks library tests against (see PROVIDERS.md).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_700_000_000.0
URL = "http://127.0.0.1:8000/webhooks/crm"
OTHER_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


def make(**keys: Any) -> StandardProvider:
    table = {"provider": "standard", "secret": SECRET, **keys}
    return StandardProvider.from_config(ConfigTable(table, Path("relay.toml"), "sources.crm"))


def req(body: bytes, headers: dict[str, str], at: float = NOW) -> WebhookRequest:
    return WebhookRequest("POST", URL, {k.lower(): v for k, v in headers.items()}, body, at)


def signed(
    body: bytes,
    ts: float = NOW,
    secret: str = SECRET,
    msg_id: str = "msg_1",
    prefix: str = "webhook",
) -> dict[str, str]:
    """Headers as a sender makes them, with the package's own `sign`."""
    when = datetime.fromtimestamp(ts, tz=UTC)
    return {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(int(ts)),
        f"{prefix}-signature": Webhook(secret).sign(msg_id, when, body.decode()),
    }


BODY = json.dumps(
    {
        "type": "contact.created",
        "timestamp": "2023-11-14T22:13:20.000Z",
        "data": {"id": "con_1", "email": "jenny@example.com"},
    }
).encode()


def test_vector() -> None:
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIG,
    }
    make().verify(req(VECTOR_BODY, headers, at=VECTOR_TS + 10))


def test_vector_under_svix_header_names() -> None:
    headers = {"svix-id": MSG_ID, "svix-timestamp": str(VECTOR_TS), "svix-signature": VECTOR_SIG}
    make().verify(req(VECTOR_BODY, headers, at=VECTOR_TS))


def test_fresh_signature_made_by_the_package() -> None:
    p = make()
    request = req(BODY, signed(BODY, msg_id="msg_2Yx"))
    p.verify(request)
    [event] = p.parse(request)
    assert (event.key, event.type) == ("msg_2Yx", "contact.created")
    assert event.data["data"]["email"] == "jenny@example.com"


def test_svix_id_is_the_dedupe_key() -> None:
    request = req(BODY, signed(BODY, msg_id="msg_svix", prefix="svix"))
    make().verify(request)
    assert make().parse(request)[0].key == "msg_svix"


def test_several_signatures_one_matching() -> None:
    headers = signed(BODY)
    other = signed(BODY, secret=OTHER_SECRET)["webhook-signature"]
    headers["webhook-signature"] = f"{other} {headers['webhook-signature']}"
    make().verify(req(BODY, headers))


def test_rotation_and_secrets_without_prefix() -> None:
    p = make(secret=[OTHER_SECRET, SECRET.removeprefix("whsec_")])
    p.verify(req(BODY, signed(BODY)))
    p.verify(req(BODY, signed(BODY, secret=OTHER_SECRET)))


def test_unpadded_base64_secret_is_accepted() -> None:
    unpadded = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWQ"  # 25 bytes, padding dropped
    make(secret=unpadded).verify(req(BODY, signed(BODY, secret=unpadded)))


def broken(**changes: str | None) -> dict[str, str]:
    headers: dict[str, Any] = {**signed(BODY), **changes}
    return {k: v for k, v in headers.items() if v is not None}


GOOD_SIG = signed(BODY)["webhook-signature"]


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (BODY, signed(BODY, secret=OTHER_SECRET), "no signature matches"),
        (BODY.replace(b"con_1", b"con_2"), signed(BODY), "no signature matches"),
        (BODY, broken(**{"webhook-signature": "v1," + "A" + GOOD_SIG[4:]}), "no signature"),
        (BODY, broken(**{"webhook-id": "msg_other"}), "no signature matches"),
        (BODY, broken(**{"webhook-timestamp": str(int(NOW) + 1)}), "no signature matches"),
        (BODY, broken(**{"webhook-signature": "v1a," + GOOD_SIG[3:]}), "no signature matches"),
        (BODY, broken(**{"webhook-signature": None}), "missing"),
        (BODY, broken(**{"webhook-id": None}), "missing"),
        (BODY, broken(**{"webhook-timestamp": None}), "missing"),
        (BODY, broken(**{"webhook-signature": ""}), "missing"),
        (BODY, signed(BODY, ts=NOW - 301), "tolerance"),
        (BODY, signed(BODY, ts=NOW + 301), "tolerance"),
        (BODY, broken(**{"webhook-timestamp": "soon"}), "malformed timestamp"),
        (BODY, broken(**{"webhook-timestamp": "nan"}), "tolerance"),
        (BODY, broken(**{"webhook-timestamp": "1e400"}), "tolerance"),
        (BODY, broken(**{"webhook-signature": "v1"}), "malformed"),
        (BODY, broken(**{"webhook-signature": "garbage"}), "malformed"),
        (BODY, broken(**{"webhook-signature": "v1,a,b"}), "malformed"),
        (BODY, broken(**{"webhook-signature": "v1,abc"}), "malformed"),  # bad base64 padding
        (BODY, broken(**{"webhook-signature": "v1,!!!!"}), "no signature"),
        (BODY, broken(**{"webhook-signature": "v1 " + GOOD_SIG}), "malformed"),  # junk entry first
        (b"\xff\xfe" + BODY, signed(BODY), "not UTF-8"),
    ],
    ids=[
        "wrong-secret",
        "flipped-body",
        "flipped-signature",
        "other-id",
        "other-timestamp",
        "v1a-scheme",
        "no-signature",
        "no-id",
        "no-timestamp",
        "empty-signature",
        "stale",
        "future",
        "bad-timestamp",
        "nan-timestamp",
        "huge-timestamp",
        "no-comma",
        "garbage",
        "two-commas",
        "bad-padding",
        "junk-base64",
        "junk-entry",
        "not-utf8",
    ],
)
def test_rejections(body: bytes, headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        make().verify(req(body, headers))


def test_configured_tolerance_replaces_the_package_window() -> None:
    old = signed(BODY, ts=NOW - 1800)
    make(tolerance="1h").verify(req(BODY, old))
    with pytest.raises(InvalidSignature, match="tolerance"):
        make(tolerance="1m").verify(req(BODY, signed(BODY, ts=NOW - 90)))


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"not json", signed(b"not json"), "not JSON"),
        (b"[]", signed(b"[]"), "JSON object"),
        (b'{"data": {}}', signed(b'{"data": {}}'), "no type"),
        (b'{"type": 3}', signed(b'{"type": 3}'), "no type"),
        (b'{"type": ""}', signed(b'{"type": ""}'), "no type"),
        (BODY, {}, "missing webhook-id"),
    ],
)
def test_bad_bodies(body: bytes, headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidBody, match=reason):
        make().parse(req(body, headers))


@pytest.mark.parametrize("kind", [None, *StandardProvider.sample_types])
def test_sample_verifies_with_the_same_provider(kind: str | None) -> None:
    p = make()
    sample = p.sample(kind, URL, NOW)
    request = req(sample.body, sample.headers, at=NOW + 1)
    p.verify(request)
    [event] = p.parse(request)
    assert event.key == sample.headers["webhook-id"]
    assert event.type == (kind or "contact.created")
    assert set(event.data) == {"type", "timestamp", "data"}


def test_sample_verifies_with_the_package_itself() -> None:
    now = time.time()
    sample = make().sample("deal.won", URL, now)
    payload = Webhook(SECRET).verify(sample.body, sample.headers)
    assert payload["type"] == "deal.won" and payload["data"]["stage"] == "closed_won"


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("whsec_", "secret"),
        ("whsec_!!!!not-base64", "secret"),
        ("whsec_abcde", "secret"),  # 5 base64 characters cannot be decoded
        ([SECRET, "whsec_%%%"], "secret"),
        (3, "secret"),
    ],
)
def test_bad_secret_is_a_config_error(secret: Any, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(secret=secret)
    assert e.value.key == f"sources.crm.{key}"
    assert "not-base64" not in str(e.value) and "%%%" not in str(e.value)


def test_bad_tolerance_and_missing_secret() -> None:
    with pytest.raises(ConfigError) as e:
        make(tolerance="forever")
    assert e.value.key == "sources.crm.tolerance"
    with pytest.raises(ConfigError) as e:
        StandardProvider.from_config(ConfigTable({}, Path("relay.toml"), "sources.crm"))
    assert e.value.key == "sources.crm.secret"
    unsigned = StandardProvider.from_config(ConfigTable({}, Path("relay.toml"), "s.c"), False)
    assert set(unsigned.sample(None, URL, NOW).headers) == {"content-type"}


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("contact.created", ["lead_created"]),
        ("contact.updated", []),
        ("deal.created", ["deal_created"]),
        ("deal.won", ["deal_won"]),
        ("deal.lost", ["deal_lost"]),
        ("invoice.paid", ["invoice_paid"]),
    ],
)
def test_samples_map_with_the_shipped_mapping(kind: str, names: list[str]) -> None:
    """What `relay send-test` posts makes events with mappings/standard.toml."""
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).resolve().parent.parent / "mappings" / "standard.toml")
    sample = make().sample(kind, URL, NOW)
    request = req(sample.body, sample.headers)
    [event] = make().parse(request)
    result = mapping.apply(event, "crm", request.headers)
    assert not result.failures
    assert [m.event.name for m in result.outputs] == names
    if kind == "contact.created":
        [out] = result.outputs
        assert out.event.visitor_id == event.data["data"]["visitor_id"]
