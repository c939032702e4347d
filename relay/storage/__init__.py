"""What the relay keeps, behind one interface (base.py), with one module per backend.

No SQL outside the backend modules: the acknowledgement, the mapper, the forwarder,
housekeeping, status, dead letters and the CLI all use `Store`. tests/test_storage.py runs
every backend through the interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from relay.storage.base import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    OUTCOMES,
    PENDING,
    Activity,
    Counts,
    DestinationRow,
    Incoming,
    Ingested,
    Mapped,
    OutboxEntry,
    Output,
    Queued,
    Row,
    Store,
    StoredWebhook,
    WebhookSummary,
)

__all__ = [
    "DEAD",
    "DELIVERED",
    "IN_FLIGHT",
    "OUTCOMES",
    "PENDING",
    "Activity",
    "Counts",
    "DestinationRow",
    "Incoming",
    "Ingested",
    "Mapped",
    "OutboxEntry",
    "Output",
    "Queued",
    "Row",
    "Store",
    "StoredWebhook",
    "WebhookSummary",
    "is_database_url",
    "open_store",
    "run_with",
]


def open_store(
    database: Path | str,
    busy_timeout: float = 10.0,
    on_commit: Callable[[float], None] | None = None,
    shared: bool = False,
) -> Store:
    """The store for `[relay] database` (not opened yet: await its `open`): a `postgresql://`
    URL is PostgreSQL, anything else a SQLite file. `on_commit` is told how long each commit
    took; `shared`: other processes of this relay write too."""
    if isinstance(database, str) and is_database_url(database):
        from relay.errors import StoreError
        from relay.storage.postgres import PostgresStore

        scheme = database.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise StoreError(f"unknown database URL scheme {scheme}:// (use postgresql://)")

        return PostgresStore(database)
    from relay.storage.sqlite import SQLiteStore

    return SQLiteStore(Path(database), busy_timeout, on_commit, shared)


T = TypeVar("T")

URL_SCHEMES = ("postgresql", "postgres")


def is_database_url(value: str) -> bool:
    """`scheme://…`: a URL, never a file path (only PostgreSQL's schemes are known)."""
    return "://" in value and value.split("://", 1)[0].replace("+", "").isalnum()


def run_with(store: Store, body: Callable[[Store], Awaitable[T]]) -> T:
    """Open `store`, run `body` on it and close it, from outside an event loop (the CLI)."""
    import asyncio

    async def main() -> T:
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())
