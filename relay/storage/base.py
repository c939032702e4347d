"""The storage interface: every read and write of the relay's state, one class per backend.

Callers (the acknowledgement, the mapper, the forwarder, housekeeping, status, dead letters,
the CLI) use only this interface; SQL lives in the backend modules. Every method is a
coroutine; the CLI runs them with `asyncio.run`.

The life of a webhook in the store:

    ingest        the raw webhook and its provider event keys, deduped by the database in the
                  same statement, plus the replay-ledger claims; committed before the answer
    unmapped      webhooks committed but not yet mapped (after a restart, the mapper's backlog)
    save_mapped   the mapper's outbox rows (or mapping failures, dead at once); the webhook
                  leaves the unmapped set in the same transaction
    claim         the next pending rows of a destination, in flight, in one statement
    delivered / release / attempted / dead_letter / expire
    prune         retention, in small steps
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.providers.base import Token

PENDING, IN_FLIGHT, DELIVERED, DEAD = 0, 1, 2, 3


@dataclass(frozen=True)
class Incoming:
    """One verified webhook on its way into the store."""

    source: str
    received_at: float
    content_type: str
    headers: str  # JSON object, credentials removed
    body: bytes
    keys: Sequence[str]  # the provider event ids, in body order (repeats allowed)
    dedupe_window: float
    # (event key, the token that vouched for it): a token already bound to another event
    # refuses the whole webhook (InvalidSignature)
    tokens: Sequence[tuple[str, Token]] = ()


@dataclass(frozen=True)
class Ingested:
    webhook_id: int | None  # None when nothing new was stored
    accepted: tuple[str, ...]  # keys taken now (each once)
    duplicates: int


@dataclass(frozen=True)
class StoredWebhook:
    id: int
    source: str
    received_at: float
    content_type: str
    headers: dict[str, str]
    body: bytes
    accepted: tuple[str, ...] | None = None  # the keys to map; None: every event of the body


@dataclass(frozen=True)
class Output:
    """One outbox row the mapper makes: a track event, or a mapping failure (body None)."""

    destination: str
    event_key: str
    rule: int | None
    body: str | None
    error: str | None = None
    event_type: str | None = None


@dataclass(frozen=True)
class Mapped:
    webhook_id: int
    created_at: float
    outputs: Sequence[Output]


@dataclass(frozen=True)
class Queued:
    """What one destination got from a save: rows pending, and when the oldest was queued."""

    pending: int
    oldest: float | None
    dead: int = 0


@dataclass(frozen=True)
class Row:
    id: int
    body: str
    created_at: float
    attempts: int


@dataclass(frozen=True)
class OutboxEntry:
    """An outbox row as an operator sees it."""

    id: int
    destination: str
    source: str | None
    webhook_id: int | None
    event_key: str | None
    event_type: str | None
    rule: int | None
    body: str | None
    state: int
    attempts: int
    last_error: str | None
    track_id: int | None
    created_at: float
    done_at: float | None


@dataclass(frozen=True)
class DestinationRow:
    name: str
    key_id: str
    website_id: int
    paused_reason: str | None
    paused_at: float | None
    paused_until: float | None  # a rate limit's wait: no request before then (wall clock)
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None


@dataclass(frozen=True)
class Counts:
    """Per destination and state, the outbox rows; and the oldest pending row."""

    by_state: dict[str, dict[int, int]] = field(default_factory=dict)
    oldest: dict[str, float] = field(default_factory=dict)
    dedupe_keys: int = 0
    webhooks: int = 0
    unmapped: int = 0


OUTCOMES = ("pending", "delivered", "dead", "ignored")  # a webhook's, for the console's filter


@dataclass(frozen=True)
class WebhookSummary:
    """A stored webhook with where its outbox rows are (the console's list)."""

    hook: StoredWebhook
    states: dict[int, int]  # outbox rows per state
    event_types: tuple[str, ...]  # of its outbox rows, each once
    unmapped: bool  # committed, not mapped yet

    @property
    def outcome(self) -> str:
        if self.states.get(DEAD):
            return "dead"
        if self.unmapped or self.states.get(PENDING) or self.states.get(IN_FLIGHT):
            return "pending"
        return "delivered" if self.states else "ignored"


@dataclass(frozen=True)
class Activity:
    """Per step (0 the oldest) since a time: webhooks received and outbox rows delivered."""

    received: dict[int, int]
    delivered: dict[int, int]


class Store(abc.ABC):
    """The relay's state. One instance per process; `open` before use, `close` after."""

    url: str  # where it lives, for messages (never with a password)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date (numbered migrations)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- the acknowledgement

    @abc.abstractmethod
    async def ingest(self, item: Incoming) -> Ingested:
        """Store a webhook and its new event keys, deduped by the database; committed when
        this returns. Raises StoreError when it cannot be stored."""

    @abc.abstractmethod
    async def seen_in(self, source: str, key: str) -> int | None:
        """The webhook that an event key of `source` came with, while the key is remembered
        (inside the dedupe window); None when it is not. A retried track request
        (Idempotency-Key) is answered from it."""

    @abc.abstractmethod
    async def import_rows(self, item: Incoming) -> Ingested:
        """Store a chunk of imported rows as one webhook, like `ingest`, but deduped against
        every row ever imported for the source (no window: a file imported again queues
        nothing). `item.dedupe_window` is not used. Committed when this returns."""

    # -- the mapper

    @abc.abstractmethod
    async def unmapped(self, after: int, limit: int) -> list[StoredWebhook]:
        """Webhooks committed but not mapped yet, by id, after `after`."""

    @abc.abstractmethod
    async def save_mapped(self, mapped: Sequence[Mapped]) -> dict[str, Queued]:
        """The mapper's rows for these webhooks, which leave the unmapped set."""

    @abc.abstractmethod
    async def webhook(self, webhook_id: int) -> StoredWebhook | None: ...

    # -- the forwarder

    @abc.abstractmethod
    async def queue_depths(self, destinations: Sequence[str]) -> dict[str, Queued]:
        """Pending rows of these destinations (at start, and when another process may have
        queued); a destination with none is left out."""

    @abc.abstractmethod
    async def claim(self, destination: str, limit: int, now: float) -> list[Row]:
        """The next `limit` pending rows of a destination, marked in flight in one statement."""

    @abc.abstractmethod
    async def delivered(
        self, ids: Sequence[int], track_ids: Sequence[int | None], destination: str, now: float
    ) -> None: ...

    @abc.abstractmethod
    async def attempted(self, ids: Sequence[int], error: str) -> None:
        """A try failed and will be repeated: count it, keep the reason."""

    @abc.abstractmethod
    async def release(self, ids: Sequence[int], error: str | None) -> None:
        """Hand in-flight rows back to the queue."""

    @abc.abstractmethod
    async def dead_letter(self, ids: Sequence[int], reason: str, now: float) -> None: ...

    @abc.abstractmethod
    async def expire(self, cutoff: float, now: float) -> dict[str, int]:
        """Dead-letter pending rows queued before `cutoff`; rows per destination."""

    @abc.abstractmethod
    async def reset_in_flight(self) -> int:
        """After a crash: rows left in flight go back to the queue."""

    # -- destinations and pauses

    @abc.abstractmethod
    async def register_destination(self, name: str, key_id: str, website_id: int) -> None: ...

    @abc.abstractmethod
    async def set_paused(
        self, names: Sequence[str], reason: str | None, now: float, until: float | None = None
    ) -> None:
        """Pause (reason) or resume (None). `until`: a wait with an end (a 429's), else the
        pause lasts until a probe succeeds."""

    @abc.abstractmethod
    async def set_error(self, name: str, error: str, now: float) -> None: ...

    @abc.abstractmethod
    async def destinations(self) -> list[DestinationRow]: ...

    # -- the rate-limit log (requests sent per API key)

    @abc.abstractmethod
    async def begin_request(self, key_id: str, latest: float) -> int:
        """A request is about to be sent with this key; until `end_request`, it counts as
        received by the API at `latest` (the send time plus the timeout). Returns its id."""

    @abc.abstractmethod
    async def end_request(self, request_id: int, at: float) -> None:
        """The request was answered at `at` (or never left: at None deletes it)."""

    @abc.abstractmethod
    async def requests_since(self, key_id: str, since: float) -> list[float]:
        """When the API counted this key's requests, since `since`, oldest first."""

    # -- operators

    @abc.abstractmethod
    async def counts(self) -> Counts: ...

    @abc.abstractmethod
    async def dead_letters(self, limit: int | None = None) -> list[OutboxEntry]:
        """Newest first; `limit` None for all."""

    @abc.abstractmethod
    async def outbox_entry(self, row_id: int) -> OutboxEntry | None: ...

    @abc.abstractmethod
    async def requeue(self, items: Sequence[tuple[int, str]], now: float) -> list[int]:
        """Dead letters (id, body) back in the queue; the ids that were dead and are queued."""

    # -- the console (all reads; keyset pagination: `before` is the last id shown)

    @abc.abstractmethod
    async def webhook_page(
        self,
        before: int | None,
        limit: int,
        source: str | None = None,
        outcome: str | None = None,
        event_type: str | None = None,
        after: int | None = None,
    ) -> list[WebhookSummary]:
        """Webhooks newest first, with id < `before` and > `after` when given; `outcome` one
        of OUTCOMES; `event_type` matches the type of one of its outbox rows."""

    @abc.abstractmethod
    async def search_webhooks(
        self, text: str, sources: Sequence[str], before: int | None, limit: int
    ) -> list[WebhookSummary]:
        """The webhook that took event id `text` in one of `sources` (the dedupe keys), else
        webhooks whose body holds `text` (case-insensitive for ASCII), newest first."""

    @abc.abstractmethod
    async def webhook_outbox(self, webhook_id: int) -> list[OutboxEntry]:
        """The outbox rows its mapping made, by id."""

    @abc.abstractmethod
    async def event_owners(self, source: str, keys: Sequence[str]) -> dict[str, int | None]:
        """Per event key of a source, the webhook whose copy of it was taken (dedupe), if
        still known."""

    @abc.abstractmethod
    async def activity(self, since: float, step: float, now: float) -> Activity:
        """Webhooks received and rows delivered from `since` to `now`, per `step` seconds."""

    @abc.abstractmethod
    async def rule_counts(self, since: float) -> dict[tuple[str, int | None], int]:
        """Outbox rows made per (source, rule) for webhooks received since `since`."""

    @abc.abstractmethod
    async def dead_letter_page(
        self, before: int | None, limit: int, source: str | None = None
    ) -> list[OutboxEntry]:
        """Dead letters newest first, id < `before`, of one source when given."""

    @abc.abstractmethod
    async def dead_letter_ids(self, source: str | None = None) -> list[int]:
        """The ids of every dead letter (of one source when given), oldest first."""

    @abc.abstractmethod
    async def check_writable(self, need: int) -> str | None:
        """None when a webhook of `need` bytes could be stored now, else why not."""

    # -- several processes on one database (PostgreSQL's replicas). SQLite has one forwarder
    # per file, so these are trivial there.

    # True: every process on this database forwards and keeps house (the workers of
    # `relay serve --workers N` are replicas); False: worker 0 alone does.
    replicated: bool = False

    async def hold_sender(self, key_id: str) -> bool:
        """Whether this process is the one that sends with this API key now (all replicas
        together keep one rate limit). Called before each send; cheap when held."""
        return True

    def watch_queued(self, callback: Callable[[dict[str, Queued]], None]) -> None:
        """From now on, tell `callback` what other processes queued (so a full batch goes at
        once whichever process took its events). Without it, the forwarder's idle recheck
        finds their rows."""
        return None

    async def schema_problem(self) -> str | None:
        """Before opening: None when the database is reachable and its schema up to date, else
        why not, in one line (`relay check`, read-only commands). Nothing is migrated. A SQLite
        file is checked with the config (relay.config.database_problem)."""
        return None

    # -- housekeeping

    @abc.abstractmethod
    async def prune(self, now: float, dedupe_window: float, retention: float) -> int:
        """One small step of retention; rows removed (call again while it is > 0)."""


def first_each(keys: Sequence[str]) -> list[str]:
    """The keys in order, each once (a body may carry the same event twice)."""
    return list(dict.fromkeys(keys))
