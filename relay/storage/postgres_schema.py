"""The PostgreSQL schema: numbered migrations, applied under an advisory lock so that several
replicas starting at once migrate once, one after the other."""

from __future__ import annotations

import logging
from typing import Any

from relay.errors import StoreError

log = logging.getLogger("relay.storage")

# Advisory lock keys (one namespace per database): the migration, retention, and the
# sender of each API key (derived from the key id, see postgres.sender_key).
MIGRATE_LOCK = 0x72656C6179_01  # "relay" 1
PRUNE_LOCK = 0x72656C6179_02

MIGRATIONS: list[str] = [
    # 1: the schema of SQLite's version 3, plus the lease of rows in flight
    """
    CREATE TABLE webhooks (
        id BIGSERIAL PRIMARY KEY,
        source TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,            -- JSON object, names lower-cased, credentials removed
        body BYTEA NOT NULL
    );

    CREATE TABLE dedupe (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        webhook_id BIGINT,
        PRIMARY KEY (source, key)
    );
    CREATE INDEX dedupe_seen ON dedupe (seen_at);

    CREATE TABLE tokens (
        token TEXT PRIMARY KEY,
        source TEXT NOT NULL,             -- where it came first
        key TEXT NOT NULL,                -- the dedupe key of the event it came with
        seen_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX tokens_expiry ON tokens (expires_at);

    CREATE TABLE unmapped (
        webhook_id BIGINT PRIMARY KEY,    -- committed, not mapped yet
        keys TEXT                         -- JSON list of the keys to map; NULL: all
    );

    CREATE TABLE outbox (
        id BIGSERIAL PRIMARY KEY,
        destination TEXT NOT NULL,        -- "<api key fingerprint>/<website id>"
        webhook_id BIGINT,
        event_key TEXT,
        event_type TEXT,
        rule INTEGER,
        body TEXT,                        -- the track event as JSON; NULL when mapping failed
        created_at DOUBLE PRECISION NOT NULL,
        state SMALLINT NOT NULL DEFAULT 0, -- 0 pending, 1 in flight, 2 delivered, 3 dead
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        track_id BIGINT,
        done_at DOUBLE PRECISION,
        owner TEXT,                       -- the replica that holds it in flight
        lease_until DOUBLE PRECISION      -- database clock; renewed while the owner lives
    );
    CREATE INDEX outbox_queue ON outbox (destination, state, id);
    CREATE INDEX outbox_webhook ON outbox (webhook_id);
    CREATE INDEX outbox_dead ON outbox (id) WHERE state = 3;
    CREATE INDEX outbox_in_flight ON outbox (owner) WHERE state = 1;

    CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        website_id BIGINT NOT NULL,
        paused_reason TEXT,
        paused_at DOUBLE PRECISION,
        paused_until DOUBLE PRECISION,
        last_success_at DOUBLE PRECISION,
        last_error TEXT,
        last_error_at DOUBLE PRECISION
    );

    CREATE TABLE sent (                   -- requests sent per API key, for the rate limit
        id BIGSERIAL PRIMARY KEY,
        key_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL      -- when the API counted it (at the latest)
    );
    CREATE INDEX sent_key ON sent (key_id, at);

    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
    # 2: the console's reads (webhooks by source and by time, deliveries by time) and the rows
    # taken by `relay import`, kept for good
    """
    CREATE INDEX webhooks_source ON webhooks (source, id);
    CREATE INDEX webhooks_received ON webhooks (received_at);
    CREATE INDEX outbox_delivered ON outbox (done_at) WHERE state = 2;
    CREATE TABLE imported (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        webhook_id BIGINT NOT NULL,
        PRIMARY KEY (source, key)
    );
    """,
]

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)"


async def current_version(conn: Any) -> int | None:
    """The schema version of the database, None when the relay never migrated it."""
    cur = await conn.execute("SELECT to_regclass('relay_schema') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return None
    cur = await conn.execute("SELECT max(version) FROM relay_schema")
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def migrate(conn: Any) -> int:
    """Bring the schema up to date on `conn` (an autocommit psycopg AsyncConnection): each
    migration in its own transaction, all under one advisory lock, so replicas starting
    together wait for the first and then find nothing left to do."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        await conn.execute(VERSION_TABLE)
        version = await current_version(conn) or 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the database has schema version {version}, newer than this relay knows "
                f"({len(MIGRATIONS)}); upgrade the relay"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            async with conn.transaction():  # a savepoint: a failed step leaves the version
                await conn.execute(sql)
                await conn.execute("INSERT INTO relay_schema (version) VALUES (%s)", (number,))
            log.info("database migrated to version %d", number)
    return len(MIGRATIONS)
