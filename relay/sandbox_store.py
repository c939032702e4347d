"""The sandbox track API's state: accepted events, the per-key request window, the record of
track requests, and injected faults.

Everything here is synchronous and cheap; the HTTP layer in ``relay.sandbox`` calls it from
its handlers. The store opens its SQLite file lazily on first use, so an app can be built
(and mounted) without touching the disk, and reopens it after ``close()`` if used again.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.trackapi import Event

WINDOW_SECONDS = 60.0
REQUEST_LOG_SIZE = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    website_id INTEGER NOT NULL,
    key_fingerprint TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    visitor_id TEXT,
    url TEXT,
    referrer TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_website ON events (website_id, id);
CREATE INDEX IF NOT EXISTS events_by_key_time ON events (key_fingerprint, received_at);
"""


def fingerprint(key: str) -> str:
    """What the sandbox stores and shows instead of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class QuotaExceeded(Exception):
    """The events would take the key past its monthly quota; nothing was stored."""

    def __init__(self, used: int, quota: int):
        self.used = used
        self.quota = quota
        super().__init__(f"{used} of {quota} events used this month")


class EventStore:
    """Accepted events in one SQLite file (WAL); one commit per accepted request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=5000")
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def insert(
        self,
        website_id: int,
        key_fp: str,
        events: Sequence[Event],
        received_at: float,
        quota: int | None = None,
        month_start: float = 0.0,
    ) -> list[int]:
        """Store all events or none; ids come back in input order.

        With a quota, the key's events since ``month_start`` plus these must fit in it.
        """
        rows = [
            (
                website_id,
                key_fp,
                e.name,
                json.dumps(e.payload, ensure_ascii=False),
                e.visitor_id,
                e.url,
                e.referrer,
                received_at,
            )
            for e in events
        ]
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                if quota is not None:
                    (used,) = db.execute(
                        "SELECT COUNT(*) FROM events"
                        " WHERE key_fingerprint = ? AND received_at >= ?",
                        (key_fp, month_start),
                    ).fetchone()
                    if used + len(rows) > quota:
                        raise QuotaExceeded(used, quota)
                db.executemany(
                    "INSERT INTO events (website_id, key_fingerprint, name, payload, visitor_id,"
                    " url, referrer, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                # One writer inside one transaction: AUTOINCREMENT ids are consecutive.
                (last,) = db.execute("SELECT last_insert_rowid()").fetchone()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return list(range(last - len(rows) + 1, last + 1))

    def list(
        self, website_id: int, limit: int, name: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(matching total, newest ``limit`` events) for one website."""
        where = "website_id = ?"
        args: list[int | str] = [website_id]
        if name is not None:
            where += " AND name = ?"
            args.append(name)
        with self._lock:
            db = self._db()
            (total,) = db.execute(f"SELECT COUNT(*) FROM events WHERE {where}", args).fetchone()
            rows = db.execute(
                "SELECT id, name, payload, visitor_id, url, referrer, received_at, key_fingerprint"
                f" FROM events WHERE {where} ORDER BY id DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        events = [
            {
                "id": r[0],
                "name": r[1],
                "payload": json.loads(r[2]),
                "visitor_id": r[3],
                "url": r[4],
                "referrer": r[5],
                "received_at": r[6],
                "key": r[7],
            }
            for r in rows
        ]
        return total, events

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RateWindow:
    """A sliding 60 s log of request times per key (not a fixed window, not a token bucket).
    Tests may shorten the window, to see it roll over in seconds."""

    def __init__(self, limit: int, clock: Callable[[], float], window: float = WINDOW_SECONDS):
        self.limit = limit
        self.clock = clock
        self.window = window
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key_fp: str) -> int | None:
        """Count one request and return None, or refuse it and return Retry-After seconds."""
        now = self.clock()
        hits = self._hits.setdefault(key_fp, deque())
        while hits and hits[0] + self.window <= now:
            hits.popleft()
        if len(hits) >= self.limit:
            # Rounding first keeps float noise (29.000000001) from adding a second.
            return max(1, math.ceil(round(hits[0] + self.window - now, 6)))
        hits.append(now)
        return None


class RequestLog:
    """Counts of every track request since the last clear, and the last 10,000 of them."""

    def __init__(self, size: int = REQUEST_LOG_SIZE):
        self._records: deque[dict[str, Any]] = deque(maxlen=size)
        self._by_status: Counter[int] = Counter()

    def record(
        self,
        at: float,
        key_fp: str | None,
        website_id: int | None,
        status: int,
        events: int,
        batch: bool,
        fault: bool,
    ) -> None:
        self._by_status[status] += 1
        self._records.append(
            {
                "at": at,
                "key": key_fp,
                "website_id": website_id,
                "status": status,
                "events": events,
                "batch": batch,
                "fault": fault,
            }
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self._by_status.total(),
            "by_status": {str(s): n for s, n in sorted(self._by_status.items())},
            "requests": list(self._records),
        }

    def clear(self) -> None:
        self._records.clear()
        self._by_status.clear()


class InvalidFault(Exception):
    """A fault rule that cannot be used; ``errors`` maps field -> messages."""

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__("invalid fault rule")


@dataclass
class FaultRule:
    """What to do to matching track requests, and how often."""

    id: int
    status: int | None = None
    rate: float = 1.0
    latency_ms: float = 0.0
    for_key: str | None = None  # a key fingerprint, never the key
    for_website: int | None = None
    drop: bool = False
    malformed: bool = False
    retry_after: int | None = None
    retry_after_header: str | None = None  # sent as it is, for clients' parsers
    echo_key: bool = False  # the error answer repeats the request's API key, as some APIs do
    count: int | None = None
    seed: int | None = None
    applied: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def breaks_response(self) -> bool:
        """False for a latency-only rule: that request is slow but otherwise normal."""
        return self.drop or self.malformed or self.status is not None

    def as_dict(self) -> dict[str, Any]:
        left = None if self.count is None else self.count - self.applied
        return {
            "id": self.id,
            "status": self.status,
            "rate": self.rate,
            "latency_ms": self.latency_ms,
            "for_key": self.for_key,
            "for_website": self.for_website,
            "drop": self.drop,
            "malformed": self.malformed,
            "retry_after": self.retry_after,
            "retry_after_header": self.retry_after_header,
            "echo_key": self.echo_key,
            "count": self.count,
            "seed": self.seed,
            "applied": self.applied,
            "remaining": left,
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Faults:
    """Fault rules, in the order added; the first one that fires applies."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._next_id = 1

    def add(self, spec: Any) -> FaultRule:
        if not isinstance(spec, dict):
            raise InvalidFault({"body": ["must be a JSON object"]})
        errors: dict[str, list[str]] = {}
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "status": (lambda v: _is_int(v) and 400 <= v <= 599, "must be an integer 400..599"),
            "rate": (lambda v: _is_number(v) and 0 <= v <= 1, "must be a number 0..1"),
            "latency_ms": (
                lambda v: _is_number(v) and 0 <= v <= 600_000,
                "must be a number of milliseconds 0..600000",
            ),
            "for_key": (lambda v: isinstance(v, str) and v != "", "must be a non-empty string"),
            "for_website": (_is_int, "must be an integer"),
            "drop": (lambda v: isinstance(v, bool), "must be a boolean"),
            "malformed": (lambda v: isinstance(v, bool), "must be a boolean"),
            "retry_after": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
            "retry_after_header": (
                lambda v: isinstance(v, str) and v.isprintable() and len(v) <= 200,
                "must be a printable string of at most 200 characters",
            ),
            "echo_key": (lambda v: isinstance(v, bool), "must be a boolean"),
            "count": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
            "seed": (_is_int, "must be an integer"),
        }
        values = {k: v for k, v in spec.items() if k in checks and v is not None}
        for k, v in values.items():
            ok, message = checks[k]
            if not ok(v):
                errors[k] = [message]
        if errors:
            raise InvalidFault(errors)
        if "for_key" in values:
            values["for_key"] = fingerprint(values["for_key"])
        rule = FaultRule(id=self._next_id, **values)
        if rule.seed is not None:
            rule.rng.seed(rule.seed)
        self._next_id += 1
        self._rules.append(rule)
        return rule

    def pick(self, key_fp: str, website_id: int | None) -> FaultRule | None:
        """The first rule that matches this request and fires (by its rate), if any."""
        for rule in self._rules:
            if rule.count is not None and rule.applied >= rule.count:
                continue
            if rule.for_key is not None and rule.for_key != key_fp:
                continue
            if rule.for_website is not None and rule.for_website != website_id:
                continue
            if rule.rate < 1.0 and rule.rng.random() >= rule.rate:
                continue
            rule.applied += 1
            return rule
        return None

    def list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._rules]

    def clear(self) -> None:
        self._rules.clear()
