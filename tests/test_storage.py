"""The storage interface, on every backend: these tests use only `relay.storage.Store`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from relay.errors import InvalidSignature
from relay.providers.base import Token
from relay.storage import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    Incoming,
    Mapped,
    Output,
    Store,
)
from tests.conftest import run

WINDOW = 48 * 3600.0
T0 = 1_800_000_000.0


def hook(*keys: str, source: str = "stripe", at: float = T0, tokens: Any = ()) -> Incoming:
    body = json.dumps({"keys": list(keys)}).encode()
    return Incoming(source, at, "application/json", "{}", body, keys, WINDOW, tuple(tokens))


def rows(webhook_id: int, *bodies: str | None, dest: str = "k/1", key: str = "e") -> Mapped:
    return Mapped(
        webhook_id,
        T0,
        [
            Output(dest, key, n, b, None if b else "mapping failed: boom")
            for n, b in enumerate(bodies)
        ],
    )


# -- the acknowledgement: dedupe decided by the database


def test_a_new_event_is_accepted_and_a_repeat_is_a_duplicate(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        first = await s.ingest(hook("evt_1"))
        again = await s.ingest(hook("evt_1", at=T0 + 10))
        assert first.accepted == ("evt_1",) and first.duplicates == 0
        assert first.webhook_id is not None
        assert again.accepted == () and again.duplicates == 1 and again.webhook_id is None
        stored = await s.webhook(first.webhook_id)
        assert stored is not None and stored.body == b'{"keys": ["evt_1"]}'

    run(backend, body)


def test_dedupe_is_per_source_and_ends_with_the_window(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        assert (await s.ingest(hook("a"))).accepted == ("a",)
        assert (await s.ingest(hook("a", source="mailgun"))).accepted == ("a",)
        assert (await s.ingest(hook("a", at=T0 + WINDOW - 1))).duplicates == 1
        late = await s.ingest(hook("a", at=T0 + WINDOW + 1))
        assert late.accepted == ("a",)

    run(backend, body)


def test_concurrent_webhooks_with_one_key_accept_it_once(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        results = await asyncio.gather(*(s.ingest(hook("evt_x", "evt_y")) for _ in range(50)))
        assert sum(len(r.accepted) for r in results) == 2
        assert sum(r.duplicates for r in results) == 98
        assert (await s.counts()).webhooks == 1

    run(backend, body)


def test_a_key_twice_in_one_body_counts_once(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        r = await s.ingest(hook("a", "b", "a"))
        assert r.accepted == ("a", "b") and r.duplicates == 1
        hooks = await s.unmapped(0, 10)
        assert [h.accepted for h in hooks] == [("a", "b")]

    run(backend, body)


def test_partly_new_webhook_keeps_only_the_new_keys_to_map(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.ingest(hook("a"))
        r = await s.ingest(hook("a", "b"))
        assert r.accepted == ("b",) and r.duplicates == 1
        by_id = {h.id: h for h in await s.unmapped(0, 10)}
        assert by_id[r.webhook_id].accepted == ("b",)  # type: ignore[index]

    run(backend, body)


def test_ledger_refuses_a_token_used_by_another_event(backend: Callable[[], Store]) -> None:
    tok = Token("tok", T0 + 900)

    async def body(s: Store) -> None:
        ok = await s.ingest(hook("e1", source="mg", tokens=[("e1", tok)]))
        same = await s.ingest(hook("e1", source="mg", tokens=[("e1", tok)]))
        with pytest.raises(InvalidSignature):
            await s.ingest(hook("e2", source="mg", tokens=[("e2", tok)]))
        with pytest.raises(InvalidSignature):  # across sources too: they may share a key
            await s.ingest(hook("e3", source="mg2", tokens=[("e3", tok)]))
        assert ok.accepted == ("e1",) and same.duplicates == 1
        # the forged event's key was not taken: it is new with a fresh token
        fresh = await s.ingest(hook("e2", source="mg", tokens=[("e2", Token("t2", T0 + 900))]))
        assert fresh.accepted == ("e2",)
        assert (await s.counts()).webhooks == 2

    run(backend, body)


def test_one_refused_token_sinks_only_its_webhook(backend: Callable[[], Store]) -> None:
    tok = Token("tok", T0 + 900)

    async def body(s: Store) -> None:
        await s.ingest(hook("e1", source="mg", tokens=[("e1", tok)]))
        results = await asyncio.gather(
            s.ingest(hook("e2", source="mg", tokens=[("e2", tok)])),
            s.ingest(hook("plain")),
            return_exceptions=True,
        )
        assert isinstance(results[0], InvalidSignature)
        assert not isinstance(results[1], BaseException) and results[1].accepted == ("plain",)

    run(backend, body)


def test_ledger_outlives_the_process(backend: Callable[[], Store]) -> None:
    tok = Token("tok", T0 + 900)
    run(backend, lambda s: s.ingest(hook("e1", source="mg", tokens=[("e1", tok)])))
    with pytest.raises(InvalidSignature):
        run(backend, lambda s: s.ingest(hook("e2", source="mg", tokens=[("e2", tok)])))


def test_ledger_tokens_are_pruned_after_expiry(backend: Callable[[], Store]) -> None:
    tok = Token("tok", T0 + 900)

    async def body(s: Store) -> None:
        await s.ingest(hook("e1", source="mg", tokens=[("e1", tok)]))
        while await s.prune(T0 + 900 + WINDOW + 1, WINDOW, 7 * 86400.0):
            pass
        later = await s.ingest(hook("e2", source="mg", tokens=[("e2", tok)], at=T0 + 2 * WINDOW))
        assert later.accepted == ("e2",)

    run(backend, body)


# -- the mapper's side


def test_unmapped_until_saved_and_saved_once(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        a = (await s.ingest(hook("a"))).webhook_id
        b = (await s.ingest(hook("b"))).webhook_id
        assert a is not None and b is not None
        assert [h.id for h in await s.unmapped(0, 10)] == [a, b]
        assert [h.id for h in await s.unmapped(a, 10)] == [b]
        queued = await s.save_mapped([rows(a, '{"name":"x"}', None)])
        assert queued["k/1"].pending == 1 and queued["k/1"].dead == 1
        assert queued["k/1"].oldest == T0
        assert await s.save_mapped([rows(a, '{"name":"x"}')]) == {}  # already saved
        assert [h.id for h in await s.unmapped(0, 10)] == [b]
        await s.save_mapped([rows(b)])  # ignored: no rows, but mapped
        assert await s.unmapped(0, 10) == []
        c = await s.counts()
        assert c.by_state["k/1"] == {PENDING: 1, DEAD: 1} and c.unmapped == 0

    run(backend, body)


def test_unmapped_survives_a_restart(backend: Callable[[], Store]) -> None:
    wid = run(backend, lambda s: s.ingest(hook("a"))).webhook_id
    hooks = run(backend, lambda s: s.unmapped(0, 10))
    assert [h.id for h in hooks] == [wid] and hooks[0].accepted is None


# -- the forwarder's side


async def _queue(s: Store, n: int, dest: str = "k/1") -> list[int]:
    wid = (await s.ingest(hook(f"q{n}-{dest}"))).webhook_id
    assert wid is not None
    await s.save_mapped([rows(wid, *[json.dumps({"n": i}) for i in range(n)], dest=dest)])
    return [r.id for r in await s.claim(dest, 0, T0)]  # claims nothing


def test_claim_takes_the_oldest_pending_rows_in_one_go(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await _queue(s, 30)
        await _queue(s, 2, dest="k/2")
        depths = await s.queue_depths(["k/1", "k/2", "k/3"])
        assert depths.keys() == {"k/1", "k/2"}
        assert depths["k/1"].pending == 30 and depths["k/2"].pending == 2
        batch = await s.claim("k/1", 25, T0)
        assert [json.loads(r.body)["n"] for r in batch] == list(range(25))
        assert all(r.attempts == 1 for r in batch)
        rest = await s.claim("k/1", 25, T0)
        assert len(rest) == 5 and not set(r.id for r in rest) & set(r.id for r in batch)
        assert await s.claim("k/1", 25, T0) == []
        assert (await s.queue_depths(["k/1"])).get("k/1") is None

    run(backend, body)


def test_concurrent_claims_never_share_a_row(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await _queue(s, 100)
        batches = await asyncio.gather(*(s.claim("k/1", 7, T0) for _ in range(20)))
        ids = [r.id for b in batches for r in b]
        assert len(ids) == len(set(ids)) == 100

    run(backend, body)


def test_delivered_released_dead_and_reset(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await _queue(s, 4)
        batch = await s.claim("k/1", 4, T0)
        ids = [r.id for r in batch]
        await s.register_destination("k/1", "k", 1)
        await s.delivered(ids[:1], [901], "k/1", T0 + 1)
        await s.release(ids[1:2], "paused: 401")
        await s.attempted(ids[2:3], "timeout")
        await s.dead_letter(ids[3:], "validation_error: bad", T0 + 2)
        c = await s.counts()
        assert c.by_state["k/1"] == {DELIVERED: 1, PENDING: 1, IN_FLIGHT: 1, DEAD: 1}
        first = await s.outbox_entry(ids[0])
        assert first is not None and first.track_id == 901 and first.state == DELIVERED
        assert first.source == "stripe" and first.event_key == "e"
        released = await s.outbox_entry(ids[1])
        assert released is not None and released.last_error == "paused: 401"
        assert await s.reset_in_flight() == 1
        assert (await s.counts()).by_state["k/1"][PENDING] == 2
        (dest,) = await s.destinations()
        assert dest.last_success_at == T0 + 1

    run(backend, body)


def test_expire_dead_letters_old_pending_rows(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.register_destination("k/1", "k", 1)
        await _queue(s, 3)
        assert await s.expire(T0 - 1, T0 + 5) == {}
        assert await s.expire(T0 + 1, T0 + 5) == {"k/1": 3}
        (dl, *_) = await s.dead_letters()
        assert dl.last_error is not None and "max_event_age" in dl.last_error

    run(backend, body)


def test_pauses_and_errors_are_kept(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.register_destination("k/1", "k", 1)
        await s.register_destination("k/2", "k", 2)
        await s.set_paused(["k/1", "k/2"], "401 invalid api key", T0)
        await s.set_error("k/1", "401 invalid api key", T0)
        await s.set_paused(["k/2"], None, T0 + 1)
        await s.register_destination("j/3", "j", 3)
        await s.set_paused(["j/3"], "rate-limited", T0, until=T0 + 600)

    run(backend, body)
    dests = {d.name: d for d in run(backend, lambda s: s.destinations())}
    assert dests["k/1"].paused_reason == "401 invalid api key" and dests["k/1"].paused_at == T0
    assert dests["k/1"].paused_until is None and dests["j/3"].paused_until == T0 + 600
    assert dests["k/1"].last_error == "401 invalid api key"
    assert dests["k/2"].paused_reason is None and dests["k/2"].paused_at is None


def test_request_log_outlives_the_process(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        for at in (T0, T0 + 1, T0 + 2):
            await s.end_request(await s.begin_request("k", at + 10), at)
        await s.begin_request("k", T0 + 13)  # the process died before the answer
        never = await s.begin_request("k", T0 + 14)
        await s.end_request(never, None)  # never left

    run(backend, body)
    assert run(backend, lambda s: s.requests_since("k", T0 + 0.5)) == [T0 + 1, T0 + 2, T0 + 13]
    assert run(backend, lambda s: s.requests_since("other", 0)) == []


def test_dead_letters_requeue_once(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        wid = (await s.ingest(hook("a"))).webhook_id
        assert wid is not None
        await s.save_mapped([rows(wid, None, '{"x":1}')])
        dead = await s.dead_letters()
        assert [d.body for d in dead] == [None]
        assert await s.requeue([(dead[0].id, '{"x":2}'), (dead[0].id, '{"x":2}')], T0 + 9) == [
            dead[0].id
        ]
        assert await s.dead_letters() == []
        assert await s.requeue([(dead[0].id, "{}")], T0) == []  # not dead any more
        entry = await s.outbox_entry(dead[0].id)
        assert entry is not None and entry.state == PENDING and entry.body == '{"x":2}'

    run(backend, body)


def test_prune_keeps_what_is_not_delivered(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.register_destination("k/1", "k", 1)
        delivered = (await s.ingest(hook("d"))).webhook_id
        dead = (await s.ingest(hook("x"))).webhook_id
        unmapped = (await s.ingest(hook("u"))).webhook_id
        assert delivered and dead and unmapped
        await s.save_mapped([rows(delivered, "{}"), rows(dead, None)])
        (row,) = await s.claim("k/1", 5, T0)
        await s.delivered([row.id], [1], "k/1", T0)
        await s.end_request(await s.begin_request("k", T0), T0)
        now = T0 + 30 * 86400.0
        while await s.prune(now, WINDOW, 7 * 86400.0):
            pass
        assert await s.webhook(delivered) is None
        assert await s.webhook(dead) is not None and await s.webhook(unmapped) is not None
        c = await s.counts()
        assert c.dedupe_keys == 0 and c.by_state["k/1"] == {DEAD: 1}
        assert await s.requests_since("k", 0) == []
        # expired keys are new again
        assert (await s.ingest(hook("d", at=now))).accepted == ("d",)

    run(backend, body)


def test_check_writable(backend: Callable[[], Store]) -> None:
    assert run(backend, lambda s: s.check_writable(1024)) is None
