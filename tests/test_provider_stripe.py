"""Stripe provider: the signature by the `stripe` package, the age checked both ways here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import stripe
from click.testing import CliRunner

from relay.cli import main
from relay.config import ConfigTable, Secret
from relay.errors import ConfigError, InvalidSignature
from relay.providers.base import WebhookRequest
from relay.providers.stripe import StripeProvider
from tests.conftest import MAPPINGS

SECRET = "whsec_test_secret"
NOW = 1_700_000_000.0
# PROVIDERS.md's vector, made with stripe 16.1.0's own helper.
VECTOR_BODY = b'{"id":"evt_test_webhook","object":"event"}'
VECTOR_HEADER = "t=1700000000,v1=d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990"


def provider(tolerance: float = 300.0) -> StripeProvider:
    return StripeProvider((Secret(SECRET),), tolerance)


def request(body: bytes, header: str, at: float) -> WebhookRequest:
    headers = {"content-type": "application/json", "stripe-signature": header}
    return WebhookRequest("POST", "https://relay.example.com/webhooks/stripe", headers, body, at)


def signed(timestamp: int, body: bytes = VECTOR_BODY) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(
        body.decode(), SECRET, timestamp=timestamp
    )
    return header


def test_public_vector() -> None:
    assert signed(1_700_000_000) == VECTOR_HEADER
    provider().verify(request(VECTOR_BODY, VECTOR_HEADER, NOW + 10))


def at_offset(offset: float, tolerance: float = 300.0) -> None:
    """Verify a webhook signed `offset` seconds ahead of the relay's clock (negative: behind).

    The clock is today's: the age is the relay's to check, not the stripe package's, whose
    check reads the wall clock."""
    t = int(time.time())
    provider(tolerance).verify(request(VECTOR_BODY, signed(t), float(t) - offset))


@pytest.mark.parametrize("offset", [-300.0, -0.5, 0.0, 0.5, 299.0, 300.0])
def test_timestamps_within_the_tolerance_either_way_are_accepted(offset: float) -> None:
    at_offset(offset)


@pytest.mark.parametrize("offset", [300.5, 301.0, 3600.0, 86400.0 * 365])
def test_a_validly_signed_timestamp_in_the_future_is_refused(offset: float) -> None:
    with pytest.raises(InvalidSignature, match="timestamp outside the tolerance"):
        at_offset(offset)


@pytest.mark.parametrize("offset", [-300.5, -301.0, -86400.0])
def test_a_validly_signed_old_timestamp_is_refused(offset: float) -> None:
    with pytest.raises(InvalidSignature, match="timestamp outside the tolerance"):
        at_offset(offset)


def test_a_fractional_tolerance_is_honoured_exactly() -> None:
    at_offset(2.5, tolerance=2.5)
    at_offset(-2.5, tolerance=2.5)
    for offset in (2.6, -2.6):
        with pytest.raises(InvalidSignature, match="timestamp outside the tolerance"):
            at_offset(offset, tolerance=2.5)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (signed(1_700_000_000).replace("v1=d", "v1=e"), "no signature matches"),
        ("t=1700000000", "no signature matches"),
        ("v1=" + "0" * 64, "malformed Stripe-Signature header"),
        ("t=soon,v1=" + "0" * 64, "malformed Stripe-Signature header"),
    ],
    ids=["flipped", "no-v1", "no-t", "t-not-a-number"],
)
def test_bad_headers(header: str, reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        provider().verify(request(VECTOR_BODY, header, NOW))


def test_a_huge_signed_timestamp_is_outside_the_tolerance_not_a_crash() -> None:
    huge = 10**400
    mac = stripe.WebhookSignature._compute_signature(f"{huge}.{VECTOR_BODY.decode()}", SECRET)
    with pytest.raises(InvalidSignature, match="timestamp outside the tolerance"):
        provider().verify(request(VECTOR_BODY, f"t={huge},v1={mac}", NOW))


def test_the_first_t_counts_as_the_stripe_package_reads_it() -> None:
    """A second `t=` appended to a genuine header cannot move the checked timestamp."""
    header = signed(1_700_000_000) + ",t=1900000000"
    provider().verify(request(VECTOR_BODY, header, NOW))
    with pytest.raises(InvalidSignature):
        provider().verify(request(VECTOR_BODY, header, 1_900_000_000.0))


def table(**values: Any) -> ConfigTable:
    return ConfigTable(
        {"provider": "stripe", "secret": SECRET, **values},
        Path("/etc/relay/relay.toml"),
        "sources.stripe",
    )


def test_tolerance_from_config_keeps_fractions() -> None:
    assert StripeProvider.from_config(table()).tolerance == 300
    assert StripeProvider.from_config(table(tolerance="1500ms")).tolerance == 1.5
    assert StripeProvider.from_config(table(tolerance="1s")).tolerance == 1


@pytest.mark.parametrize("tolerance", ["500ms", "999ms", 0.2])
def test_a_tolerance_under_one_second_is_refused_at_load(tolerance: Any) -> None:
    with pytest.raises(ConfigError) as info:
        StripeProvider.from_config(table(tolerance=tolerance))
    assert info.value.key == "sources.stripe.tolerance"
    assert "at least 1s" in info.value.message


def test_relay_check_names_file_key_and_reason_for_a_sub_second_tolerance(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "{tmp_path / "relay.db"}"\n'
        '[track]\nbase_url = "http://127.0.0.1:9"\napi_key = "sk_x"\nwebsite_id = 1\n'
        f'[sources.stripe]\nprovider = "stripe"\nsecret = "{SECRET}"\n'
        f'mapping = "{MAPPINGS / "stripe.toml"}"\ntolerance = "500ms"\n'
    )
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1
    assert str(config) in result.stderr
    assert "sources.stripe.tolerance: must be at least 1s" in result.stderr
    assert SECRET not in result.stderr


def test_samples_verify() -> None:
    p = provider()
    sample = p.sample(None, "http://127.0.0.1/webhooks/stripe", NOW)
    req = request(sample.body, sample.headers["stripe-signature"], NOW + 1)
    p.verify(req)
    assert p.parse(req)[0].key == json.loads(sample.body)["id"]
