"""Track-API events, and making what a mapping rendered fit the API's limits.

The track API refuses a whole request when one event breaks its limits (name 1..128 characters,
at most 10 payload keys, values of at most 255 characters, ``visitor_id`` a UUID). A relay that
let such an event through would dead-letter the batch it sits in, so every mapped event is cut
to fit here, before it is queued, and each cut is described in a short note for the logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_NAME = 128
MAX_PAYLOAD_KEYS = 10
MAX_VALUE = 255
MAX_URL = 2048

_UUID_RE = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)


def is_uuid(text: str) -> bool:
    """True for the canonical 8-4-4-4-12 hex form, the one the tracker's `ot_vid` holds."""
    return _UUID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class TrackEvent:
    """One event as the track API takes it (single or batch endpoint)."""

    name: str
    payload: dict[str, str] = field(default_factory=dict)  # flat, string values
    visitor_id: str | None = None
    url: str | None = None
    referrer: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The API's event object; absent fields and an empty payload are left out."""
        out: dict[str, Any] = {"name": self.name}
        if self.payload:
            out["payload"] = dict(self.payload)
        if self.visitor_id is not None:
            out["visitor_id"] = self.visitor_id
        if self.url is not None:
            out["url"] = self.url
        if self.referrer is not None:
            out["referrer"] = self.referrer
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackEvent:
        """The inverse of :meth:`to_json`. Raises ValueError on a malformed object."""
        if not isinstance(data, Mapping):
            raise ValueError("a track event is a JSON object")
        name = data.get("name")
        if not isinstance(name, str):
            raise ValueError("a track event needs a string name")
        payload = data.get("payload")
        if payload is None:
            payload = {}
        if not isinstance(payload, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in payload.items()
        ):
            raise ValueError("a track event's payload maps strings to strings")
        optional: dict[str, str | None] = {}
        for key in ("visitor_id", "url", "referrer"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"a track event's {key} is a string")
            optional[key] = value
        return cls(name=name, payload=dict(payload), **optional)


def fit(
    name: str,
    payload: Mapping[str, str],
    visitor_id: str | None,
    url: str | None,
    referrer: str | None,
) -> tuple[TrackEvent | None, list[str]]:
    """Cut an event to the API's limits. Returns the event (None when it cannot be sent) and
    notes saying what was cut or dropped.

    ``payload`` is taken in rule order: when it holds more than 10 non-empty values, the last
    ones are dropped. Empty values mean "absent" and are dropped without a note.
    """
    notes: list[str] = []
    if not name:
        return None, ["name is empty: event dropped"]
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME]
        notes.append(f"name cut to {MAX_NAME} characters")

    kept: dict[str, str] = {}
    extra: list[str] = []
    for key, value in payload.items():
        if not value:
            continue
        if len(kept) == MAX_PAYLOAD_KEYS:
            extra.append(key)
            continue
        if len(value) > MAX_VALUE:
            value = value[:MAX_VALUE]
            notes.append(f"payload.{key} cut to {MAX_VALUE} characters")
        kept[key] = value
    if extra:
        notes.append(f"payload has more than {MAX_PAYLOAD_KEYS} keys: dropped {', '.join(extra)}")

    if visitor_id and not is_uuid(visitor_id):
        notes.append("visitor_id is not a UUID: dropped")
        visitor_id = None
    url = _fit_url("url", url, notes)
    referrer = _fit_url("referrer", referrer, notes)
    return TrackEvent(name, kept, visitor_id or None, url, referrer), notes


def _fit_url(key: str, value: str | None, notes: list[str]) -> str | None:
    if not value:
        return None
    if len(value) > MAX_URL:
        notes.append(f"{key} cut to {MAX_URL} characters")
        return value[:MAX_URL]
    return value
