"""`provider = "import"`: rows of a CSV or JSON-lines file, taken by `relay import`.

Each row is one event: its columns are the event's fields, its type is ``row`` (a mapping
matches it with ``on = "*"``), its id the value of ``id_column`` or else a hash of the row.
`relay import` (relay/importing.py) stores rows in chunks, as
``{"rows": [{"key": ..., "line": N, "row": {...}}]}``, which :meth:`ImportProvider.parse` reads
back for the mapper.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from relay.errors import InvalidBody, InvalidSignature
from relay.providers.base import Provider, ProviderEvent, WebhookRequest, json_body
from relay.settings import ConfigTable

ROW_TYPE = "row"


class ImportProvider(Provider):
    kind = "import"

    def __init__(self, id_column: str | None):
        self.id_column = id_column

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> ImportProvider:
        id_column = table.string("id_column", None)
        if id_column is not None and not id_column:
            table.fail("id_column", "is empty: name the column that holds each row's id")
        return cls(id_column)

    def verify(self, request: WebhookRequest) -> None:
        raise InvalidSignature("an import source takes rows from `relay import`, not webhooks")

    def key(self, row: Mapping[str, str]) -> str | None:
        """The row's id: its `id_column` value (None when empty), else a hash of the row."""
        if self.id_column is not None:
            value = row.get(self.id_column)
            return value if value else None
        text = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def event(self, key: str, row: Mapping[str, Any]) -> ProviderEvent:
        return ProviderEvent(key, ROW_TYPE, row)

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        """A stored chunk; or (for `relay map`) one row as a JSON object."""
        body = json_body(request)
        if isinstance(body, dict) and "rows" not in body:
            row = {k: v for k, v in body.items() if v is not None}
            return [self.event(self.key(row) or "row", row)]
        rows = body.get("rows") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise InvalidBody("not a stored chunk of imported rows")
        events = []
        for item in rows:
            if not isinstance(item, dict) or not isinstance(item.get("row"), dict):
                raise InvalidBody("not a stored chunk of imported rows")
            events.append(self.event(str(item["key"]), item["row"]))
        return events


def stored_body(rows: list[tuple[str, int, dict[str, str]]]) -> bytes:
    """A chunk of (key, line, row) as the store keeps it."""
    items = [{"key": k, "line": n, "row": r} for k, n, r in rows]
    return json.dumps({"rows": items}, separators=(",", ":"), ensure_ascii=False).encode()
