"""Mailgun: hex HMAC-SHA256(signing key, timestamp + token), carried inside the body.

Two shapes arrive. JSON webhooks hold a ``signature`` block and one ``event-data`` object.
Legacy webhooks are forms (urlencoded or multipart) whose flat fields are the event, with
``timestamp``, ``token`` and ``signature`` among them.

Mailgun signs timestamp and token only, never the event, so a signature block lifted from one
webhook verifies on any body while its timestamp is fresh. A retry by Mailgun resends the same
token with the same event, and the dedupe layer answers it 200 as a duplicate: a repeated
token is therefore not refused as such (that would lose retried events). A token that comes
back vouching for a *different* event is a forgery: each event carries its token
(:class:`~relay.providers.base.Token`) and the store, which keeps the ledger for every worker
and across restarts, refuses it there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from secrets import token_hex, token_urlsafe
from typing import Any

from relay.errors import ConfigError, InvalidBody, InvalidSignature
from relay.providers.base import (
    Provider,
    ProviderEvent,
    Sample,
    Token,
    WebhookRequest,
    check_age,
    json_body,
    no_match,
)
from relay.providers.forms import MULTIPART, URLENCODED, FormError, parse_form
from relay.settings import ConfigTable, Secret

FORM_TYPES = (URLENCODED, MULTIPART)
SIGNATURE_FIELDS = frozenset({"timestamp", "token", "signature", "parent-signature"})


def sign(key: str, timestamp: str, token: str) -> str:
    """The signature Mailgun computes: hex HMAC-SHA256 of timestamp + token."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _Webhook:
    """A decoded body: where the signature fields are and what the event is."""

    signature: Mapping[str, Any] | None  # None: the JSON body has no signature block
    event: Any  # event-data (JSON) or the flat form fields (legacy); checked by _event
    legacy: bool


class MailgunProvider(Provider):
    kind = "mailgun"
    sample_types = (
        "delivered",
        "opened",
        "clicked",
        "unsubscribed",
        "failed",
        "complained",
        "accepted",
    )

    def __init__(
        self,
        secrets: tuple[Secret, ...],
        tolerance: float = 900.0,
        *,
        config_file: str | None = None,
        secret_key: str = "secret",
        signed: bool = True,
    ):
        self.secrets = secrets
        self.tolerance = tolerance
        self.signed = signed  # verify() checks the signature: tokens are bound to events
        self._config_file = config_file  # where `secret` would be set, for send-test's error
        self._secret_key = secret_key

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> MailgunProvider:
        return cls(
            table.secrets("secret", ... if signed else ()),
            table.duration("tolerance", "15m"),
            config_file=str(table.file),
            secret_key=table.key("secret"),
            signed=signed,
        )

    def verify(self, request: WebhookRequest) -> None:
        hook = _decode(request, only=SIGNATURE_FIELDS)
        sig = hook.signature
        if sig is None:
            raise InvalidSignature("missing signature block")
        timestamp, token = _text(sig.get("timestamp")), _text(sig.get("token"))
        # `parent-signature` is the same HMAC under the parent account's key (subaccounts).
        given = [sig.get("signature"), sig.get("parent-signature")]
        offered = [g.strip().lower().encode() for g in given if isinstance(g, str) and g]
        if timestamp is None or token is None or not offered:
            raise InvalidSignature("missing signature: timestamp, token and signature must be set")
        expected = [sign(s.reveal(), timestamp, token).encode() for s in self.secrets]
        # Compare every pair, so the time taken says nothing about which one matched.
        ok = [hmac.compare_digest(e, o) for e in expected for o in offered]
        if not any(ok):
            raise InvalidSignature("no signature matches", no_match(len(self.secrets)))
        check_age(timestamp, request.received_at, self.tolerance)

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        hook = _decode(request)
        key, event_type, data = _event(hook)
        token = self._token(hook) if self.signed else None
        return [ProviderEvent(key=key, type=event_type, data=data, token=token)]

    def _token(self, hook: _Webhook) -> Token | None:
        """The verified token, bound to the event by the store until it is too old anyway."""
        sig = hook.signature or {}
        timestamp, token = _text(sig.get("timestamp")), _text(sig.get("token"))
        if timestamp is None or token is None:
            return None
        try:
            return Token(token, float(timestamp) + self.tolerance)
        except ValueError:
            return None

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        if not self.secrets:
            raise ConfigError(self._config_file, self._secret_key, "is needed to sign samples")
        timestamp, token = str(int(now)), token_hex(25)
        body = {
            "signature": {
                "timestamp": timestamp,
                "token": token,
                "signature": sign(self.secrets[0].reveal(), timestamp, token),
            },
            "event-data": sample_event(event_type or self.sample_types[0], now),
        }
        return Sample(
            body=json.dumps(body, separators=(",", ":")).encode(),
            headers={"content-type": "application/json"},
        )


def _text(value: Any) -> str | None:
    """A signature field as Mailgun signed it: the docs show strings, and say `int`."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _decode(request: WebhookRequest, only: frozenset[str] | None = None) -> _Webhook:
    """The webhook's signature block and event; of a form, with `only`, just those fields."""
    kind = request.content_type
    if kind == "application/json":
        body = json_body(request)
        if not isinstance(body, dict):
            raise InvalidBody("a Mailgun webhook is a JSON object")
        signature = body.get("signature")
        block = signature if isinstance(signature, dict) else None
        return _Webhook(block, body.get("event-data"), legacy=False)
    if kind in FORM_TYPES:
        fields = form_fields(request, only)
        return _Webhook(fields, fields, legacy=True)
    raise InvalidBody(f"Mailgun posts JSON or forms, not {kind or 'a body without a content type'}")


def _event(hook: _Webhook) -> tuple[str, str, Mapping[str, Any]]:
    """(dedupe key, type, data) of a decoded webhook, or InvalidBody."""
    event = hook.event
    if not isinstance(event, dict):
        raise InvalidBody("the webhook has no event-data object")
    event_type = event.get("event")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidBody("the event has no `event` type")
    if hook.legacy:
        # The form's token is unique per webhook and kept by Mailgun's retries: the one id
        # that tells apart two events of a message (opened twice) and matches a retry to its
        # first try. Message-Id names the message, not the event, so it cannot be the key.
        token, timestamp = event.get("token"), event.get("timestamp")
        if not token or not timestamp:
            raise InvalidBody("the form has no token or timestamp")
        return f"{token}:{timestamp}", event_type, event
    # event-data.id is only unique within a day; with the event's timestamp it is unique.
    event_id, timestamp = event.get("id"), event.get("timestamp")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidBody("the event has no id")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float | str) or not timestamp:
        raise InvalidBody("the event has no timestamp")
    stamp = timestamp if isinstance(timestamp, str) else json.dumps(timestamp)
    return f"{event_id}:{stamp}", event_type, event


def form_fields(request: WebhookRequest, only: frozenset[str] | None = None) -> dict[str, str]:
    """The fields of a urlencoded or multipart form; a repeated field keeps its last value.

    The form is parsed before its signature is checked, by a parser made for that (bounded,
    linear, never recursive: relay/providers/forms.py); verify() decodes the signature fields
    alone, the rest is decoded once they match."""
    try:
        return parse_form(request.header("content-type") or "", request.body, only)
    except FormError as e:
        raise InvalidBody(f"malformed form: {e}") from None


def _id(size: int = 22) -> str:
    return token_urlsafe(size)[:size]


def sample_event(event_type: str, now: float) -> dict[str, Any]:
    """A realistic Mailgun `event-data` object of that type."""
    recipient = "alice@example.com"
    domain = "mg.example.com"
    message_id = f"20240501{uuid.uuid4().hex[:16]}.{uuid.uuid4().hex[:8]}@{domain}"
    event: dict[str, Any] = {
        "id": _id(),
        "timestamp": round(now, 6),
        "log-level": "info",
        "event": event_type,
        "recipient": recipient,
        "recipient-domain": "example.com",
        "message": {
            "headers": {
                "to": f"Alice <{recipient}>",
                "message-id": message_id,
                "from": f"Example <news@{domain}>",
                "subject": "Our spring release",
            },
            "attachments": [],
            "size": 18432,
        },
        "tags": ["newsletter", "spring-release"],
        "campaigns": [],
        "user-variables": {"visitor_id": str(uuid.uuid4()), "campaign_id": "spring-2024"},
        "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
    }
    client = {
        "geolocation": {"country": "US", "region": "CA", "city": "San Francisco"},
        "ip": "203.0.113.7",
        "client-info": {
            "client-type": "browser",
            "client-os": "macOS",
            "device-type": "desktop",
            "client-name": "Firefox",
            "user-agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.4; rv:125.0) "
            "Gecko/20100101 Firefox/125.0",
        },
    }
    if event_type == "delivered":
        event["envelope"] = {"transport": "smtp", "sender": f"news@{domain}", "targets": recipient}
        event["delivery-status"] = {
            "tls": True,
            "mx-host": "mx.example.com",
            "code": 250,
            "description": "",
            "message": "OK",
            "attempt-no": 1,
            "session-seconds": 0.433,
            "certificate-verified": True,
        }
    elif event_type in ("opened", "clicked", "unsubscribed"):
        event.update(client)
        if event_type == "clicked":
            event["url"] = "https://example.com/pricing?utm_source=newsletter"
    elif event_type == "failed":
        event["severity"] = "permanent"
        event["reason"] = "bounce"
        event["envelope"] = {"transport": "smtp", "sender": f"news@{domain}", "targets": recipient}
        event["delivery-status"] = {
            "mx-host": "mx.example.com",
            "code": 550,
            "description": "",
            "message": "5.1.1 The email account that you tried to reach does not exist.",
            "attempt-no": 1,
            "session-seconds": 0.12,
        }
    elif event_type == "accepted":
        event["method"] = "HTTP"
        event["envelope"] = {"transport": "smtp", "sender": f"news@{domain}", "targets": recipient}
    return event
