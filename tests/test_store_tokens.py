"""The token ledger in the store: a signed single-use token vouches for one event, decided by
the database inside the transaction that stores the webhook.

tests/test_storage.py holds the ledger's basics (a token on another event refused, also from
another source; the same event again a duplicate; the ledger outlives the process; tokens go
after expiry); these hold the rest, on every backend, through `relay.storage.Store` only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from relay.errors import InvalidSignature
from relay.providers.base import Token
from relay.storage import Incoming, Ingested, Store
from tests.conftest import run

NOW = 1_714_550_400.0
WINDOW = 48 * 3600.0
RETENTION = 7 * 86400.0
TOKEN = Token("a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0", NOW + 900)


def item(
    *keys: str, tokens: dict[str, Token] | None = None, source: str = "mg", at: float = NOW
) -> Incoming:
    """A webhook of these events; `tokens`: the token that vouched for each (by default
    TOKEN for its first event)."""
    if tokens is None:
        tokens = {keys[0]: TOKEN}
    return Incoming(
        source, at, "application/json", "{}", b"{}", keys, WINDOW, tuple(tokens.items())
    )


def accepted(result: Ingested | BaseException) -> tuple[str, ...]:
    assert isinstance(result, Ingested), result
    return result.accepted


def test_a_refused_webhook_binds_none_of_its_tokens_and_stores_nothing(
    backend: Callable[[], Store],
) -> None:
    fresh = Token("b" * 50, NOW + 900)

    async def body(s: Store) -> None:
        assert accepted(await s.ingest(item("evt-1"))) == ("evt-1",)
        before = await s.counts()
        # a fresh token comes first: it is refused with the forgery, not bound to evt-2
        forged = item("evt-2", "evt-forged", tokens={"evt-2": fresh, "evt-forged": TOKEN})
        with pytest.raises(InvalidSignature, match="token already used for another event"):
            await s.ingest(forged)
        assert await s.counts() == before
        assert accepted(await s.ingest(item("evt-3", tokens={"evt-3": fresh}))) == ("evt-3",)

    run(backend, body)


def test_concurrent_retries_of_one_event_with_its_token_are_duplicates(
    backend: Callable[[], Store],
) -> None:
    """The sender retries before the first answer: same token, same event, in one group.
    The ledger takes them for what they are, retries, not a forgery."""

    async def body(s: Store) -> list[Ingested | BaseException]:
        return await asyncio.gather(
            *(s.ingest(item("evt-1", at=NOW + n)) for n in range(3)), return_exceptions=True
        )

    results = run(backend, body)
    assert all(isinstance(r, Ingested) for r in results), results
    assert sorted(accepted(r) for r in results) == [(), (), ("evt-1",)]
    assert sum(r.duplicates for r in results if isinstance(r, Ingested)) == 2


def test_other_tokens_and_webhooks_without_one_are_untouched(
    backend: Callable[[], Store],
) -> None:
    other = Token("c" * 50, NOW + 900)

    async def body(s: Store) -> None:
        results = await asyncio.gather(
            s.ingest(item("evt-1")),
            s.ingest(item("evt-2", tokens={"evt-2": other})),
            s.ingest(item("stripe-1", tokens={}, source="stripe")),
            return_exceptions=True,
        )
        assert [accepted(r) for r in results] == [("evt-1",), ("evt-2",), ("stripe-1",)]
        # each token is bound to its own event, and to nothing else
        for token in (TOKEN, other):
            with pytest.raises(InvalidSignature):
                await s.ingest(item("evt-forged", tokens={"evt-forged": token}))
        assert (await s.counts()).webhooks == 3

    run(backend, body)


def test_one_group_with_a_forgery_refuses_only_the_forgery(backend: Callable[[], Store]) -> None:
    """A token's first use and its forgery in the same group, from two sources sharing a
    signing key: the one that came first stays, the forgery alone is refused."""

    async def body(s: Store) -> list[Ingested | BaseException]:
        return await asyncio.gather(
            s.ingest(item("evt-1", source="mg-eu")),
            s.ingest(item("evt-forged", source="mg-us")),
            s.ingest(item("evt-3", tokens={"evt-3": Token("d" * 50, NOW + 900)})),
            return_exceptions=True,
        )

    first, forged, third = run(backend, body)
    assert accepted(first) == ("evt-1",)
    assert isinstance(forged, InvalidSignature)
    assert accepted(third) == ("evt-3",)
    counts = run(backend, lambda s: s.counts())
    assert (counts.webhooks, counts.dedupe_keys, counts.unmapped) == (2, 2, 2)


def test_tokens_are_pruned_a_dedupe_window_after_they_expire(
    backend: Callable[[], Store],
) -> None:
    """A webhook verified just before its token expired may still be on its way in: the
    token outlives its event's dedupe key until a dedupe window after it expired."""
    expired = TOKEN.expires_at

    async def prune(s: Store, now: float) -> None:
        while await s.prune(now, WINDOW, RETENTION):
            pass

    async def body(s: Store) -> None:
        await s.ingest(item("evt-1"))
        await prune(s, expired + WINDOW - 1)
        assert (await s.counts()).dedupe_keys == 0  # the dedupe key went
        with pytest.raises(InvalidSignature):  # the token stays a while longer
            await s.ingest(item("evt-forged"))
        await prune(s, expired + WINDOW + 1)
        assert accepted(await s.ingest(item("evt-forged"))) == ("evt-forged",)

    run(backend, body)
