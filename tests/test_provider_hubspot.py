"""HubSpot: public vectors, the signed URI behind a proxy, rejections, event splitting."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigTable
from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers.base import WebhookRequest
from relay.providers.hubspot import HubSpotProvider, signed_uri

# hubspot-api-python's test vectors (see PROVIDERS.md).
SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
VECTOR_BODY = b"{'example_field':'example_value'}"
VECTOR_URL = "https://www.example.com/webhook_uri"
VECTOR_TS = "15000000"  # milliseconds
V1 = "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"
V2 = "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"
V3 = "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
# HubSpot's v1 documentation example, with a real event array.
DOC_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)
DOC_V1 = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"

RELAY_URL = "http://127.0.0.1:8000/webhooks/hubspot"
NOW = 1_700_000_000.0


def make(**keys: Any) -> HubSpotProvider:
    table = {"provider": "hubspot", "secret": SECRET, **keys}
    return HubSpotProvider.from_config(ConfigTable(table, Path("relay.toml"), "sources.hubspot"))


def req(
    body: bytes,
    headers: dict[str, str],
    *,
    url: str = RELAY_URL,
    at: float = NOW,
    method: str = "POST",
) -> WebhookRequest:
    return WebhookRequest(method, url, {k.lower(): v for k, v in headers.items()}, body, at)


def v3(body: bytes, uri: str, ts: str, secret: str = SECRET, method: str = "POST") -> str:
    """Signed here as HubSpot documents it, independently of the provider's code."""
    message = f"{method}{uri}".encode() + body + ts.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def v3_headers(body: bytes, uri: str, ts: int, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-HubSpot-Signature-v3": v3(body, uri, str(ts), secret),
        "X-HubSpot-Request-Timestamp": str(ts),
    }


def event(**fields: Any) -> dict[str, Any]:
    return {
        "eventId": 100,
        "subscriptionId": 7,
        "portalId": 62515,
        "appId": 54321,
        "occurredAt": 1_699_999_999_000,
        "subscriptionType": "contact.creation",
        "attemptNumber": 0,
        "objectId": 123,
        "changeSource": "CRM",
        **fields,
    }


# -- public vectors ------------------------------------------------------------------------


def test_v3_vector() -> None:
    headers = {"X-HubSpot-Signature-v3": V3, "X-HubSpot-Request-Timestamp": VECTOR_TS}
    make().verify(req(VECTOR_BODY, headers, url=VECTOR_URL, at=15_000.0))


def test_v3_vector_behind_a_proxy_uses_public_url() -> None:
    headers = {"X-HubSpot-Signature-v3": V3, "X-HubSpot-Request-Timestamp": VECTOR_TS}
    make(public_url=VECTOR_URL).verify(req(VECTOR_BODY, headers, url=RELAY_URL, at=15_000.0))
    with pytest.raises(InvalidSignature, match="no signature matches"):
        make().verify(req(VECTOR_BODY, headers, url=RELAY_URL, at=15_000.0))


def test_v1_vectors() -> None:
    p = make(signature_version=1)
    p.verify(req(VECTOR_BODY, {"X-HubSpot-Signature": V1}))
    p.verify(req(DOC_BODY, {"X-HubSpot-Signature": DOC_V1, "X-HubSpot-Signature-Version": "v1"}))
    [e] = p.parse(req(DOC_BODY, {}))
    assert (e.key, e.type, e.data["objectId"]) == ("1:1564113600000", "contact.creation", 123)
    with pytest.raises(InvalidSignature):
        p.verify(req(DOC_BODY, {"X-HubSpot-Signature": V1}))


def test_v2_vector() -> None:
    p = make(signature_version=2)
    p.verify(req(VECTOR_BODY, {"X-HubSpot-Signature": V2}, url=VECTOR_URL))
    with pytest.raises(InvalidSignature):
        p.verify(req(VECTOR_BODY, {"X-HubSpot-Signature": V2}, url=VECTOR_URL + "?x=1"))


def test_v3_is_the_default_and_ignores_legacy_signatures() -> None:
    with pytest.raises(InvalidSignature, match="missing X-HubSpot-Signature-v3"):
        make().verify(req(VECTOR_BODY, {"X-HubSpot-Signature": V1}))


# -- the signed URI ------------------------------------------------------------------------


def test_query_string_of_the_request_is_appended_to_public_url() -> None:
    p = make(public_url="https://hooks.example.com/webhooks/hubspot")
    body = json.dumps([event()]).encode()
    signed = "https://hooks.example.com/webhooks/hubspot?portal=62515&x=1"
    headers = v3_headers(body, signed, int(NOW * 1000))
    p.verify(req(body, headers, url=RELAY_URL + "?portal=62515&x=1"))
    with pytest.raises(InvalidSignature):
        p.verify(req(body, headers, url=RELAY_URL + "?portal=62515&x=2"))


def test_public_url_with_a_query_string_is_used_as_is() -> None:
    pinned = "https://hooks.example.com/in?tenant=acme"
    p = make(public_url=pinned)
    body = json.dumps([event()]).encode()
    headers = v3_headers(body, pinned, int(NOW * 1000))
    p.verify(req(body, headers, url=RELAY_URL + "?whatever=1"))


def test_escapes_hubspot_decodes_before_signing() -> None:
    received = "https://hooks.example.com/in?next=https%3A%2F%2Fx.example%2Fa%3Fb%3Dc%40d%2a%2C"
    # HubSpot signs with those escapes decoded, except %3D which it leaves alone.
    signed = "https://hooks.example.com/in?next=https://x.example/a?b%3Dc@d*,"
    assert signed_uri(received) == signed
    body = json.dumps([event()]).encode()
    make().verify(req(body, v3_headers(body, signed, int(NOW * 1000)), url=received))
    assert signed_uri("%21%24%27%28%29%3B") == "!$'();"


def test_wrong_url_or_method_is_refused() -> None:
    body = json.dumps([event()]).encode()
    headers = v3_headers(body, "https://hooks.example.com/other", int(NOW * 1000))
    with pytest.raises(InvalidSignature, match="no signature matches"):
        make(public_url="https://hooks.example.com/in").verify(req(body, headers))
    headers = v3_headers(body, RELAY_URL, int(NOW * 1000))
    make().verify(req(body, headers))
    with pytest.raises(InvalidSignature):
        make().verify(req(body, headers, method="PUT"))


# -- rejections ----------------------------------------------------------------------------

BODY = json.dumps([event()]).encode()
GOOD = v3_headers(BODY, RELAY_URL, int(NOW * 1000))


def test_fresh_signature_verifies() -> None:
    make().verify(req(BODY, GOOD))


def test_rotation() -> None:
    p = make(secret=["new-client-secret", SECRET])
    p.verify(req(BODY, GOOD))
    p.verify(req(BODY, v3_headers(BODY, RELAY_URL, int(NOW * 1000), "new-client-secret")))


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (BODY, v3_headers(BODY, RELAY_URL, int(NOW * 1000), "other-secret"), "no signature"),
        (BODY.replace(b"100", b"101"), GOOD, "no signature"),
        (
            BODY,
            {**GOOD, "X-HubSpot-Signature-v3": "A" + GOOD["X-HubSpot-Signature-v3"][1:]},
            "no signature",
        ),
        (BODY, {**GOOD, "X-HubSpot-Signature-v3": "not base64 é"}, "no signature"),
        (BODY, {"X-HubSpot-Request-Timestamp": GOOD["X-HubSpot-Request-Timestamp"]}, "missing X"),
        (BODY, {"X-HubSpot-Signature-v3": GOOD["X-HubSpot-Signature-v3"]}, "missing timestamp"),
        (BODY, {**GOOD, "X-HubSpot-Request-Timestamp": "yesterday"}, "malformed timestamp"),
        (BODY, v3_headers(BODY, RELAY_URL, int((NOW - 301) * 1000)), "tolerance"),
        (BODY, v3_headers(BODY, RELAY_URL, int((NOW + 301) * 1000)), "tolerance"),
        # seconds where milliseconds are due: 1970, refused as stale
        (BODY, v3_headers(BODY, RELAY_URL, int(NOW)), "tolerance"),
    ],
    ids=[
        "wrong-secret",
        "flipped-body",
        "flipped-signature",
        "junk-signature",
        "no-signature",
        "no-timestamp",
        "bad-timestamp",
        "stale",
        "future",
        "seconds",
    ],
)
def test_rejections(body: bytes, headers: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        make().verify(req(body, headers))


def test_tolerance_is_configurable() -> None:
    old = v3_headers(BODY, RELAY_URL, int((NOW - 600) * 1000))
    make(tolerance="15m").verify(req(BODY, old))
    with pytest.raises(InvalidSignature, match="tolerance"):
        make().verify(req(BODY, old))


def test_timestamp_is_signed() -> None:
    headers = {**GOOD, "X-HubSpot-Request-Timestamp": str(int(NOW * 1000) + 1)}
    with pytest.raises(InvalidSignature, match="no signature"):
        make().verify(req(BODY, headers))


# -- events --------------------------------------------------------------------------------


def test_parse_splits_the_array() -> None:
    items = [
        event(),
        event(
            eventId=101,
            subscriptionType="deal.propertyChange",
            objectId=9,
            propertyName="dealstage",
            propertyValue="closedwon",
        ),
        event(eventId=100, occurredAt=1_699_999_999_500),  # same eventId, another moment
    ]
    events = make().parse(req(json.dumps(items).encode(), {}))
    assert [(e.key, e.type) for e in events] == [
        ("100:1699999999000", "contact.creation"),
        ("101:1699999999000", "deal.propertyChange"),
        ("100:1699999999500", "contact.creation"),
    ]
    assert events[1].data["propertyValue"] == "closedwon"
    assert make().parse(req(b"[]", {})) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (json.dumps(event()).encode(), "JSON array"),
        (b"[1]", "event 0 is not an object"),
        (json.dumps([event(), {"subscriptionType": "x"}]).encode(), "event 1 has no eventId"),
        (json.dumps([event(eventId=True)]).encode(), "no eventId"),
        (json.dumps([event(eventId="")]).encode(), "no eventId"),
        (json.dumps([{"eventId": 1}]).encode(), "no subscriptionType"),
        (json.dumps([event(subscriptionType=3)]).encode(), "no subscriptionType"),
    ],
)
def test_bad_bodies(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBody, match=reason):
        make().parse(req(body, {}))


# -- samples -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, *HubSpotProvider.sample_types])
def test_sample_verifies_with_the_same_provider(kind: str | None) -> None:
    p = make()
    sample = p.sample(kind, RELAY_URL, NOW)
    request = req(sample.body, sample.headers, at=NOW + 2)
    p.verify(request)
    [e] = p.parse(request)
    assert e.type == (kind or "contact.creation")
    assert e.data["portalId"] and e.data["objectId"]


def test_deal_stage_sample_is_closed_won() -> None:
    sample = make().sample("deal.propertyChange", RELAY_URL, NOW)
    [item] = json.loads(sample.body)
    assert (item["propertyName"], item["propertyValue"]) == ("dealstage", "closedwon")


def test_sample_signs_what_the_relay_will_check() -> None:
    p = make(public_url="https://hooks.example.com/webhooks/hubspot")
    sample = p.sample(None, RELAY_URL + "?t=1", NOW)
    p.verify(req(sample.body, sample.headers, url=RELAY_URL + "?t=1"))
    expected = v3(
        sample.body,
        "https://hooks.example.com/webhooks/hubspot?t=1",
        sample.headers["x-hubspot-request-timestamp"],
    )
    assert sample.headers["x-hubspot-signature-v3"] == expected


@pytest.mark.parametrize("version", [1, 2])
def test_legacy_samples(version: int) -> None:
    p = make(signature_version=version)
    sample = p.sample(None, RELAY_URL, NOW)
    assert sample.headers["x-hubspot-signature-version"] == f"v{version}"
    p.verify(req(sample.body, sample.headers))


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "key"),
    [
        ({"signature_version": 4}, "signature_version"),
        ({"signature_version": "v3"}, "signature_version"),
        ({"public_url": "hooks.example.com/in"}, "public_url"),
        ({"tolerance": "0s"}, "tolerance"),
        ({"secret": ""}, "secret"),
        ({"secret": [SECRET, 3]}, "secret"),
    ],
)
def test_bad_config_names_the_key(keys: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(**keys)
    assert e.value.key == f"sources.hubspot.{key}"
    assert SECRET not in str(e.value)


def test_secret_is_required_only_when_signing() -> None:
    with pytest.raises(ConfigError) as e:
        HubSpotProvider.from_config(ConfigTable({}, Path("relay.toml"), "sources.hubspot"))
    assert e.value.key == "sources.hubspot.secret"
    p = HubSpotProvider.from_config(ConfigTable({}, Path("relay.toml"), "sources.h"), signed=False)
    assert set(p.sample(None, RELAY_URL, NOW).headers) == {"content-type"}


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("contact.creation", ["lead_created"]),
        ("contact.propertyChange", []),
        ("contact.deletion", ["contact_deleted"]),
        ("deal.creation", ["deal_created"]),
        ("deal.propertyChange", ["deal_won"]),
    ],
)
def test_samples_map_with_the_shipped_mapping(kind: str, names: list[str]) -> None:
    """What `relay send-test` posts makes events with mappings/hubspot.toml."""
    from relay.mapping import load_mapping

    mapping = load_mapping(Path(__file__).resolve().parent.parent / "mappings" / "hubspot.toml")
    sample = make().sample(kind, RELAY_URL, NOW)
    request = req(sample.body, sample.headers)
    [event] = make().parse(request)
    result = mapping.apply(event, "hubspot", request.headers)
    assert not result.failures
    assert [m.event.name for m in result.outputs] == names
    for out in result.outputs:
        assert out.event.payload["portal_id"] == "62515"
