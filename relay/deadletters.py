"""The dead-letter queue: outbox rows in state `dead`, with the reason and their webhook.

Replaying puts a row back into the queue. With ``remap`` (and always for a row whose mapping
had failed, which has no body), the event is taken again from its stored webhook and mapped
with the current mapping; the output of the same rule replaces the dead letter.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from relay.config import Config
from relay.ingest import load_mappings
from relay.mapping import Mapping
from relay.providers.base import WebhookRequest
from relay.store import DEAD, DELIVERED, IN_FLIGHT, PENDING


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


_SELECT = (
    "SELECT o.id, o.destination, e.source, e.key, e.type, o.rule, o.body, o.last_error, "
    "o.attempts, o.created_at, o.done_at, e.webhook_id "
    "FROM outbox o LEFT JOIN events e ON e.id = o.event_id "
)


def _row(r: sqlite3.Row) -> DeadLetter:
    return DeadLetter(*tuple(r))


def list_dead(conn: sqlite3.Connection, limit: int = 100) -> list[DeadLetter]:
    rows = conn.execute(_SELECT + "WHERE o.state = ? ORDER BY o.id DESC LIMIT ?", (DEAD, limit))
    return [_row(r) for r in rows]


def get_dead(conn: sqlite3.Connection, dead_id: int) -> DeadLetter | None:
    r = conn.execute(_SELECT + "WHERE o.id = ? AND o.state = ?", (dead_id, DEAD)).fetchone()
    return _row(r) if r is not None else None


def webhook(conn: sqlite3.Connection, webhook_id: int) -> dict[str, Any] | None:
    r = conn.execute(
        "SELECT id, source, received_at, content_type, headers, body FROM webhooks WHERE id = ?",
        (webhook_id,),
    ).fetchone()
    if r is None:
        return None
    return {
        "id": r["id"],
        "source": r["source"],
        "received_at": r["received_at"],
        "content_type": r["content_type"],
        "headers": json.loads(r["headers"]),
        "body": bytes(r["body"]),
    }


class ReplayError(Exception):
    pass


def remap(
    conn: sqlite3.Connection, config: Config, mappings: dict[str, Mapping], dl: DeadLetter
) -> str:
    """The dead letter's event mapped again by its rule with the current mapping (JSON body)."""
    if dl.webhook_id is None or dl.source is None:
        raise ReplayError(f"dead letter {dl.id}: its webhook is not stored, cannot remap")
    source = config.sources.get(dl.source)
    if source is None:
        raise ReplayError(f"dead letter {dl.id}: source {dl.source!r} is no longer configured")
    hook = webhook(conn, dl.webhook_id)
    if hook is None:
        raise ReplayError(f"dead letter {dl.id}: webhook {dl.webhook_id} was pruned")
    request = WebhookRequest("POST", "", hook["headers"], hook["body"], hook["received_at"])
    events = [e for e in source.provider.parse(request) if e.key == dl.event_key]
    if not events:
        raise ReplayError(f"dead letter {dl.id}: event {dl.event_key} not found in its webhook")
    result = mappings[source.name].apply(events[0], source.name, hook["headers"])
    for f in result.failures:
        if f.rule == dl.rule:
            raise ReplayError(f"dead letter {dl.id}: the mapping still fails: {f.reason}")
    for m in result.outputs:
        if m.rule == dl.rule:
            return json.dumps(m.event.to_json(), separators=(",", ":"), ensure_ascii=False)
    raise ReplayError(f"dead letter {dl.id}: rule {dl.rule} no longer makes an event for it")


def replay(
    conn: sqlite3.Connection,
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
        targets = [
            _row(r) for r in conn.execute(_SELECT + "WHERE o.state = ? ORDER BY o.id", (DEAD,))
        ]
    else:
        targets = []
        not_dead = []
        for i in dict.fromkeys(ids):  # an id given twice is one dead letter, replayed once
            dl = get_dead(conn, i)
            if dl is None:
                not_dead.append(_not_dead(conn, i))
            else:
                targets.append(dl)
        if not_dead:
            return [], not_dead
    mappings = load_mappings(config) if do_remap or any(t.body is None for t in targets) else {}
    done: list[int] = []
    problems: list[str] = []
    for dl in targets:
        body = dl.body
        if do_remap or body is None:
            try:
                body = remap(conn, config, mappings, dl)
            except ReplayError as e:
                problems.append(str(e))
                continue
            except Exception as e:  # a provider refusing its own stored body
                problems.append(f"dead letter {dl.id}: cannot remap: {e}")
                continue
        queued = conn.execute(
            "UPDATE outbox SET state = ?, body = ?, attempts = 0, last_error = NULL, "
            "created_at = ?, done_at = NULL, batch_id = NULL WHERE id = ? AND state = ?",
            (PENDING, body, now, dl.id, DEAD),
        ).rowcount
        if queued:
            done.append(dl.id)
        else:
            problems.append(f"dead letter {dl.id}: no longer dead, not queued again")
    return done, problems


_STATES = {PENDING: "queued to be sent", IN_FLIGHT: "being sent", DELIVERED: "delivered"}


def _not_dead(conn: sqlite3.Connection, event_id: int) -> str:
    """Why an id given to replay is not a dead letter: unknown, or in another state."""
    r = conn.execute("SELECT state FROM outbox WHERE id = ?", (event_id,)).fetchone()
    if r is None:
        return f"no dead letter with id {event_id}"
    state = _STATES.get(r["state"], f"in state {r['state']}")
    return f"no dead letter with id {event_id}: that event is {state}, not dead"
