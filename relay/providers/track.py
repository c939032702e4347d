"""`provider = "track"`: the app's own events, sent to the relay as to the track API.

The relay answers the API's two endpoints (relay/proxy.py) for the source's own bearer keys.
What it stores is not the request as it came but its validated events, each with its dedupe
key and website, as ``{"events": [{"key": ..., "website_id": ..., "event": {...}}]}``: the
mapper (and a restart) reads them back with :meth:`TrackProvider.parse`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from relay.errors import InvalidBody, InvalidSignature
from relay.fitting import fit
from relay.mapping import Mapped, Mapping, MapResult
from relay.providers.base import Provider, ProviderEvent, WebhookRequest, json_body
from relay.settings import ConfigTable, Secret
from relay.trackapi import Event, Invalid, parse_batch, parse_single


class TrackProvider(Provider):
    kind = "track"

    def __init__(self, keys: Sequence[Secret], websites: tuple[int, ...] | None):
        self.keys = tuple(keys)
        self._digests = frozenset(_digest(k.reveal()) for k in self.keys)
        self.websites = websites  # None: the source's website_id

    @classmethod
    def from_config(cls, table: ConfigTable, signed: bool = True) -> TrackProvider:
        if not signed:
            table.fail("verify", "a track source is verified by its bearer keys (`keys`)")
        keys = table.secrets("keys")
        for key in keys:
            if not key.reveal().isascii() or not key.reveal().isprintable() or " " in key.reveal():
                table.fail("keys", "a key must be printable ASCII without spaces")
        websites = table._raw("websites", None, False)
        if websites is not None:
            if not isinstance(websites, list) or not websites:
                table.fail("websites", "must be a non-empty list of website ids")
            for w in websites:
                if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                    table.fail("websites", f"must hold website ids (integers >= 1), not {w!r}")
            websites = tuple(dict.fromkeys(websites))
        return cls(keys, websites)

    def allows(self, token: str) -> bool:
        """Whether a bearer token is one of this source's keys."""
        return _digest(token) in self._digests

    def verify(self, request: WebhookRequest) -> None:
        raise InvalidSignature(
            "a track source takes POST /api/v1/websites/{id}/track and /track/batch, not webhooks"
        )

    def parse(self, request: WebhookRequest) -> list[ProviderEvent]:
        """A stored request; or (for `relay map`) a request body as a client sends it."""
        body = json_body(request)
        items = body.get("events") if isinstance(body, dict) else None
        if not (
            isinstance(items, list) and items and isinstance(items[0], dict) and "key" in items[0]
        ):
            try:
                sent = (
                    parse_batch(request.body)
                    if isinstance(items, list)
                    else [parse_single(request.body)]
                )
            except Invalid as e:
                field, messages = next(iter(e.errors.items()))
                raise InvalidBody(f"not a valid track request: {field} {messages[0]}") from None
            keys = [f"request:{i}" for i in range(len(sent))]
            items = json.loads(stored_body(sent, keys, 0))["events"]
        events = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("event"), dict):
                raise InvalidBody("not a stored track request")
            data = {**item["event"], "website_id": item.get("website_id")}
            events.append(ProviderEvent(str(item["key"]), str(data.get("name", "")), data))
        return events


def stored_body(events: Sequence[Event], keys: Sequence[str], website_id: int) -> bytes:
    """What the store keeps of an accepted track request (see the module's docstring)."""
    items = [
        {"key": k, "website_id": website_id, "event": e.to_json()}
        for k, e in zip(keys, events, strict=True)
    ]
    return json.dumps({"events": items}, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Passthrough(Mapping):
    """A track source without a mapping: every event goes on as the app sent it."""

    def __init__(self, path: Any):
        super().__init__(path, "track", (), ())

    def rule_label(self, index: int) -> str:
        return "passthrough"

    def apply(self, event: ProviderEvent, source: str, headers: Any) -> MapResult:
        data = event.data
        payload = data.get("payload")
        event_out, notes = fit(
            str(data.get("name", "")),
            payload if isinstance(payload, dict) else {},
            data.get("visitor_id"),
            data.get("url"),
            data.get("referrer"),
        )
        if event_out is None:
            return MapResult((), ())
        return MapResult((Mapped(0, event_out, tuple(notes)),), ())
