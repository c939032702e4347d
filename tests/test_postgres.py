"""What only the PostgreSQL backend does: several replicas on one database (leases, dedupe
across stores, migrations started together) and a password that never shows."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from relay.errors import StoreError
from relay.storage import IN_FLIGHT, Incoming, Mapped, Output, Store, open_store
from tests.pgserver import PASSWORD

T0 = 1_800_000_000.0
WINDOW = 48 * 3600.0


def pg_store(url: str, **options: Any) -> Store:
    from relay.storage.postgres import PostgresStore

    return PostgresStore(url, **options)


def hook(key: str) -> Incoming:
    return Incoming("stripe", T0, "application/json", "{}", b"{}", (key,), WINDOW)


async def queue(s: Store, n: int) -> None:
    wid = (await s.ingest(hook(f"q{n}"))).webhook_id
    assert wid is not None
    outputs = [Output("k/1", "e", 0, json.dumps({"n": i})) for i in range(n)]
    await s.save_mapped([Mapped(wid, T0, outputs)])


def test_a_dead_replicas_batch_is_claimed_again_after_its_lease(pg_url: str) -> None:
    async def body() -> None:
        a, b = pg_store(pg_url, lease=0.6), pg_store(pg_url, lease=0.6)
        await a.open()
        await b.open()
        await queue(a, 5)
        taken = await a.claim("k/1", 5, T0)
        assert len(taken) == 5
        await asyncio.sleep(1.0)  # past the lease: a lives and renews it
        assert await b.claim("k/1", 5, T0) == []
        assert await b.reset_in_flight() == 0  # b's start does not take a's rows either
        await a.close()  # a dies with its batch in flight: no release, no renewal
        assert await b.claim("k/1", 5, T0) == []
        await asyncio.sleep(0.8)
        again = await b.claim("k/1", 5, T0)
        assert [r.id for r in again] == [r.id for r in taken]
        assert all(r.attempts == 2 for r in again)  # sent once more
        assert await b.claim("k/1", 5, T0) == []
        c = await b.counts()
        assert c.by_state["k/1"] == {IN_FLIGHT: 5}
        await b.close()

    asyncio.run(body())


def test_replicas_accept_a_retry_once(pg_url: str) -> None:
    async def body() -> None:
        stores = [pg_store(pg_url) for _ in range(3)]
        for s in stores:
            await s.open()
        results = await asyncio.gather(
            *(stores[n % 3].ingest(hook(f"evt_{n % 10}")) for n in range(60))
        )
        assert sum(len(r.accepted) for r in results) == 10
        assert sum(r.duplicates for r in results) == 50
        assert (await stores[0].counts()).webhooks == 10
        for s in stores:
            await s.close()

    asyncio.run(body())


def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    async def body() -> None:
        stores = [pg_store(pg_url) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in stores))
        for s in stores:
            assert await s.schema_problem() is None  # type: ignore[attr-defined]
            await s.close()

    asyncio.run(body())


def test_one_replica_prunes_at_a_time(pg_url: str) -> None:
    async def body() -> None:
        a, b = pg_store(pg_url), pg_store(pg_url)
        await a.open()
        await b.open()
        for n in range(20):
            await a.ingest(hook(f"old{n}"))
        now = T0 + 30 * 86400.0
        removed = await asyncio.gather(*(s.prune(now, WINDOW, 7 * 86400.0) for s in (a, b)))
        assert sorted(removed)[0] == 0 or sum(removed) >= 20
        while await a.prune(now, WINDOW, 7 * 86400.0):
            pass
        assert (await b.counts()).dedupe_keys == 0
        await a.close()
        await b.close()

    asyncio.run(body())


def test_not_migrated_is_told_without_migrating(pg_url: str) -> None:
    async def body() -> None:
        s = pg_store(pg_url)
        problem = await s.schema_problem()  # type: ignore[attr-defined]
        assert problem is not None and "not migrated" in problem
        assert PASSWORD not in problem and "***" in problem
        await s.open()
        assert await s.schema_problem() is None  # type: ignore[attr-defined]
        await s.close()

    asyncio.run(body())


@pytest.mark.parametrize("fault", ["password", "port", "database"])
def test_connection_errors_never_show_the_password(pg_server: Any, fault: str) -> None:
    url = pg_server.url("postgres")
    if fault == "password":
        url = url.replace(PASSWORD, PASSWORD + "-wrong")
    elif fault == "port":
        url = url.replace(f":{pg_server.port}/", ":1/")
    else:
        url = url.replace("/postgres", "/no_such_db")
    s = pg_store(url, connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(StoreError) as e:
        asyncio.run(s.open())
    assert time.monotonic() - started < 10
    assert PASSWORD not in str(e.value) and "cannot connect to the database" in str(e.value)
    assert str(e.value).count("\n") == 0
    assert PASSWORD not in s.url


def test_an_unknown_scheme_is_not_a_file() -> None:
    with pytest.raises(StoreError, match=r"mysql://"):
        open_store("mysql://u:p@host/db")
