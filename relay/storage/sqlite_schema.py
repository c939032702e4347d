"""The SQLite file: numbered migrations, on top of relay/db.py's until that one goes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay import db

MIGRATIONS: list[str] = [
    *db.MIGRATIONS,  # 1: the initial schema; 2: the token ledger
    # 3: the lean acknowledgement. A webhook is stored with its event keys only; the mapper
    # makes the outbox rows after the commit. Provider events are not rows of their own: they
    # are parsed again from the stored body when needed.
    """
    ALTER TABLE dedupe ADD COLUMN webhook_id INTEGER;
    CREATE TABLE unmapped (
        webhook_id INTEGER PRIMARY KEY,   -- committed, not mapped yet
        keys TEXT                         -- JSON list of the keys to map; NULL: all
    );
    CREATE TABLE outbox_new (
        id INTEGER PRIMARY KEY,
        destination TEXT NOT NULL,        -- "<api key fingerprint>/<website id>"
        webhook_id INTEGER,
        event_key TEXT,                   -- the provider event it came from
        rule INTEGER,                     -- the mapping rule that made it
        body TEXT,                        -- the track event as JSON; NULL when mapping failed
        created_at REAL NOT NULL,
        state INTEGER NOT NULL DEFAULT 0, -- 0 pending, 1 in flight, 2 delivered, 3 dead
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        track_id INTEGER,                 -- the event id the track API gave it
        done_at REAL
    );
    INSERT INTO outbox_new
        SELECT o.id, o.destination, e.webhook_id, e.key, o.rule, o.body, o.created_at,
               o.state, o.attempts, o.last_error, o.track_id, o.done_at
        FROM outbox o LEFT JOIN events e ON e.id = o.event_id;
    DROP TABLE outbox;
    ALTER TABLE outbox_new RENAME TO outbox;
    CREATE INDEX outbox_queue ON outbox (destination, state, id);
    CREATE INDEX outbox_webhook ON outbox (webhook_id);
    CREATE INDEX outbox_dead ON outbox (id) WHERE state = 3;
    DROP TABLE events;
    DROP INDEX webhooks_received;
    CREATE TABLE sent (                   -- requests sent per API key, for the rate limit
        key_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX sent_key ON sent (key_id, at);
    """,
]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    return db.connect(path, readonly=readonly)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this file has not seen yet; returns the schema version."""
    return db.migrate(conn, MIGRATIONS)
