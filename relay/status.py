"""What an operator asks of a running (or stopped) relay: queues, pauses, dead letters."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from relay.config import Source
from relay.metrics import Metrics
from relay.storage import DEAD, DELIVERED, IN_FLIGHT, PENDING, Store


async def paused_destinations(store: Store) -> dict[str, str]:
    """Paused destinations and why, as the forwarder recorded them."""
    return {d.name: d.paused_reason for d in await store.destinations() if d.paused_reason}


@dataclass(frozen=True)
class DestinationStatus:
    name: str
    website_id: int
    sources: list[str]
    pending: int
    in_flight: int
    delivered: int
    dead: int
    oldest_pending_age: float | None
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    paused: str | None


@dataclass(frozen=True)
class Status:
    destinations: list[DestinationStatus]
    dead_letters: int
    dedupe_keys: int
    webhooks: int
    unmapped: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def read_status(store: Store, sources: Sequence[Source], now: float | None = None) -> Status:
    now = time.time() if now is None else now
    by_dest: dict[str, list[str]] = {}
    websites: dict[str, int] = {}
    for s in sources:
        for d in s.destinations:  # a track source may send to several websites
            by_dest.setdefault(d.name, []).append(s.name)
            websites[d.name] = d.website_id
    counts = await store.counts()
    rows = {d.name: d for d in await store.destinations()}
    names = sorted(set(by_dest) | set(counts.by_state) | set(rows))
    out = []
    for name in names:
        c = counts.by_state.get(name, {})
        r = rows.get(name)
        old = counts.oldest.get(name)
        out.append(
            DestinationStatus(
                name=name,
                website_id=websites.get(name, r.website_id if r else 0),
                sources=by_dest.get(name, []),
                pending=c.get(PENDING, 0),
                in_flight=c.get(IN_FLIGHT, 0),
                delivered=c.get(DELIVERED, 0),
                dead=c.get(DEAD, 0),
                oldest_pending_age=(now - old) if old is not None else None,
                last_success_at=r.last_success_at if r else None,
                last_error=r.last_error if r else None,
                last_error_at=r.last_error_at if r else None,
                paused=r.paused_reason if r else None,
            )
        )
    dead = sum(d.dead for d in out)
    return Status(out, dead, counts.dedupe_keys, counts.webhooks, counts.unmapped)


async def refresh_gauges(store: Store, metrics: Metrics, sources: Sequence[Source]) -> None:
    status = await read_status(store, sources)
    for d in status.destinations:
        metrics.outbox_depth.labels(d.name).set(d.pending + d.in_flight)
        metrics.outbox_oldest.labels(d.name).set(d.oldest_pending_age or 0)
        metrics.dead_letter_depth.labels(d.name).set(d.dead)
