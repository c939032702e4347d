"""What the relay keeps, behind one interface (base.py), with one module per backend.

The next store: the lean acknowledgement (the webhook and its event keys, deduped by the
database in one statement; mapping after the commit), the rate-limit log and the unmapped set
in the database. tests/test_storage.py runs every backend through the interface. The running
relay still uses relay/store.py and relay/db.py until the mapper stage takes over.
"""

from __future__ import annotations

from pathlib import Path

from relay.storage.base import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    STATE_NAMES,
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
)

__all__ = [
    "DEAD",
    "DELIVERED",
    "IN_FLIGHT",
    "PENDING",
    "STATE_NAMES",
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
    "open_store",
]


def open_store(database: Path | str, busy_timeout: float = 10.0) -> Store:
    """The store for `[relay] database` (not opened yet: await its `open`)."""
    from relay.storage.sqlite import SQLiteStore

    return SQLiteStore(Path(database), busy_timeout)
