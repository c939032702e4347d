"""The token ledger in the store: a signed single-use token vouches for one event, decided by
the database inside the transaction that stores the webhook."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import store as ops
from relay.db import Writer, connect, migrate
from relay.errors import InvalidSignature
from relay.providers.base import Token

NOW = 1_714_550_400.0
WINDOW = 48 * 3600.0
TOKEN = Token("a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0", NOW + 900)


def item(
    key: str, token: Token | None = TOKEN, source: str = "mg", at: float = NOW
) -> ops.Incoming:
    event = ops.IncomingEvent(key, "delivered", "ignored")
    tokens = [(key, token)] if token is not None else []
    return ops.Incoming(source, at, "application/json", "{}", b"{}", [event], WINDOW, tokens)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "relay.db")
    migrate(c)
    yield c
    c.close()


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("webhooks", "events", "dedupe", "tokens")
    }


def test_a_token_on_another_event_is_refused_and_stores_nothing(conn: sqlite3.Connection) -> None:
    assert ops.ingest(conn, item("evt-1")).accepted == 1
    before = counts(conn)
    conn.execute("SAVEPOINT job")  # as the writer runs a job
    with pytest.raises(InvalidSignature, match="token already used for another event"):
        ops.ingest(conn, item("evt-forged", at=NOW + 5))
    conn.execute("ROLLBACK TO job")
    assert counts(conn) == before == {"webhooks": 1, "events": 1, "dedupe": 1, "tokens": 1}


def test_the_same_token_with_the_same_event_is_a_duplicate(conn: sqlite3.Connection) -> None:
    assert ops.ingest(conn, item("evt-1")).accepted == 1
    again = ops.ingest(conn, item("evt-1", at=NOW + 600))
    assert (again.accepted, again.duplicates) == (0, 1)


def test_the_ledger_spans_sources(conn: sqlite3.Connection) -> None:
    """Two sources may share a Mailgun signing key: a block lifted from one is refused on the
    other too."""
    ops.ingest(conn, item("evt-1", source="mg-eu"))
    with pytest.raises(InvalidSignature):
        ops.ingest(conn, item("evt-forged", source="mg-us"))


def test_other_tokens_and_webhooks_without_one_are_untouched(conn: sqlite3.Connection) -> None:
    results = ops.ingest_many(
        conn,
        [item("evt-1"), item("evt-2", Token("b" * 50, NOW + 900)), item("stripe-1", None)],
    )
    assert [r.accepted for r in results] == [1, 1, 1]
    assert counts(conn)["tokens"] == 2


def test_one_group_with_a_forgery_refuses_only_the_forgery(tmp_path: Path) -> None:
    """Both in one group commit: the writer runs them one by one, the first stays."""
    writer = Writer(tmp_path / "relay.db")

    async def both() -> list[ops.IngestResult | BaseException]:
        return await asyncio.gather(
            writer.run_batched(ops.ingest_many, item("evt-1")),
            writer.run_batched(ops.ingest_many, item("evt-forged")),
            writer.run_batched(ops.ingest_many, item("evt-3", Token("c" * 50, NOW + 900))),
            return_exceptions=True,
        )

    try:
        first, forged, third = asyncio.run(both())
    finally:
        writer.close()
    assert isinstance(first, ops.IngestResult) and first.accepted == 1
    assert isinstance(forged, InvalidSignature)
    assert isinstance(third, ops.IngestResult) and third.accepted == 1
    conn = connect(tmp_path / "relay.db")
    try:
        assert counts(conn) == {"webhooks": 2, "events": 2, "dedupe": 2, "tokens": 2}
    finally:
        conn.close()


def test_tokens_are_pruned_a_dedupe_window_after_they_expire(conn: sqlite3.Connection) -> None:
    ops.ingest(conn, item("evt-1"))
    expired = TOKEN.expires_at
    while ops.prune(conn, expired + WINDOW - 1, WINDOW, 7 * 86400):
        pass
    assert counts(conn)["tokens"] == 1  # the dedupe key went, the token stays a while longer
    with pytest.raises(InvalidSignature):
        ops.ingest(conn, item("evt-forged"))
    while ops.prune(conn, expired + WINDOW + 1, WINDOW, 7 * 86400):
        pass
    assert counts(conn)["tokens"] == 0
