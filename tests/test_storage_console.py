"""The console's reads of the storage interface, on every backend."""

from __future__ import annotations

import json
from collections.abc import Callable

from relay.storage import DEAD, DELIVERED, Incoming, Mapped, Output, Store
from tests.conftest import run

WINDOW = 48 * 3600.0
T0 = 1_800_000_000.0


def hook(key: str, source: str = "stripe", at: float = T0, text: str = "") -> Incoming:
    body = json.dumps({"id": key, "note": text}).encode()
    return Incoming(source, at, "application/json", '{"x-a": "1"}', body, (key,), WINDOW)


def mapped(webhook_id: int, key: str, etype: str, rules: int = 1, at: float = T0) -> Mapped:
    outs = [Output("k/1", key, n, '{"name": "x"}', None, etype) for n in range(rules)]
    return Mapped(webhook_id, at, outs)


async def fill(s: Store) -> list[int]:
    """Five webhooks: 1 delivered, 2 dead, 3 pending, 4 ignored, 5 unmapped (crm)."""
    ids = []
    for n, src in enumerate(["stripe", "stripe", "stripe", "stripe", "crm"], start=1):
        got = await s.ingest(hook(f"evt_{n}", src, T0 + n, text=f"note {n} 100%_off"))
        assert got.webhook_id is not None
        ids.append(got.webhook_id)
    await s.save_mapped(
        [
            mapped(ids[0], "evt_1", "checkout.session.completed"),
            mapped(ids[1], "evt_2", "charge.refunded", rules=2),
            mapped(ids[2], "evt_3", "checkout.session.completed"),
            Mapped(ids[3], T0, []),
        ]
    )
    rows = await s.claim("k/1", 1, T0)
    await s.delivered([rows[0].id], [777], "k/1", T0 + 30)
    dead = [e.id for e in await s.webhook_outbox(ids[1])]
    await s.dead_letter(dead, "HTTP 400 invalid", T0 + 40)
    return ids


def test_webhook_page_is_newest_first_with_keyset_pages(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        ids = await fill(s)
        first = await s.webhook_page(None, 2)
        assert [w.hook.id for w in first] == [ids[4], ids[3]]
        second = await s.webhook_page(first[-1].hook.id, 2)
        assert [w.hook.id for w in second] == [ids[2], ids[1]]
        newer = await s.webhook_page(None, 10, after=ids[2])
        assert [w.hook.id for w in newer] == [ids[4], ids[3]]
        assert first[0].hook.headers == {"x-a": "1"}

    run(backend, body)


def test_webhook_page_filters_by_source_outcome_and_event_type(
    backend: Callable[[], Store],
) -> None:
    async def body(s: Store) -> None:
        ids = await fill(s)

        async def page(**kw: str) -> list[int]:
            return [w.hook.id for w in await s.webhook_page(None, 10, **kw)]

        assert await page(source="crm") == [ids[4]]
        assert await page(outcome="delivered") == [ids[0]]
        assert await page(outcome="dead") == [ids[1]]
        assert await page(outcome="pending") == [ids[4], ids[2]]
        assert await page(outcome="ignored") == [ids[3]]
        assert await page(event_type="checkout.session.completed") == [ids[2], ids[0]]
        assert await page(source="crm", outcome="dead") == []
        summaries = {w.hook.id: w for w in await s.webhook_page(None, 10)}
        assert [summaries[i].outcome for i in ids] == [
            "delivered",
            "dead",
            "pending",
            "ignored",
            "pending",
        ]
        assert summaries[ids[1]].states == {DEAD: 2}
        assert summaries[ids[1]].event_types == ("charge.refunded",)
        assert summaries[ids[4]].unmapped

    run(backend, body)


def test_search_finds_an_event_id_then_body_text(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        ids = await fill(s)
        found = await s.search_webhooks("evt_3", ["stripe", "crm"], None, 10)
        assert [w.hook.id for w in found] == [ids[2]]
        assert [w.hook.id for w in await s.search_webhooks("NOTE 4", [], None, 10)] == [ids[3]]
        # LIKE's wildcards are searched for as text
        assert len(await s.search_webhooks("100%_off", [], None, 10)) == 5
        assert await s.search_webhooks("0%x", [], None, 10) == []
        assert len(await s.search_webhooks("note", [], ids[2], 10)) == 2

    run(backend, body)


def test_webhook_outbox_and_event_owners(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        ids = await fill(s)
        rows = await s.webhook_outbox(ids[0])
        assert [(r.state, r.track_id, r.event_key) for r in rows] == [(DELIVERED, 777, "evt_1")]
        dead = await s.webhook_outbox(ids[1])
        assert [(r.state, r.last_error) for r in dead] == [(DEAD, "HTTP 400 invalid")] * 2
        owners = await s.event_owners("stripe", ["evt_1", "evt_5", "nope"])
        assert owners == {"evt_1": ids[0]}

    run(backend, body)


def test_activity_counts_per_step(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await fill(s)  # received at T0+1..T0+5, one delivered at T0+30
        act = await s.activity(T0, 10.0, T0 + 60)
        assert act.received == {0: 5}
        assert act.delivered == {3: 1}
        later = await s.activity(T0 + 3, 1.0, T0 + 4.5)
        assert later.received == {0: 1, 1: 1}
        assert later.delivered == {}

    run(backend, body)


def test_rule_counts_since(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await fill(s)
        assert await s.rule_counts(T0) == {("stripe", 0): 3, ("stripe", 1): 1}
        assert await s.rule_counts(T0 + 2.5) == {("stripe", 0): 1}

    run(backend, body)


def test_dead_letter_page_and_ids(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        ids = await fill(s)
        dead = [e.id for e in await s.webhook_outbox(ids[1])]
        page = await s.dead_letter_page(None, 1)
        assert [e.id for e in page] == [dead[1]]
        assert [e.id for e in await s.dead_letter_page(page[0].id, 5)] == [dead[0]]
        assert await s.dead_letter_page(None, 5, source="crm") == []
        assert await s.dead_letter_ids() == dead
        assert await s.dead_letter_ids("stripe") == dead
        assert await s.dead_letter_ids("crm") == []

    run(backend, body)
