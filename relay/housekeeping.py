"""Housekeeping: events past max_event_age become dead letters; retention, in small steps.

It runs in the process that forwards, beside the forwarder but not inside it: a slow prune
never delays a batch, and a destination's worker never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from relay.config import Config
from relay.metrics import Metrics
from relay.storage import Store

log = logging.getLogger("relay.housekeeping")

PRUNE_PAUSE = 0.05  # between two prune steps, so webhooks never wait long behind one


class Housekeeper:
    def __init__(
        self,
        store: Store,
        config: Config,
        metrics: Metrics,
        interval: float = 30.0,
        wall: Callable[[], float] = time.time,
    ):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.interval = interval
        self.wall = wall
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def once(self) -> None:
        cfg = self.config
        now = self.wall()
        expired = await self.store.expire(now - cfg.track.max_event_age, now)
        for name, n in expired.items():
            self.metrics.dead_letters.labels(name).inc(n)
        if expired:
            log.error(
                "%d events dead-lettered: not delivered within max_event_age",
                sum(expired.values()),
            )
        while await self.store.prune(self.wall(), cfg.relay.dedupe_window, cfg.relay.retention):
            await asyncio.sleep(PRUNE_PAUSE)

    async def _run(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed; trying again later")
            await asyncio.sleep(self.interval)
