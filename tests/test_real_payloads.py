"""The default mappings on real webhook bodies: providers' docs and other projects' tests.

The bodies are kept in shared/external/payloads/ beside the checkout, with a manifest naming the
origin of each; mappings/examples/ holds copies, which `relay check` runs. Every body must map
without a failure and fill the fields it carries; without the shared folder the tests skip.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigTable
from relay.mapping import load_mapping
from relay.providers import provider_class
from relay.providers.base import WebhookRequest

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = ROOT / "mappings"
PAYLOADS = ROOT.parent / "shared" / "external" / "payloads"


def sha(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


PI = "pi_1IqxJOJDPojXS6LN9uOebAea"  # the supabase session's PaymentIntent
SUPABASE_PRICE = "price_1IDQm5JDPojXS6LNM31hxKzp"
REJECTED = (
    "Sandbox subdomains are for test purposes only. Please add your own domain or add the "
    "address to authorized recipients in Account Settings."
)
SG_MESSAGE = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"

# Per manifest file: the events its body must make, in order, each with the fields that must
# hold these values (the mapping may fill more).
Expected = list[tuple[str, dict[str, str]]]
EXPECTED: dict[str, Expected] = {
    "stripe/supabase-checkout_session_completed.json": [
        (
            "purchase",
            {
                "order_id": "cs_live_9RBjcHiy2i5p99Tf1MYM90c3SHK1grU0E6Ae6pKWR2KPA4ZiuKiB2X1Y3X",
                "amount": "9.99",
                "currency": "EUR",
                "mode": "payment",
                "payment_intent": PI,
            },
        )
    ],
    "stripe/supabase-charge_refunded.json": [
        (
            "refund_issued",
            {
                "charge_id": "ch_3Kl36gJDPojXS6LN0DCM4A8l",
                "amount": "25.00",
                "currency": "USD",
                "payment_intent": "pi_3Kl36gJDPojXS6LN02fQVtKR",
            },
        )
    ],
    "stripe/supabase-invoice_paid.json": [
        (
            "invoice_paid",
            {"amount": "0.00", "currency": "USD", "subscription_id": "sub_JsuPyCPhXWfZar"},
        )
    ],
    # The same PaymentIntent as the session's: a payment, not a second purchase.
    "stripe/supabase-payment_intent_succeeded.json": [
        ("payment_succeeded", {"payment_intent": PI, "amount": "10.00", "currency": "USD"})
    ],
    "stripe/supabase-subscription_created.json": [
        (
            "subscription_started",
            {
                "price_id": SUPABASE_PRICE,
                "amount": "0.00",
                "currency": "USD",  # the price's: the subscription has none
                "interval": "month",
            },
        )
    ],
    "stripe/supabase-subscription_updated.json": [
        ("subscription_updated", {"price_id": SUPABASE_PRICE, "amount": "0.00", "currency": "USD"})
    ],
    "stripe/supabase-subscription_deleted.json": [
        (
            "subscription_canceled",
            {"price_id": SUPABASE_PRICE, "canceled_at": "2021-06-08T10:45:02Z"},
        )
    ],
    "stripe/payrails-checkout.session.completed.json": [
        (
            "purchase",
            {
                "amount": "19.00",
                "currency": "USD",
                "mode": "subscription",
                "subscription_id": "sub_1LNkeSKXBGcbgpbZ7jMqOPSi",
            },
        )
    ],
    "stripe/payrails-invoice.payment_failed.json": [
        ("payment_failed", {"amount": "249.00", "currency": "USD", "subscription_id": "sub_1234"})
    ],
    # Plan-based subscriptions of older API versions.
    "stripe/zulip-customer_subscription_created.json": [
        (
            "subscription_started",
            {
                "plan": "Gold Special",
                "price_id": "gold_00000000000000",
                "amount": "20.00",
                "currency": "AUD",
                "interval": "month",
            },
        )
    ],
    "stripe/zulip-customer_subscription_updated.json": [
        (
            "subscription_updated",
            {
                "status": "trialing",
                "previous_status": "active",
                "plan": "flatrate",
                "price_id": "plan_E6SQ6RAtmLVtzg",
                "amount": "1.00",
                "currency": "USD",
            },
        )
    ],
    "stripe/zulip-invoice_payment_failed.json": [
        (
            "payment_failed",
            {"amount": "0.00", "currency": "AUD", "subscription_id": "sub_9fYmJQOQy04yoh"},
        )
    ],
    "mailgun/docs-accepted.json": [],
    "mailgun/docs-delivered.json": [
        (
            "email_delivered",
            {
                "message_id": "20180622182958.1.48906CB188F1A454@exmple.org",
                "recipient_sha256": sha("john@example.com"),
            },
        )
    ],
    "mailgun/docs-failed-permanent-suppress-bounce.json": [
        (
            "email_dropped",
            {
                "recipient_sha256": sha("slava@mailgun.com"),
                "reason": "suppress-bounce",
                "description": "Not delivering to previously bounced address",
            },
        )
    ],
    "mailgun/docs-failed-permanent-delayed-bounce.json": [
        (
            "email_bounce",
            {
                "recipient_sha256": sha("christest123@test.com"),
                "reason": "smtp; 550-5.1.1 The email account that you tried to reach does not "
                "exist.",
                "code": "550",
            },
        )
    ],
    "mailgun/docs-failed-temporary.json": [],
    "mailgun/docs-opened.json": [
        (
            "email_open",
            {
                "message_id": "20130821005614.19826.35976@samples.mailgun.org",
                "recipient_sha256": sha("recipient@example.com"),
                "device": "mobile",
            },
        )
    ],
    "mailgun/docs-clicked.json": [
        (
            "email_click",
            {
                "url": "http://example.com/signup",
                "recipient_sha256": sha("recipient@example.com"),
                "device": "desktop",
            },
        )
    ],
    "mailgun/docs-unsubscribed.json": [
        (
            "email_unsubscribe",
            {
                "message_id": "20130822232216.13966.79700@samples.mailgun.org",
                "recipient_sha256": sha("recipient@example.com"),
            },
        )
    ],
    "mailgun/docs-complained.json": [
        (
            "email_complaint",
            {
                "message_id": "20130718032413.263EE2E0926@example.com",
                "recipient_sha256": sha("foo@example.com"),
            },
        )
    ],
    # No recipient: the To header's address.
    "mailgun/docs-rejected.json": [
        ("email_dropped", {"recipient_sha256": sha("joan@example.org"), "reason": REJECTED})
    ],
    "mailgun/anymail-delivered.json": [
        (
            "email_delivered",
            {
                "message_id": "20180812211713.1.DF5966851B4BAA99@example.org",
                "recipient_sha256": sha("recipient@example.com"),
            },
        )
    ],
    "sendgrid/docs-processed.json": [],
    "sendgrid/docs-dropped.json": [
        (
            "email_dropped",
            {
                "campaign_id": "cat facts",
                "recipient_sha256": sha("example@test.com"),
                "reason": "Bounced Address",
            },
        )
    ],
    "sendgrid/docs-delivered.json": [
        ("email_delivered", {"campaign_id": "cat facts", "message_id": SG_MESSAGE})
    ],
    "sendgrid/docs-deferred.json": [],
    "sendgrid/docs-bounce.json": [
        (
            "email_bounce",
            {"reason": "500 unknown recipient", "status": "5.0.0", "bounce_type": "bounce"},
        )
    ],
    "sendgrid/docs-blocked.json": [("email_bounce", {"bounce_type": "blocked"})],
    "sendgrid/docs-open.json": [("email_open", {"campaign_id": "cat facts"})],
    "sendgrid/docs-click.json": [("email_click", {"url": "http://www.sendgrid.com/"})],
    "sendgrid/docs-spamreport.json": [("email_complaint", {"message_id": SG_MESSAGE})],
    "sendgrid/docs-unsubscribe.json": [("email_unsubscribe", {"message_id": SG_MESSAGE})],
    "sendgrid/docs-group_unsubscribe.json": [("email_unsubscribe", {"group_id": "10"})],
    "sendgrid/docs-group_resubscribe.json": [],
    "sendgrid/docs-combined-batch.json": [
        (name, {"campaign_id": "cat facts", "recipient_sha256": sha("example@test.com")})
        for name in (
            "email_delivered",
            "email_open",
            "email_click",
            "email_bounce",
            "email_dropped",
            "email_complaint",
            "email_unsubscribe",
            "email_unsubscribe",
        )
    ],
    "sendgrid/anymail-processed.json": [],
    "sendgrid/anymail-bounce.json": [
        (
            "email_bounce",
            {
                "recipient_sha256": sha("noreply@example.com"),
                "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
                "status": "5.1.1",
            },
        )
    ],
    "sendgrid/anymail-open.json": [
        ("email_open", {"recipient_sha256": sha("recipient@example.com")})
    ],
    "sendgrid/anymail-click.json": [("email_click", {"url": "http://www.example.com"})],
    "hubspot/docs-v1-contact.creation.json": [
        (
            "lead_created",
            {"contact_id": "123", "portal_id": "62515", "occurred_at": "2019-07-26T04:00:00Z"},
        )
    ],
    "hubspot/prismatic-contact.creation.json": [
        ("lead_created", {"contact_id": "65059681032", "change_source": "CRM_UI"})
    ],
    "hubspot/skill-contact.propertyChange.json": [],  # a lifecycle stage change: not mapped
    # The generic format: a contact by its objectTypeId.
    "hubspot/changelog-generic-object.creation.json": [
        ("lead_created", {"contact_id": "123", "portal_id": "62515", "change_source": "CRM"})
    ],
}


def _entries() -> list[Any]:
    manifest = PAYLOADS / "manifest.json"
    if not manifest.is_file():
        reason = f"no {manifest}: the shared payloads sit beside the checkout (as in CI)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="absent")]
    entries = json.loads(manifest.read_text())["payloads"]
    return [pytest.param(e, id=e["file"]) for e in entries]


ENTRIES = _entries()


def mapped(provider: str, body: bytes) -> list[tuple[str, dict[str, str], str | None]]:
    """(name, payload, url) of each event the default mapping makes; fails on a failure."""
    mapping = load_mapping(MAPPINGS / f"{provider}.toml")
    cls = provider_class(provider)
    assert cls is not None
    parser = cls.from_config(ConfigTable({}, mapping.path), signed=False)
    url = f"https://relay.example.com/webhooks/{provider}"
    request = WebhookRequest("POST", url, {"content-type": "application/json"}, body, 0.0)
    events = []
    for event in parser.parse(request):
        result = mapping.apply(event, provider, {})
        assert [f.reason for f in result.failures] == [], event.type
        events += [(m.event.name, m.event.payload, m.event.url) for m in result.outputs]
    return events


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_real_body_fills_the_fields_it_carries(entry: dict[str, str]) -> None:
    assert entry["file"] in EXPECTED, f"{entry['file']}: add what it must make to EXPECTED"
    events = mapped(entry["provider"], (PAYLOADS / entry["file"]).read_bytes())
    expected = EXPECTED[entry["file"]]
    assert [name for name, _, _ in events] == [name for name, _ in expected]
    for (name, payload, url), (_, fields) in zip(events, expected, strict=True):
        got = {key: payload.get(key) for key in fields}
        assert got == fields, name
        if name == "email_click":
            assert url == payload["url"]  # the clicked link is the event's url too


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_copy_relay_check_runs_is_the_real_body(entry: dict[str, str]) -> None:
    copy = MAPPINGS / "examples" / entry["file"]
    assert copy.read_bytes() == (PAYLOADS / entry["file"]).read_bytes()
    mapping = load_mapping(MAPPINGS / f"{entry['provider']}.toml")
    assert copy in [example.path.resolve() for example in mapping.examples]
    assert f"`{entry['file']}`" in (MAPPINGS / "examples" / "README.md").read_text()
