"""What the track API's answers mean for a batch (see the table in relay/forwarder.py).

Text from an answer (an error code, a 400's body, a Retry-After header) is passed through the
caller's redactor before it goes into any outcome, since the API may echo the request's key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

MIN_RETRY_AFTER = 1.0  # a 429 never makes the relay send again sooner than this
DEFAULT_RETRY_AFTER = 60.0  # a 429 without a usable wait: one whole window
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
    retry_after: float  # seconds, within [MIN_RETRY_AFTER, max_wait]
    detail: str = field(default="", compare=False)  # what the API asked, for operators


@dataclass
class Retry:
    reason: str


Outcome = Delivered | Invalid | Pause | RateLimited | Retry


def classify(
    response: httpx.Response,
    redact: Callable[[str], str] = _same,
    max_wait: float = 300.0,
    now: float | None = None,
) -> Outcome:
    """`max_wait` caps a 429's wait (max_backoff); `now` is the wall clock, for HTTP-dates."""
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
        return retry_after(response, redact, max_wait, time.time() if now is None else now)
    return Retry(f"HTTP {status} {code}".strip())


def _error_code(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) else ""


def retry_after(
    response: httpx.Response, redact: Callable[[str], str], max_wait: float, now: float
) -> RateLimited:
    """How long a 429 says to wait: the Retry-After header as RFC 9110 defines it (whole
    seconds, or an HTTP-date) and the body's `retry_after`, the longer of the two; without
    either, one whole window. Then at least 1 s (no tight loop on "0") and at most `max_wait`
    (a huge or endless value must not hold the key past max_event_age)."""
    asked: list[float] = []
    notes: list[str] = []
    header = response.headers.get("retry-after")
    if header is not None:
        seconds = _header_seconds(header.strip(), now)
        shown = redact(header.strip())[:64]
        if seconds is None:
            notes.append(f"Retry-After {shown!r} ignored (neither seconds nor an HTTP-date)")
        else:
            asked.append(seconds)
            notes.append(f"Retry-After {shown!r}")
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and "retry_after" in data:
        value = data["retry_after"]
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            # NaN fails the test above; infinity and huge integers are capped below
            asked.append(float(value) if value < 1e15 else math.inf)
            notes.append(f"retry_after {value!r}")
        else:
            notes.append("retry_after ignored (not a number of seconds)")
    wait = max(asked) if asked else DEFAULT_RETRY_AFTER
    if not asked:
        notes.append(f"no usable wait, so {DEFAULT_RETRY_AFTER:.0f} s")
    clamped = max(MIN_RETRY_AFTER, min(wait, max_wait))
    if clamped < wait:
        notes.append(f"capped at max_backoff ({max_wait:g} s)")
    elif clamped > wait:
        notes.append(f"raised to {MIN_RETRY_AFTER:g} s")
    return RateLimited(clamped, "; ".join(notes))


def _header_seconds(value: str, now: float) -> float | None:
    """delay-seconds (1*DIGIT) or an HTTP-date, as seconds from `now`; None if neither."""
    if value.isascii() and value.isdigit():
        return float(int(value)) if len(value) < 16 else math.inf
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP-dates are always GMT
    return max(0.0, when.timestamp() - now)
