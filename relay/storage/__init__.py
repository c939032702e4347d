"""What the relay keeps, behind one interface (base.py), with one module per backend.

No SQL outside the backend modules: the acknowledgement, the mapper, the forwarder,
housekeeping, status, dead letters and the CLI all use `Store`. tests/test_storage.py runs
every backend through the interface.
"""

from __future__ import annotations

from collections.abc import Callable
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


def open_store(
    database: Path | str,
    busy_timeout: float = 10.0,
    on_commit: Callable[[float], None] | None = None,
    shared: bool = False,
) -> Store:
    """The store for `[relay] database` (not opened yet: await its `open`). `on_commit` is
    told how long each commit took; `shared`: other processes of this relay write too."""
    from relay.storage.sqlite import SQLiteStore

    return SQLiteStore(Path(database), busy_timeout, on_commit, shared)
