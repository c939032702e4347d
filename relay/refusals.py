"""The last refused webhook requests, in memory, for the console's "Refused" page.

Only what an operator needs to see why a sender was turned away: never the body, never a
header value (a signature or a credential). Each process keeps its own ring.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

KEPT = 1000


@dataclass(frozen=True)
class Refusal:
    id: int
    at: float
    source: str
    status: int
    code: str
    reason: str  # the precise reason (WebhookError.detail)
    size: int  # body bytes read (0 when refused before the body)
    sender: str  # the client address


class Refusals:
    def __init__(self, kept: int = KEPT):
        self._ring: deque[Refusal] = deque(maxlen=kept)
        self._ids = itertools.count(1)

    def add(
        self, at: float, source: str, status: int, code: str, reason: str, size: int, sender: str
    ) -> None:
        self._ring.append(Refusal(next(self._ids), at, source, status, code, reason, size, sender))

    def newest(self, limit: int | None = None) -> list[Refusal]:
        out = list(reversed(self._ring))
        return out if limit is None else out[:limit]

    def __len__(self) -> int:
        return len(self._ring)
