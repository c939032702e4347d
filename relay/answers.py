"""What the track API's answers mean for a batch (see the table in relay/forwarder.py).

Text from an answer (an error code, a 400's body) is passed through the caller's redactor
before it goes into any outcome, since the API may echo the request's key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import httpx

MAX_TEXT = 500  # of an answer's body kept in a dead letter


def _same(text: str) -> str:
    return text


@dataclass
class Delivered:
    event_ids: list[int | None]


@dataclass
class Invalid:
    answer: str


@dataclass
class Pause:
    status: int
    reason: str
    whole_key: bool


@dataclass
class RateLimited:
    retry_after: float


@dataclass
class Retry:
    reason: str


Outcome = Delivered | Invalid | Pause | RateLimited | Retry


def classify(response: httpx.Response, redact: Callable[[str], str] = _same) -> Outcome:
    status = response.status_code
    if status == 200:
        try:
            data = response.json()
        except ValueError:
            return Retry("malformed answer: 200 without JSON")
        if not isinstance(data, dict) or data.get("ok") is not True:
            return Retry("malformed answer: 200 without ok")
        ids = data.get("event_ids")
        if not isinstance(ids, list):
            ids = []
        return Delivered([i if isinstance(i, int) else None for i in ids])
    if status == 400:
        return Invalid(redact(response.text)[:MAX_TEXT])
    code = redact(_error_code(response))[:200]
    if status in (401, 402, 403):
        return Pause(status, f"HTTP {status} {code}", whole_key=True)
    if status == 404:
        return Pause(status, f"HTTP 404 {code}", whole_key=False)
    if status == 429:
        return RateLimited(_retry_after(response))
    return Retry(f"HTTP {status} {code}".strip())


def _error_code(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) else ""


def _retry_after(response: httpx.Response) -> float:
    candidates: list[float] = []
    header = response.headers.get("retry-after")
    if header:
        with contextlib.suppress(ValueError):
            candidates.append(float(header))
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("retry_after"), int | float):
            candidates.append(float(data["retry_after"]))
    except ValueError:
        pass
    # Never less than the API asked; with no usable answer, one whole window.
    return max(candidates) if candidates else 60.0
