"""The provider registry: one line per provider."""

from __future__ import annotations

import importlib

from relay.providers.base import Provider, Verifier
from relay.providers.shared import BasicAuth, SharedToken
from relay.settings import ConfigTable

PROVIDERS: dict[str, str] = {
    "stripe": "relay.providers.stripe:StripeProvider",
    "mailgun": "relay.providers.mailgun:MailgunProvider",
    "sendgrid": "relay.providers.sendgrid:SendGridProvider",
    "hubspot": "relay.providers.hubspot:HubSpotProvider",
    "standard": "relay.providers.standard:StandardProvider",
    "hmac": "relay.providers.hmac:HmacProvider",
    "paypal": "relay.providers.paypal:PayPalProvider",
    "track": "relay.providers.track:TrackProvider",
    "import": "relay.providers.importer:ImportProvider",
}


def provider_class(kind: str) -> type[Provider] | None:
    target = PROVIDERS.get(kind)
    if target is None:
        return None
    module, _, name = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module), name)
    return cls


def build_source_parts(provider_name: str, table: ConfigTable) -> tuple[Provider, Verifier | None]:
    """The provider of a [sources.NAME] table and how its requests are verified.

    ``verify`` is "signature" (the provider's own scheme, the default), "basic", "token", or
    false, which must be said explicitly.
    """
    cls = provider_class(provider_name)
    if cls is None:
        table.fail(
            "provider",
            f"unknown provider {provider_name!r} (known: {', '.join(sorted(PROVIDERS))})",
        )
    verify = table._raw("verify", "signature", False)
    if verify is False:
        return cls.from_config(table, signed=False), None
    if verify == "signature":
        provider = cls.from_config(table, signed=True)
        return provider, provider
    if verify == "basic":
        return cls.from_config(table, signed=False), BasicAuth.from_config(table)
    if verify == "token":
        return cls.from_config(table, signed=False), SharedToken.from_config(table)
    table.fail("verify", f'must be "signature", "basic", "token" or false, not {verify!r}')
