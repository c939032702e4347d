"""HubSpot: `X-HubSpot-Signature-v3` over method + URI + body + timestamp; arrays of events.

HubSpot signs the URL it called, so behind a proxy the relay must be told that URL
(``public_url``): the request line it sees (``http://127.0.0.1:8000/...``) is not what HubSpot
signed. The query string is the one exception: proxies pass it through unchanged, so it is taken
from the request when ``public_url`` has none, and a ``public_url`` that holds one is used as is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
from typing import Any

from relay.errors import InvalidBody, InvalidSignature
from relay.providers.base import (
    Provider,
    ProviderEvent,
    Sample,
    WebhookRequest,
    check_age,
    json_events,
    no_match,
)
from relay.providers.hmac import called_url, config_url
from relay.settings import ConfigTable, Secret

# HubSpot decodes these escapes in the URI before it signs (its "validating requests" page).
_DECODED = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_ESCAPE_RE = re.compile("|".join(_DECODED), re.IGNORECASE)

V3_HEADER = "x-hubspot-signature-v3"
TIMESTAMP_HEADER = "x-hubspot-request-timestamp"
LEGACY_HEADER = "x-hubspot-signature"  # v1 and v2
VERSION_HEADER = "x-hubspot-signature-version"


def signed_uri(url: str) -> str:
    """The URI as HubSpot puts it in the signed string."""
    return _ESCAPE_RE.sub(lambda m: _DECODED[m.group(0).upper()], url)


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    message = method.upper().encode() + signed_uri(uri).encode() + body + timestamp.encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign_v1(secret: str, body: bytes) -> str:
    return hashlib.sha256(secret.encode() + body).hexdigest()


def sign_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    message = secret.encode() + method.upper().encode() + uri.encode() + body
    return hashlib.sha256(message).hexdigest()


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


class HubSpotProvider(Provider):
    kind = "hubspot"
    sample_types = (
        "contact.creation",
        "contact.propertyChange",
        "contact.deletion",
        "deal.creation",
        "deal.propertyChange",
    )

    def __init__(
        self,
        secrets: tuple[Secret, ...],
        public_url: str | None = None,
        version: int = 3,
        tolerance: float = 300.0,
    ):
        self.secrets = secrets
        self.public_url = public_url
        self.version = version
        self.tolerance = tolerance

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> HubSpotProvider:
        return cls(
            secrets=table.secrets("secret", ... if signed else ()),
            public_url=config_url(table, "public_url"),
            version=table.integer("signature_version", 3, min=1, max=3),
            tolerance=table.duration("tolerance", "5m"),
        )

    def uri(self, request_url: str) -> str:
        """The URL HubSpot called, before HubSpot's own decoding."""
        return called_url(self.public_url, request_url)

    def verify(self, request: WebhookRequest) -> None:
        if self.version == 3:
            self._verify_v3(request)
            return
        given = request.header(LEGACY_HEADER)
        if not given:
            raise InvalidSignature("missing X-HubSpot-Signature header")
        given = given.strip().lower()
        uri = self.uri(request.url)
        for secret in self.secrets:
            if self.version == 1:
                expected = sign_v1(secret.reveal(), request.body)
            else:
                expected = sign_v2(secret.reveal(), request.method, uri, request.body)
            if _same(expected, given):
                return
        raise InvalidSignature("no signature matches", no_match(len(self.secrets)))

    def _verify_v3(self, request: WebhookRequest) -> None:
        given = request.header(V3_HEADER)
        if not given:
            raise InvalidSignature("missing X-HubSpot-Signature-v3 header")
        timestamp = request.header(TIMESTAMP_HEADER)
        check_age(timestamp, request.received_at, self.tolerance, scale=1000.0)
        assert timestamp is not None  # check_age refuses a missing one
        uri = self.uri(request.url)
        for secret in self.secrets:
            expected = sign_v3(secret.reveal(), request.method, uri, request.body, timestamp)
            if _same(expected, given.strip()):
                return
        raise InvalidSignature("no signature matches", no_match(len(self.secrets)))

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        events = []
        for i, item in enumerate(json_events(request, "HubSpot")):
            event_id, event_type = item.get("eventId"), item.get("subscriptionType")
            if isinstance(event_id, bool) or not isinstance(event_id, int | str) or event_id == "":
                raise InvalidBody(f"event {i} has no eventId")
            if not isinstance(event_type, str) or not event_type:
                raise InvalidBody(f"event {i} has no subscriptionType")
            # eventId alone is not unique (HubSpot says so); with occurredAt it is.
            key = f"{event_id}:{item.get('occurredAt', '')}"
            events.append(ProviderEvent(key=key, type=event_type, data=item))
        return events

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        """Signs for the relay at ``url`` the way HubSpot would sign for ``public_url``."""
        events = sample_events(event_type or self.sample_types[0], now)
        body = json.dumps(events, separators=(",", ":")).encode()
        headers = {"content-type": "application/json"}
        if not self.secrets:
            return Sample(body=body, headers=headers)
        secret, uri = self.secrets[0].reveal(), self.uri(url)
        timestamp = str(int(now * 1000))
        headers[V3_HEADER] = sign_v3(secret, "POST", uri, body, timestamp)
        headers[TIMESTAMP_HEADER] = timestamp
        # HubSpot sends a legacy signature beside v3: v1 for webhook subscriptions.
        if self.version == 2:
            headers[LEGACY_HEADER] = sign_v2(secret, "POST", uri, body)
        else:
            headers[LEGACY_HEADER] = sign_v1(secret, body)
        headers[VERSION_HEADER] = f"v{2 if self.version == 2 else 1}"
        return Sample(body=body, headers=headers)


def sample_events(event_type: str, now: float) -> list[dict[str, Any]]:
    """A realistic HubSpot webhook body (one event) of that subscription type."""
    rng = random.Random()
    occurred = int(now * 1000) - rng.randint(200, 3000)
    event: dict[str, Any] = {
        "eventId": rng.randint(1_000_000_000, 4_000_000_000),
        "subscriptionId": 2_417_683,
        "portalId": 62_515,
        "appId": 1_160_452,
        "occurredAt": occurred,
        "subscriptionType": event_type,
        "attemptNumber": 0,
        "objectId": rng.randint(10_000_000_000, 99_999_999_999),
        "changeSource": "CRM_UI",
    }
    action = event_type.rsplit(".", 1)[-1]
    if action == "creation":
        event["changeFlag"] = "CREATED"
    elif action == "deletion":
        event["changeFlag"] = "DELETED"
    elif action == "propertyChange":
        name, value = (
            ("dealstage", "closedwon")
            if event_type.startswith("deal.")
            else ("lifecyclestage", "marketingqualifiedlead")
        )
        event.update(propertyName=name, propertyValue=value, sourceId="userId:52961447")
    return [event]
