"""A relay with its console on, for the console's tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import MAPPINGS, STRIPE_SECRET, Relay, Sandbox

OTHER_SECRET = "whsec_test_rotated_old_secret"
TOKEN = "console-token-0123456789"


def console_relay(
    relay_factory: Callable[..., Relay],
    sandbox: Sandbox,
    console: str = "enabled = true",
    sources: str | None = None,
) -> Relay:
    """Stripe signed with two secrets (a rotation), and a `[console]` table (None: none)."""
    stripe = f"""
[sources.stripe]
provider = "stripe"
secret = ["{STRIPE_SECRET}", "{OTHER_SECRET}"]
mapping = "{MAPPINGS / "stripe.toml"}"
"""
    table = f"\n[console]\n{console}\n" if console is not None else ""
    return relay_factory(sandbox, sources=(sources if sources is not None else stripe) + table)


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def csrf_of(html: str) -> str:
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def signed_in(relay: Relay, token: str = TOKEN) -> httpx.Client:
    client = httpx.Client(base_url=relay.url, timeout=30)
    page = client.get("/console/signin")
    r = client.post("/console/signin", data={"csrf": csrf_of(page.text), "token": token})
    assert r.status_code == 303, r.text
    return client
