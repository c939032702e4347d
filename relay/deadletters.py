"""The dead-letter queue: outbox rows in state `dead`, with the reason and their webhook.

Replaying puts a row back into the queue. With ``remap`` (and always for a row whose mapping
had failed, which has no body), the event is taken again from its stored webhook and mapped
with the current mapping; the output of the same rule replaces the dead letter.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from relay.config import Config
from relay.mapping import Mapping, load_mappings
from relay.providers.base import WebhookRequest
from relay.storage import DEAD, DELIVERED, IN_FLIGHT, PENDING, OutboxEntry, Store, StoredWebhook


@dataclass(frozen=True)
class DeadLetter:
    id: int
    destination: str
    source: str | None
    event_key: str | None
    event_type: str | None
    rule: int | None
    body: str | None
    reason: str | None
    attempts: int
    created_at: float
    dead_at: float | None
    webhook_id: int | None

    @classmethod
    def of(cls, e: OutboxEntry) -> DeadLetter:
        return cls(
            e.id,
            e.destination,
            e.source,
            e.event_key,
            e.event_type,
            e.rule,
            e.body,
            e.last_error,
            e.attempts,
            e.created_at,
            e.done_at,
            e.webhook_id,
        )


async def list_dead(store: Store, limit: int | None = 100) -> list[DeadLetter]:
    return [DeadLetter.of(e) for e in await store.dead_letters(limit)]


async def get_dead(store: Store, dead_id: int) -> DeadLetter | None:
    e = await store.outbox_entry(dead_id)
    return DeadLetter.of(e) if e is not None and e.state == DEAD else None


class ReplayError(Exception):
    pass


def remap(
    config: Config, mappings: dict[str, Mapping], dl: DeadLetter, hook: StoredWebhook | None
) -> str:
    """The dead letter's event mapped again by its rule with the current mapping (JSON body)."""
    if dl.webhook_id is None or dl.source is None:
        raise ReplayError(f"dead letter {dl.id}: its webhook is not stored, cannot remap")
    source = config.sources.get(dl.source)
    if source is None:
        raise ReplayError(f"dead letter {dl.id}: source {dl.source!r} is no longer configured")
    if hook is None:
        raise ReplayError(f"dead letter {dl.id}: webhook {dl.webhook_id} was pruned")
    headers = dict(hook.headers)
    headers.setdefault("content-type", hook.content_type)
    request = WebhookRequest("POST", "", headers, hook.body, hook.received_at)
    events = [e for e in source.provider.parse(request) if e.key == dl.event_key]
    if not events:
        raise ReplayError(f"dead letter {dl.id}: event {dl.event_key} not found in its webhook")
    result = mappings[source.name].apply(events[0], source.name, hook.headers)
    for f in result.failures:
        if f.rule == dl.rule:
            raise ReplayError(f"dead letter {dl.id}: the mapping still fails: {f.reason}")
    for m in result.outputs:
        if m.rule == dl.rule:
            return json.dumps(m.event.to_json(), separators=(",", ":"), ensure_ascii=False)
    raise ReplayError(f"dead letter {dl.id}: rule {dl.rule} no longer makes an event for it")


async def replay(
    store: Store,
    config: Config,
    ids: list[int] | None,
    do_remap: bool,
    now: float | None = None,
) -> tuple[list[int], list[str]]:
    """Queue dead letters again. Returns (replayed ids, problems).

    Given ids, each is queued once however often it is named; if any is not a dead letter,
    nothing is queued and every such id is reported.
    """
    now = time.time() if now is None else now
    if ids is None:
        targets = list(reversed(await list_dead(store, None)))
    else:
        targets = []
        not_dead = []
        for i in dict.fromkeys(ids):  # an id given twice is one dead letter, replayed once
            dl = await get_dead(store, i)
            if dl is None:
                not_dead.append(await _not_dead(store, i))
            else:
                targets.append(dl)
        if not_dead:
            return [], not_dead
    mappings = load_mappings(config) if do_remap or any(t.body is None for t in targets) else {}
    items: list[tuple[int, str]] = []
    problems: list[str] = []
    hooks: dict[int, StoredWebhook | None] = {}
    for dl in targets:
        body = dl.body
        if do_remap or body is None:
            if dl.webhook_id is not None and dl.webhook_id not in hooks:
                hooks[dl.webhook_id] = await store.webhook(dl.webhook_id)
            hook = hooks.get(dl.webhook_id) if dl.webhook_id is not None else None
            try:
                body = remap(config, mappings, dl, hook)
            except ReplayError as e:
                problems.append(str(e))
                continue
            except Exception as e:  # a provider refusing its own stored body
                problems.append(f"dead letter {dl.id}: cannot remap: {e}")
                continue
        items.append((dl.id, body))
    done = await store.requeue(items, now)
    gone = {i for i, _ in items} - set(done)
    problems += [f"dead letter {i}: no longer dead, not queued again" for i in sorted(gone)]
    return done, problems


_STATES = {PENDING: "queued to be sent", IN_FLIGHT: "being sent", DELIVERED: "delivered"}


async def _not_dead(store: Store, row_id: int) -> str:
    """Why an id given to replay is not a dead letter: unknown, or in another state."""
    e = await store.outbox_entry(row_id)
    if e is None:
        return f"no dead letter with id {row_id}"
    state = _STATES.get(e.state, f"in state {e.state}")
    return f"no dead letter with id {row_id}: that event is {state}, not dead"
