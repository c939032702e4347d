"""A sliding log of request times per API key: never more than N requests in any 60 s window.

A token bucket would allow a burst of N right after a quiet minute and then N more as tokens
refill, which the track API's sliding window answers with 429. A log does not: a new request
may start only when fewer than N requests finished in the last 60 s and none is pending.

Each request is logged when its answer arrives, not when it was sent: the API counts the
moment it received the request, which lies between the two, so logging the later moment
keeps us on the safe side of its window whatever the latency.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        margin: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit = limit
        self.window = window
        self.margin = margin
        self.clock = clock
        self.log: deque[float] = deque()
        self.in_flight = 0
        self.blocked_until = 0.0
        self.closed = False
        self._changed = asyncio.Event()

    def close(self) -> None:
        """The relay is stopping: every wait ends now and nothing more is acquired."""
        self.closed = True
        self._changed.set()

    def _trim(self, now: float) -> None:
        while self.log and self.log[0] <= now - self.window - self.margin:
            self.log.popleft()

    def delay(self) -> float:
        """Seconds until one more request may start (0 when it may start now)."""
        now = self.clock()
        self._trim(now)
        wait = max(0.0, self.blocked_until - now)
        excess = len(self.log) + self.in_flight - self.limit + 1  # log entries that must expire
        if excess > len(self.log):
            return float("inf")  # every slot is a request still pending: wait for an answer
        if excess > 0:
            wait = max(wait, self.log[excess - 1] + self.window + self.margin - now)
        return wait

    def try_acquire(self) -> bool:
        if self.delay() > 0:
            return False
        self.in_flight += 1
        return True

    async def ready(self) -> None:
        """Wait until a request could start, without taking the slot (or the limiter closes)."""
        while not self.closed and (wait := self.delay()) > 0:
            await self._wait(wait)

    async def _wait(self, wait: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), None if wait == float("inf") else wait)

    async def acquire(self) -> bool:
        """Take a slot, waiting as long as needed; False (and no slot) once closed."""
        while not self.closed:
            wait = self.delay()
            if wait <= 0:
                self.in_flight += 1
                return True
            await self._wait(wait)
        return False

    def release(self, sent: bool = True) -> None:
        """The request answered (or failed): log it, unless it never left."""
        self.in_flight -= 1
        if sent:
            now = self.clock()
            if self.log and self.log[-1] > now:  # a preloaded request counted at its latest
                bisect.insort(self.log, now)
            else:
                self.log.append(now)
        self._changed.set()

    def block(self, seconds: float) -> None:
        """The API said 429: no request for that long (Retry-After is a floor, never shortened)."""
        self.blocked_until = max(self.blocked_until, self.clock() + seconds)
        self._changed.set()

    def preload(self, times: list[float]) -> None:
        """Requests a previous process sent in the current window (times on this clock)."""
        self.log = deque(sorted([*self.log, *times]))
        self._changed.set()
