"""Standard Webhooks (and Svix): `webhook-id/-timestamp/-signature`, one event per webhook.

The `standardwebhooks` package checks the signature. Its age check is fixed at five minutes
of wall-clock time; the relay checks the age itself, against the configured tolerance and the
time the request was received, and turns the package's own check off.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from relay.errors import InvalidBody, InvalidSignature
from relay.providers.base import (
    Provider,
    ProviderEvent,
    Sample,
    WebhookRequest,
    check_age,
    json_body,
    no_match,
)
from relay.settings import ConfigTable, Secret

HEADERS = ("id", "timestamp", "signature")
PREFIX = "whsec_"


class _Webhook(Webhook):
    """The package's verification without its wall-clock age check (the caller checks age)."""

    def _Webhook__verify_timestamp(self, timestamp_header: str) -> datetime:
        return datetime.fromtimestamp(float(timestamp_header), tz=UTC)


def _key_text(secret: str) -> str:
    return secret[len(PREFIX) :] if secret.startswith(PREFIX) else secret


def valid_secret(secret: str) -> bool:
    """True for `whsec_` + (padded or unpadded) standard base64 of at least one byte."""
    key = _key_text(secret)
    try:
        return bool(base64.b64decode(key + "=" * (-len(key) % 4), validate=True))
    except (binascii.Error, ValueError):
        return False


def sender_headers(request: WebhookRequest) -> dict[str, str]:
    """The three signature headers, named `webhook-*`, whether sent as `webhook-*` or `svix-*`."""
    scheme = "webhook" if any(request.header(f"webhook-{h}") for h in HEADERS) else "svix"
    return {f"webhook-{h}": request.header(f"{scheme}-{h}") or "" for h in HEADERS}


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """A webhook-signature value, made by the package as a sender makes it."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    signature: str = Webhook(secret).sign(msg_id, when, body.decode())
    return signature


class StandardProvider(Provider):
    kind = "standard"
    sample_types = (
        "contact.created",
        "contact.updated",
        "deal.created",
        "deal.won",
        "deal.lost",
        "invoice.paid",
    )

    def __init__(self, secrets: tuple[Secret, ...], tolerance: float = 300.0):
        self.secrets = secrets
        self.tolerance = tolerance

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> StandardProvider:
        secrets = table.secrets("secret", ... if signed else ())
        for secret in secrets:
            if not valid_secret(secret.reveal()):
                table.fail("secret", "must be 'whsec_' followed by base64 (as the sender shows it)")
        return cls(secrets, table.duration("tolerance", "5m"))

    def verify(self, request: WebhookRequest) -> None:
        headers = sender_headers(request)
        if not all(headers.values()):
            raise InvalidSignature("missing webhook-id, -timestamp or -signature header")
        check_age(headers["webhook-timestamp"], request.received_at, self.tolerance)
        reason = "no signature matches"
        for secret in self.secrets:
            try:
                _Webhook(secret.reveal()).verify(request.body, headers, json_parse=False)
                return
            except WebhookVerificationError:
                reason = "no signature matches"
            except UnicodeDecodeError:
                raise InvalidSignature("body is not UTF-8: it cannot carry a signature") from None
            except Exception:  # the package raises bare ValueError, binascii.Error, ... on junk
                reason = "malformed webhook-signature header"
        raise InvalidSignature(
            reason, no_match(len(self.secrets)) if reason == "no signature matches" else None
        )

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        msg_id = sender_headers(request)["webhook-id"]
        if not msg_id:
            raise InvalidBody("missing webhook-id header (the event id)")
        body = json_body(request)
        if not isinstance(body, dict):
            raise InvalidBody("a Standard Webhooks payload is a JSON object")
        event_type = body.get("type")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidBody("the payload has no type")
        return [ProviderEvent(key=msg_id, type=event_type, data=body)]

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        payload = sample_payload(event_type or self.sample_types[0], now)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"content-type": "application/json"}
        if self.secrets:
            msg_id = f"msg_{uuid.uuid4().hex[:27]}"
            headers["webhook-id"] = msg_id
            headers["webhook-timestamp"] = str(int(now))
            headers["webhook-signature"] = sign(self.secrets[0].reveal(), msg_id, int(now), body)
        return Sample(body=body, headers=headers)


def sample_payload(event_type: str, now: float) -> dict[str, Any]:
    """A realistic payload of a CRM that sends Standard Webhooks: `type`, `timestamp`, `data`."""
    when = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds")
    contact = f"con_{uuid.uuid4().hex[:20]}"
    data: dict[str, Any]
    if event_type.startswith("contact."):
        data = {
            "id": contact,
            "email": "jenny.rosen@example.com",
            "first_name": "Jenny",
            "last_name": "Rosen",
            "company": "Rosen Analytics",
            "source": "website_form",
            "owner_id": "usr_2f9c1b7a",
            "visitor_id": str(uuid.uuid4()),
            "page_url": "https://example.com/demo",
            "created_at": when,
        }
    elif event_type.startswith("deal."):
        stage = {"won": "closed_won", "lost": "closed_lost"}.get(event_type[5:], "qualification")
        data = {
            "id": f"deal_{uuid.uuid4().hex[:20]}",
            "name": "Rosen Analytics - annual plan",
            "amount": 12000,
            "currency": "usd",
            "stage": stage,
            "pipeline": "sales",
            "contact_id": contact,
            "owner_id": "usr_2f9c1b7a",
            "closed_at": when if stage.startswith("closed") else None,
        }
        if stage == "closed_lost":
            data["lost_reason"] = "budget"
    elif event_type.startswith("invoice."):
        data = {
            "id": f"inv_{uuid.uuid4().hex[:20]}",
            "number": "INV-2024-0042",
            "amount_paid": 149900,
            "currency": "usd",
            "contact_id": contact,
            "status": "paid",
            "paid_at": when,
        }
    else:
        data = {"id": f"obj_{uuid.uuid4().hex[:20]}", "created_at": when}
    return {"type": event_type, "timestamp": when, "data": data}
