"""The SQLite file: how it is opened, and its numbered migrations."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import sqlite_utils

from relay.errors import StoreError

log = logging.getLogger("relay.storage")

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        received_at REAL NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,            -- JSON object, names lower-cased, credentials removed
        body BLOB NOT NULL
    );
    CREATE INDEX webhooks_received ON webhooks (received_at);

    CREATE TABLE dedupe (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (source, key)
    ) WITHOUT ROWID;
    CREATE INDEX dedupe_seen ON dedupe (seen_at);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        webhook_id INTEGER NOT NULL REFERENCES webhooks (id),
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        type TEXT NOT NULL,
        outcome TEXT NOT NULL,            -- mapped | ignored | failed
        received_at REAL NOT NULL
    );
    CREATE INDEX events_webhook ON events (webhook_id);
    CREATE INDEX events_received ON events (received_at);

    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        destination TEXT NOT NULL,        -- "<api key fingerprint>/<website id>"
        event_id INTEGER REFERENCES events (id),
        rule INTEGER,                     -- the mapping rule that made it
        body TEXT,                        -- the track event as JSON; NULL when mapping failed
        created_at REAL NOT NULL,
        state INTEGER NOT NULL DEFAULT 0, -- 0 pending, 1 in flight, 2 delivered, 3 dead
        batch_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        track_id INTEGER,                 -- the event id the track API gave it
        done_at REAL
    );
    CREATE INDEX outbox_queue ON outbox (destination, state, id);
    CREATE INDEX outbox_done ON outbox (state, done_at);
    CREATE INDEX outbox_event ON outbox (event_id);

    CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        website_id INTEGER NOT NULL,
        paused_reason TEXT,
        paused_at REAL,
        last_success_at REAL,
        last_error TEXT,
        last_error_at REAL
    );

    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
    # 2: the token ledger: which event each signed single-use token (Mailgun's) vouched for,
    # across sources (two sources may share a signing key)
    """
    CREATE TABLE tokens (
        token TEXT PRIMARY KEY,
        source TEXT NOT NULL,             -- where it came first
        key TEXT NOT NULL,                -- the dedupe key of the event it came with
        seen_at REAL NOT NULL,
        expires_at REAL NOT NULL          -- when the signature's age check refuses it anyway
    ) WITHOUT ROWID;
    CREATE INDEX tokens_expiry ON tokens (expires_at);
    """,
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
        event_type TEXT,                  -- and its type
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
        SELECT o.id, o.destination, e.webhook_id, e.key, e.type, o.rule, o.body, o.created_at,
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
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        at REAL NOT NULL                  -- when the API counted it (at the latest)
    );
    ALTER TABLE destinations ADD COLUMN paused_until REAL;
    CREATE INDEX sent_key ON sent (key_id, at);
    """,
    # 4: the console's reads: webhooks by source and by time, deliveries by time
    """
    CREATE INDEX webhooks_source ON webhooks (source, id);
    CREATE INDEX webhooks_received ON webhooks (received_at);
    CREATE INDEX outbox_delivered ON outbox (done_at) WHERE state = 2;
    """,
    # 5: rows taken by `relay import`, by source and row id, kept for good (not a dedupe
    # window): importing a file again queues nothing
    """
    CREATE TABLE imported (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        webhook_id INTEGER NOT NULL,      -- the stored chunk of rows it came in
        PRIMARY KEY (source, key)
    ) WITHOUT ROWID;
    """,
]


def connect(
    path: Path, *, readonly: bool = False, checkpointer: bool = False
) -> sqlite3.Connection:
    """A connection to the relay's file. Raises StoreError naming the file when it cannot be
    opened (a directory, not a database, no permission, a read-only disk)."""
    try:
        return _connect(path, readonly, checkpointer)
    except (sqlite3.Error, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StoreError(f"cannot open the database {path}: {reason}") from None


def _connect(path: Path, readonly: bool, checkpointer: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=10,
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        if checkpointer:
            conn.execute("PRAGMA synchronous = FULL")
            return conn
        if not readonly:
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            # FULL: a commit is on disk before any webhook of it is answered, also across power
            # loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = OFF")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this file has not seen yet; returns the schema version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the database has schema version {version}, newer than this relay knows "
            f"({len(MIGRATIONS)}); upgrade the relay"
        )
    for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql};\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("database migrated to version %d", number)
    return len(MIGRATIONS)
