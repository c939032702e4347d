"""The store methods of the track proxy and of `relay import`, on every backend."""

from __future__ import annotations

from collections.abc import Callable

from relay.storage import Mapped, Output, Store
from tests.conftest import run
from tests.test_storage import T0, WINDOW, hook


def test_seen_in_names_the_webhook_a_key_came_with(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        first = await s.ingest(hook("idem:a:0", "idem:a:1", source="backend"))
        assert first.webhook_id is not None
        assert await s.seen_in("backend", "idem:a:1") == first.webhook_id
        assert await s.seen_in("backend", "idem:b:0") is None
        assert await s.seen_in("other", "idem:a:0") is None  # keys are per source

    run(backend, body)


def test_seen_in_forgets_a_key_with_the_dedupe_window(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.ingest(hook("idem:a:0", source="backend"))
        while await s.prune(T0 + WINDOW + 10, WINDOW, WINDOW * 10):
            pass
        assert await s.seen_in("backend", "idem:a:0") is None

    run(backend, body)


def test_imported_rows_are_taken_once_for_good(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        first = await s.import_rows(hook("r1", "r2", "r1", source="orders"))
        assert first.webhook_id is not None
        assert first.accepted == ("r1", "r2") and first.duplicates == 1
        unmapped = await s.unmapped(0, 10)
        assert [h.id for h in unmapped] == [first.webhook_id]
        # Long after any dedupe window, and pruned: the rows are still known.
        while await s.prune(T0 + WINDOW * 100, WINDOW, WINDOW * 10):
            pass
        again = await s.import_rows(hook("r2", "r3", source="orders", at=T0 + WINDOW * 100))
        assert again.accepted == ("r3",) and again.duplicates == 1
        pending = {h.id: h.accepted for h in await s.unmapped(0, 10)}
        assert pending == {first.webhook_id: ("r1", "r2"), again.webhook_id: ("r3",)}
        none = await s.import_rows(hook("r1", "r3", source="orders"))
        assert none.webhook_id is None and none.accepted == () and none.duplicates == 2
        other = await s.import_rows(hook("r1", source="phone"))  # per source
        assert other.accepted == ("r1",)

    run(backend, body)


def test_imported_rows_do_not_collide_with_webhook_dedupe(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        await s.ingest(hook("k1", source="orders"))
        taken = await s.import_rows(hook("k1", source="orders"))
        assert taken.accepted == ("k1",)

    run(backend, body)


def test_an_imported_chunk_is_mapped_like_a_webhook(backend: Callable[[], Store]) -> None:
    async def body(s: Store) -> None:
        chunk = await s.import_rows(hook("r1", "r2", source="orders"))
        assert chunk.webhook_id is not None
        out = [Output("k/1", k, 0, '{"name":"offline_purchase"}') for k in ("r1", "r2")]
        queued = await s.save_mapped([Mapped(chunk.webhook_id, T0, out)])
        assert queued["k/1"].pending == 2
        assert await s.unmapped(0, 10) == []
        # Saved once, whoever maps it (an interrupted import and a serving relay).
        assert await s.save_mapped([Mapped(chunk.webhook_id, T0, out)]) == {}
        assert (await s.queue_depths(["k/1"]))["k/1"].pending == 2

    run(backend, body)
