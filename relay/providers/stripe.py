"""Stripe: `Stripe-Signature` checked by the `stripe` package; one event per webhook."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import stripe

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


class StripeProvider(Provider):
    kind = "stripe"
    sample_types = (
        "checkout.session.completed",
        "invoice.paid",
        "invoice.payment_failed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "charge.refunded",
    )

    def __init__(self, secrets: tuple[Secret, ...], tolerance: float = 300.0):
        self.secrets = secrets
        self.tolerance = tolerance

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> StripeProvider:
        secrets = table.secrets("secret", ... if signed else ())
        tolerance: float = table.duration("tolerance", "300s")
        if tolerance < 1:
            # Stripe signs whole seconds: under 1 s a webhook sent now may already be too old.
            table.fail("tolerance", "must be at least 1s (Stripe timestamps are whole seconds)")
        return cls(secrets, tolerance)

    def verify(self, request: WebhookRequest) -> None:
        header = request.header("stripe-signature")
        if not header:
            raise InvalidSignature("missing Stripe-Signature header")
        try:
            payload = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidSignature(
                "body is not UTF-8, so it cannot carry a Stripe signature"
            ) from None
        reason = "no signature matches"
        for secret in self.secrets:
            try:
                # verify_header checks the HMAC; construct_event would also build Stripe
                # objects, at about 30 times the cost, for nothing we use. Its age check is
                # left off (tolerance=None): it looks only into the past, in whole seconds.
                stripe.WebhookSignature.verify_header(
                    payload, header, secret.reveal(), tolerance=None
                )
            except stripe.SignatureVerificationError as e:
                reason = _reason(str(e))
                continue
            except (ValueError, TypeError):
                reason = "malformed Stripe-Signature header"
                continue
            check_age(_timestamp(header), request.received_at, self.tolerance)
            return
        raise InvalidSignature(
            reason, no_match(len(self.secrets)) if reason == "no signature matches" else None
        )

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise InvalidBody("a Stripe event is a JSON object")
        event_id, event_type = body.get("id"), body.get("type")
        if not isinstance(event_id, str) or not event_id:
            raise InvalidBody("the event has no id")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidBody("the event has no type")
        return [ProviderEvent(key=event_id, type=event_type, data=body)]

    def sample(self, event_type: str | None, url: str, now: float) -> Sample:
        event = sample_event(event_type or self.sample_types[0], now)
        body = json.dumps(event, separators=(",", ":")).encode()
        return Sample(
            body=body,
            headers={
                "content-type": "application/json",
                "stripe-signature": sign(body, self.secrets[0].reveal(), int(now)),
            },
        )


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for body, as Stripe makes it."""
    ts = int(time.time()) if timestamp is None else timestamp
    header: str = stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=ts
    )
    return header


def _timestamp(header: str) -> str:
    """The signed `t=` value, read as the stripe package reads it (the first one counts)."""
    stamps = [item.split("=", 2) for item in header.split(",")]
    return str(int(next(item[1] for item in stamps if item[0] == "t")))


def _reason(message: str) -> str:
    text = message.lower()
    if "unable to extract" in text:
        return "malformed Stripe-Signature header"
    return "no signature matches"


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def sample_event(event_type: str, now: float | None = None) -> dict[str, Any]:
    """A realistic Stripe event body of that type (test mode)."""
    created = int(now if now is not None else time.time())
    customer = _id("cus")
    visitor = str(uuid.uuid4())
    obj: dict[str, Any]
    previous: dict[str, Any] | None = None
    if event_type.startswith("checkout.session."):
        obj = {
            "id": _id("cs_test"),
            "object": "checkout.session",
            "amount_subtotal": 4999,
            "amount_total": 4999,
            "currency": "usd",
            "customer": customer,
            "customer_details": {"email": "jenny.rosen@example.com", "name": "Jenny Rosen"},
            "customer_email": "jenny.rosen@example.com",
            "livemode": False,
            "metadata": {
                "visitor_id": visitor,
                "page_url": "https://example.com/pricing",
                "plan": "pro",
            },
            "mode": "payment",
            "payment_intent": _id("pi"),
            "payment_status": "paid",
            "status": "complete",
            "created": created,
        }
    elif event_type.startswith("invoice."):
        paid = event_type != "invoice.payment_failed"
        obj = {
            "id": _id("in"),
            "object": "invoice",
            "amount_due": 1499,
            "amount_paid": 1499 if paid else 0,
            "amount_remaining": 0 if paid else 1499,
            "attempt_count": 1,
            "billing_reason": "subscription_cycle",
            "currency": "usd",
            "customer": customer,
            "customer_email": "jenny.rosen@example.com",
            "number": "A1B2C3D4-0001",
            "paid": paid,
            "status": "paid" if paid else "open",
            "subscription": _id("sub"),
            "metadata": {"visitor_id": visitor},
            "created": created,
        }
    elif event_type.startswith("customer.subscription."):
        status = {"created": "active", "updated": "active", "deleted": "canceled"}.get(
            event_type.rsplit(".", 1)[-1], "active"
        )
        obj = {
            "id": _id("sub"),
            "object": "subscription",
            "customer": customer,
            "status": status,
            "cancel_at_period_end": False,
            "currency": "usd",
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": _id("si"),
                        "object": "subscription_item",
                        "price": {
                            "id": "price_1PqRsT2eZvKYlo2C",
                            "object": "price",
                            "nickname": "pro",
                            "unit_amount": 1499,
                            "currency": "usd",
                            "recurring": {"interval": "month", "interval_count": 1},
                        },
                        "quantity": 1,
                    }
                ],
            },
            "metadata": {"visitor_id": visitor},
            "created": created,
        }
        if event_type.endswith(".updated"):
            previous = {"status": "trialing"}
    elif event_type.startswith("charge."):
        obj = {
            "id": _id("ch"),
            "object": "charge",
            "amount": 4999,
            "amount_refunded": 4999,
            "currency": "usd",
            "customer": customer,
            "payment_intent": _id("pi"),
            "refunded": True,
            "receipt_email": "jenny.rosen@example.com",
            "metadata": {"visitor_id": visitor},
            "created": created,
        }
    else:
        obj = {"id": _id("obj"), "object": event_type.split(".")[0], "created": created}
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": _id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": _id("req"), "idempotency_key": str(uuid.uuid4())},
        "type": event_type,
    }
