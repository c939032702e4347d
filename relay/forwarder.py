"""Forwarding: drain the outbox into the track API in batches, within each key's rate limit.

One worker per destination (API key, website), so a paused or failing destination never
delays another. A worker sends when its queue holds a full batch or its oldest event has
waited `flush_interval`; it marks the batch in flight before sending and done after the
answer, so a crash re-sends at most the batches that were in flight.

How each answer of the track API is handled:

    200            delivered; the returned event ids are kept
    400            split the batch in halves until the refused events are alone; dead-letter those
    401, 402, 403  pause every destination of that API key; probe again with backoff
    404            pause this destination; probe again with backoff
    429            wait Retry-After (seconds or an HTTP-date; at least 1 s, at most
                   max_backoff), then send the same batch
    5xx, timeout,  back off exponentially with full jitter, capped; then send the same batch
    broken answer

Once an answer is in, its outcome (delivered with the track ids, back to the queue, dead) is
known in memory: it is written to the store again and again until the write sticks, so a store
that fails for a while leaves no batch in flight and sends nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from relay.answers import Delivered, Invalid, Outcome, Pause, RateLimited, Retry, classify
from relay.config import Config, Destination, TrackSettings
from relay.errors import StoreError
from relay.metrics import Metrics
from relay.ratelimit import SlidingWindowLimiter
from relay.redact import Redactor
from relay.storage import DestinationRow, Queued, Row, Store

log = logging.getLogger("relay.forwarder")

PAUSE_FIRST_PROBE = 5.0
BACKOFF_BASE = 0.5
IDLE_RECHECK = 1.0  # rows may also arrive from another process (a worker, a replay)
STORE_RETRY_FIRST = 0.1  # recording an outcome the store refused: first retry, then doubling
STORE_RETRY_MAX = 2.0
STORE_ERROR_PAUSE = 1.0  # the store refused a read or a claim: try again after this
SENDER_RECHECK = 1.0  # another process sends with this key: ask again after this
LONG_RATE_LIMIT = 5.0  # a 429 wait longer than this (or flush_interval) is shown as a pause


class Gate:
    """A pause: while `reason` is set nothing goes, except one probe when `until` has passed."""

    def __init__(self, name: str):
        self.name = name
        self.reason: str | None = None
        self.until = 0.0
        self.backoff = PAUSE_FIRST_PROBE
        self.probing = False

    def delay(self, now: float) -> float:
        if self.reason is None:
            return 0.0
        if self.probing:
            return 0.5
        return max(0.0, self.until - now)


class KeyState:
    def __init__(self, key_id: str, limit: int, clock: Callable[[], float], window: float):
        self.key_id = key_id
        self.limiter = SlidingWindowLimiter(limit, window, clock=clock)
        self.gate = Gate(key_id)
        self.rate_limited: str | None = None  # a long 429 wait under way: until when, and why
        self.sender = True  # this process sends with this key (see Store.hold_sender)


class Depth:
    """What one destination's queue holds, as the mapper reported it: runs of rows (when the
    oldest of the run was received, how many), oldest first. The store is asked only at start
    and when the queue looks empty for a while (rows from another process)."""

    def __init__(self) -> None:
        self.runs: collections.deque[list[float]] = collections.deque()
        self.pending = 0

    @property
    def oldest(self) -> float | None:
        return self.runs[0][0] if self.runs else None

    def set(self, pending: int, oldest: float | None) -> None:
        self.runs.clear()
        self.pending = 0
        if pending:
            self.add(pending, oldest if oldest is not None else 0.0)

    def add(self, n: int, oldest: float) -> None:
        if n > 0:
            self.runs.append([oldest, n])
            self.pending += n

    def took(self, asked: int, rows: list[Row]) -> None:
        """A claim of `asked` rows gave these; fewer means the queue is empty now."""
        if len(rows) < asked:
            self.set(0, None)
            return
        left = len(rows)
        while left and self.runs:
            run = self.runs[0]
            if run[1] > left:
                run[1] -= left
                run[0] = max(run[0], rows[-1].created_at)
                left = 0
            else:
                left -= int(run[1])
                self.runs.popleft()
        self.pending = max(0, self.pending - len(rows))
        if self.pending and not self.runs:
            self.runs.append([rows[-1].created_at, self.pending])

    def handed_back(self, rows: list[Row]) -> None:
        if rows:
            self.runs.appendleft([min(r.created_at for r in rows), len(rows)])
            self.pending += len(rows)


class Worker:
    """Drains one destination's queue."""

    def __init__(self, forwarder: Forwarder, destination: Destination, key: KeyState):
        self.f = forwarder
        self.dest = destination
        self.key = key
        self.gate = Gate(destination.name)
        self.wake = asyncio.Event()
        self.depth = Depth()
        self.idle_since: float | None = None
        self.failures = 0
        self.task: asyncio.Task[None] | None = None
        self.in_flight: list[Row] = []
        self.unrecorded: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []  # see _record
        self.url = f"{destination.base_url}/websites/{destination.website_id}/track/batch"
        self.headers = {
            "authorization": f"Bearer {destination.api_key.reveal()}",
            "content-type": "application/json",
        }

    @property
    def name(self) -> str:
        return self.dest.name

    async def run(self) -> None:
        f = self.f
        while not f.stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except StoreError as e:  # nothing was claimed: the queue waits in the store
                log.warning(
                    "forwarder %s: %s; trying again in %.0f s", self.name, e, STORE_ERROR_PAUSE
                )
                await self._sleep(STORE_ERROR_PAUSE)
            except Exception:  # a bug must not kill the worker for good
                log.exception("forwarder %s: unexpected error; retrying in 5 s", self.name)
                await self._sleep(5.0)

    async def _step(self) -> None:
        f = self.f
        settings = f.settings
        if not await f.hold_sender(self.key):
            await self._sleep(SENDER_RECHECK)
            return
        delay = max(self.key.gate.delay(f.clock()), self.gate.delay(f.clock()))
        if delay > 0:
            await self._sleep(delay)
            return
        depth = self.depth
        if depth.pending == 0:
            now = f.clock()
            if self.idle_since is None:
                self.idle_since = now
            if now - self.idle_since < IDLE_RECHECK:
                await self._sleep(self.idle_since + IDLE_RECHECK - now)
                return
            # Empty for a while as far as this process knows: another may have queued rows.
            self.idle_since = None
            queued = (await f.store.queue_depths([self.name])).get(self.name)
            if queued is not None:
                depth.set(queued.pending, queued.oldest)
            return
        self.idle_since = None
        oldest = depth.oldest
        if depth.pending < settings.batch_size and oldest is not None:
            due = oldest + settings.flush_interval - f.wall()
            if due > 0:
                await self._sleep(due)
                return
        limiter = self.key.limiter
        if limiter.delay() > 0:
            f.metrics.rate_limit_waits.labels(self.name).inc()
            await limiter.ready()  # the batch may fill up while we wait
            if f.stopping:
                return
        probe = self.key.gate.reason is not None or self.gate.reason is not None
        if probe:
            for gate in (self.key.gate, self.gate):
                if gate.reason is not None:
                    gate.probing = True
        try:
            rows = await f.store.claim(self.name, settings.batch_size, f.wall())
            depth.took(settings.batch_size, rows)
            if rows:
                self.in_flight = rows
                await self._deliver(rows)
        finally:
            self.key.gate.probing = False
            self.gate.probing = False
            if self.in_flight:  # stopped or failed mid-way: hand the rest back to the queue
                rows, self.in_flight = self.in_flight, []
                self.depth.handed_back(rows)
                await self._record("handed back", f.store.release, [r.id for r in rows], None)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def _deliver(self, rows: list[Row]) -> bool:
        """Send rows until they are delivered or dead-lettered (True), or handed back because
        the destination paused or the relay is stopping (False)."""
        f = self.f
        while rows and not f.stopping:
            outcome = await self._send(rows)
            ids = [r.id for r in rows]
            if isinstance(outcome, Delivered):
                track_ids = list(outcome.event_ids[: len(rows)])
                track_ids += [None] * (len(rows) - len(track_ids))
                self._done(rows)  # whatever happens next, these are never handed back
                await self._record(
                    "delivered", f.store.delivered, ids, track_ids, self.name, f.wall()
                )
                f.metrics.forwarded.labels(self.name).inc(len(rows))
                self.failures = 0
                self._resume()
                log.info("batch %s: %d events delivered", self.name, len(rows))
                return True
            if isinstance(outcome, Invalid):
                self._resume()
                if len(rows) == 1:
                    reason = f"validation_error: {outcome.answer}"
                    await self._dead_letter(rows, reason)
                    return True
                mid = len(rows) // 2
                log.warning(
                    "batch %s: 400 for %d events; splitting to find the refused ones",
                    self.name,
                    len(rows),
                )
                return await self._deliver(rows[:mid]) and await self._deliver(rows[mid:])
            if isinstance(outcome, RateLimited):
                await self._rate_limited(outcome)
                continue
            if isinstance(outcome, Pause):
                await self._pause(outcome)
                return False
            if f.stopping:
                return False  # not sent: the rows go back to the queue
            # Retry: 5xx, timeout, connection error, broken answer.
            self.failures += 1
            now = f.wall()
            await self._note(f.store.attempted, ids, outcome.reason)
            await self._note(f.store.set_error, self.name, outcome.reason, now)
            expired = [r for r in rows if r.created_at < now - f.settings.max_event_age]
            if expired:
                await self._dead_letter(
                    expired, f"not delivered within max_event_age; last error: {outcome.reason}"
                )
                rows = [r for r in rows if r not in expired]
            delay = random.uniform(
                0, min(f.settings.max_backoff, BACKOFF_BASE * 2 ** min(self.failures, 20))
            )
            log.warning(
                "batch %s: %s; retry %d in %.1f s", self.name, outcome.reason, self.failures, delay
            )
            await self._sleep_unless_stopping(delay)
        return not rows

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = self.f.clock() + seconds
        while not self.f.stopping and (left := deadline - self.f.clock()) > 0:
            await self._sleep(left)

    def _done(self, rows: list[Row]) -> None:
        gone = {r.id for r in rows}
        self.in_flight = [r for r in self.in_flight if r.id not in gone]

    async def _record(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Write a batch's outcome, again and again until the store takes it: the outcome is
        known only here, and a batch left in flight would be neither retried nor reported
        until a restart, then sent again even if the API had accepted it."""
        pause = STORE_RETRY_FIRST
        failed_at: float | None = None
        entry = (fn, args)
        self.unrecorded.append(entry)  # for Forwarder.stop, should the grace run out first
        while True:
            try:
                await fn(*args)
            except StoreError as e:
                if failed_at is None:
                    failed_at = self.f.clock()
                    log.error(
                        "batch %s: cannot record it as %s: %s; trying again until the store "
                        "takes it",
                        self.name,
                        what,
                        e,
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORE_RETRY_MAX)
                continue
            self.unrecorded.remove(entry)
            if failed_at is not None:
                log.warning(
                    "batch %s: recorded as %s after %.1f s of store errors",
                    self.name,
                    what,
                    self.f.clock() - failed_at,
                )
            return

    async def _note(self, fn: Callable[..., Any], *args: Any) -> None:
        """A write that only informs (attempts, last error, pause state): tried once."""
        try:
            await fn(*args)
        except StoreError as e:
            log.warning("forwarder %s: could not record %s: %s", self.name, fn.__name__, e)

    async def _dead_letter(self, rows: list[Row], reason: str) -> None:
        ids = [r.id for r in rows]
        now = self.f.wall()
        self._done(rows)
        await self._record("dead letters", self.f.store.dead_letter, ids, reason, now)
        self.f.metrics.dead_letters.labels(self.name).inc(len(rows))
        log.error("batch %s: %d events dead-lettered: %s", self.name, len(rows), reason[:300])

    async def _rate_limited(self, outcome: RateLimited) -> None:
        """A 429: no request with this key until the wait is over. A long wait shows as the
        key's destinations' pause reason, in /readyz and `relay status`, while it lasts."""
        f = self.f
        key = self.key
        wait = outcome.retry_after
        key.limiter.block(wait)
        log.warning(
            "batch %s: 429 from the track API; waiting %.0f s (%s)", self.name, wait, outcome.detail
        )
        if wait <= max(LONG_RATE_LIMIT, f.settings.flush_interval):
            await key.limiter.ready()
            return
        now = f.wall()
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + wait))
        reason = key.rate_limited = (
            f"rate-limited by the track API until {until} (HTTP 429, {outcome.detail})"
        )
        names = f.destinations_of_key(key.key_id)
        await self._note(f.store.set_paused, names, reason, now, now + wait)
        await self._note(f.store.set_error, self.name, f"HTTP 429: {outcome.detail}", now)
        await f.end_of_rate_limit(key, reason)

    async def _send(self, rows: list[Row]) -> Outcome:
        f = self.f
        body = '{"events":[' + ",".join(r.body for r in rows) + "]}"
        limiter = self.key.limiter
        if not await limiter.acquire():
            return Retry("the relay is stopping")
        sent = True
        # Kept in the store before it goes, counted as received at the latest moment the API
        # could have received it, so a relay restarted at any point stays within the limit.
        request_id = await f.log_request(self.key.key_id)
        started = f.clock()
        status = "error"
        try:
            response = await f.client.post(
                self.url, content=body.encode(), headers=self.headers, timeout=f.settings.timeout
            )
            status = str(response.status_code)
            return classify(response, f.redact, f.settings.max_backoff, f.wall())
        except httpx.TimeoutException:
            status = "timeout"
            return Retry("timeout")
        except httpx.ConnectError as e:
            sent = False
            status = "connect_error"
            return Retry(f"connection error: {self._describe(e)}")
        except httpx.HTTPError as e:
            return Retry(f"transport error: {self._describe(e)}")
        finally:
            limiter.release(sent)
            if request_id is not None:
                f.spawn(self._note(f.store.end_request, request_id, f.wall() if sent else None))
            f.metrics.latency.labels(self.name).observe(f.clock() - started)
            f.metrics.batches.labels(self.name, status).inc()

    def _describe(self, e: Exception) -> str:
        """An exception from the transport, as shown to operators: its text is not ours."""
        text = self.f.redact(str(e))[:200]
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    async def _pause(self, outcome: Pause) -> None:
        """Pause the key or this destination; every row in flight goes back to the queue."""
        f = self.f
        gate = self.key.gate if outcome.whole_key else self.gate
        first = gate.reason is None
        if first:
            gate.backoff = min(PAUSE_FIRST_PROBE, f.settings.max_backoff)
        gate.reason = outcome.reason
        gate.until = f.clock() + gate.backoff
        wait = gate.backoff
        gate.backoff = min(f.settings.max_backoff, gate.backoff * 2)
        names = f.destinations_of_key(self.key.key_id) if outcome.whole_key else [self.name]
        now = f.wall()
        ids = [r.id for r in self.in_flight]
        self.depth.handed_back(self.in_flight)
        self.in_flight = []
        await self._record("handed back", f.store.release, ids, outcome.reason)
        await self._note(f.store.set_paused, names, outcome.reason, now)
        await self._note(f.store.set_error, self.name, outcome.reason, now)
        for name in names:
            f.metrics.paused.labels(name).set(1)
        scope = (
            f"every destination of API key {self.key.key_id}" if outcome.whole_key else self.name
        )
        if first:
            log.error(
                "PAUSED %s: the track API answered %s; events are kept; probing again in %.0f s",
                scope,
                outcome.reason,
                wait,
            )
        else:
            log.error("still PAUSED %s (%s); next probe in %.0f s", scope, outcome.reason, wait)

    def _resume(self) -> None:
        f = self.f
        for gate, names in (
            (self.key.gate, f.destinations_of_key(self.key.key_id)),
            (self.gate, [self.name]),
        ):
            if gate.reason is not None:
                log.warning(
                    "RESUMED %s: the track API accepts again (was: %s)", gate.name, gate.reason
                )
                gate.reason = None
                gate.backoff = PAUSE_FIRST_PROBE
                for name in names:
                    f.metrics.paused.labels(name).set(0)
                f.spawn(self._note(f.store.set_paused, names, None, f.wall()))
                for name in names:
                    f.workers[name].wake.set()


class Forwarder:
    def __init__(
        self,
        store: Store,
        config: Config,
        client: httpx.AsyncClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        window: float = 60.0,
    ):
        """`window`: the seconds requests_per_minute counts over; the track API's is 60 s
        (tests shorten it, with a sandbox of the same window)."""
        self.store = store
        self.config = config
        self.settings: TrackSettings = config.track
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.redact = Redactor.of(config)  # for the track API's text, before it is kept
        self.stopping = False
        self.keys: dict[str, KeyState] = {}
        self.workers: dict[str, Worker] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        for dest in config.destinations:
            key = self.keys.get(dest.key_id)
            if key is None:
                key = self.keys[dest.key_id] = KeyState(
                    dest.key_id, self.settings.requests_per_minute, clock, window
                )
            self.workers[dest.name] = Worker(self, dest, key)

    def destinations_of_key(self, key_id: str) -> list[str]:
        return [w.name for w in self.workers.values() if w.key.key_id == key_id]

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Take up where the last process left off: rows in flight back in the queue, the
        queues' depths, each key's requests of the current window, the pauses."""
        store = self.store
        reset = await store.reset_in_flight()
        if reset:
            log.warning("re-sending %d events that were in flight when the relay stopped", reset)
        depths = await store.queue_depths(list(self.workers))
        for w in self.workers.values():
            await store.register_destination(w.name, w.key.key_id, w.dest.website_id)
            queued = depths.get(w.name)
            if queued is not None:
                w.depth.set(queued.pending, queued.oldest)
        now, mono = self.wall(), self.clock()
        for key in self.keys.values():
            since = now - key.limiter.window - key.limiter.margin
            times = await store.requests_since(key.key_id, since)
            key.limiter.preload([mono - (now - t) for t in times])
        rows = {d.name: d for d in await store.destinations()}
        for w in self.workers.values():
            await self._restore_pause(w, rows.get(w.name), now)
        if store.replicated:
            for key in self.keys.values():
                key.sender = False  # elected before its first send
        store.watch_queued(self.queued)
        for w in self.workers.values():
            w.task = asyncio.create_task(w.run(), name=f"forward {w.name}")

    async def hold_sender(self, key: KeyState) -> bool:
        """Whether this process sends with `key` now (one sender per key across the processes
        of one database). A process that becomes the sender takes the key's window from the
        store's request log: what the previous sender sent counts."""
        held = await self.store.hold_sender(key.key_id)
        if held and not key.sender:
            now, mono = self.wall(), self.clock()
            times = await self.store.requests_since(
                key.key_id, now - key.limiter.window - key.limiter.margin
            )
            key.limiter.log.clear()
            key.limiter.preload([mono - (now - t) for t in times])
            log.info("sending with API key %s (%d requests in its window)", key.key_id, len(times))
            names = self.destinations_of_key(key.key_id)
            depths = await self.store.queue_depths(names)  # others queued meanwhile
            for name in names:
                q = depths.get(name)
                self.workers[name].depth.set(q.pending if q else 0, q.oldest if q else None)
        elif not held and key.sender and self.store.replicated:
            log.info("another process sends with API key %s", key.key_id)
        key.sender = held
        return held

    async def _restore_pause(self, w: Worker, row: DestinationRow | None, now: float) -> None:
        if row is None or row.paused_reason is None:
            return
        if row.paused_until is not None:  # a 429's wait: it ends when it ends
            left = row.paused_until - now
            if left <= 0:
                await self.store.set_paused([w.name], None, now)
                return
            w.key.limiter.block(left)
            if w.key.rate_limited != row.paused_reason:
                w.key.rate_limited = row.paused_reason
                self.spawn(self.end_of_rate_limit(w.key, row.paused_reason))
            log.warning("%s: still %s", w.name, row.paused_reason)
            return
        # Paused by the API's answer: probe at once, the operator may have fixed it meanwhile.
        w.gate.reason = row.paused_reason
        w.gate.until = self.clock()
        self.metrics.paused.labels(w.name).set(1)
        log.warning("%s: was PAUSED (%s); probing again", w.name, row.paused_reason)

    async def end_of_rate_limit(self, key: KeyState, reason: str) -> None:
        """When a long 429 wait is over, its pause reason goes (unless a later 429 replaced
        it, or the key was paused for another reason meanwhile)."""
        await key.limiter.ready()
        if key.rate_limited != reason or self.stopping:
            return
        key.rate_limited = None
        if key.gate.reason is None:
            names = [
                n
                for n in self.destinations_of_key(key.key_id)
                if self.workers[n].gate.reason is None
            ]
            try:
                await self.store.set_paused(names, None, self.wall())
            except StoreError as e:
                log.warning("forwarder: could not record the end of a rate limit: %s", e)

    async def log_request(self, key_id: str) -> int | None:
        try:
            return await self.store.begin_request(key_id, self.wall() + self.settings.timeout)
        except StoreError as e:
            log.warning("forwarder: the request log is not writable (%s); sending anyway", e)
            return None

    def queued(self, queued: dict[str, Queued]) -> None:
        """The mapper saved rows: wake the destinations that got some."""
        for name, q in queued.items():
            worker = self.workers.get(name)
            if worker is not None and q.pending:
                worker.depth.add(q.pending, q.oldest if q.oldest is not None else self.wall())
                worker.wake.set()

    @property
    def running(self) -> bool:
        tasks = [w.task for w in self.workers.values()]
        return not self.stopping and all(t is not None and not t.done() for t in tasks)

    def paused(self) -> dict[str, str]:
        """Paused destinations and why."""
        out: dict[str, str] = {}
        for w in self.workers.values():
            reason = w.gate.reason or w.key.gate.reason or w.key.rate_limited
            if reason:
                out[w.name] = reason
        return out

    async def stop(self, grace: float) -> None:
        """Finish or hand back in-flight sends within `grace` seconds."""
        self.stopping = True
        for key in self.keys.values():
            key.limiter.close()
        for w in self.workers.values():
            w.wake.set()
        tasks = [w.task for w in self.workers.values() if w.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for w in self.workers.values():
            # Outcomes the store had not taken yet, then what was never answered: one last try
            # each; what still fails stays in flight and is sent again at the next start.
            jobs = [*w.unrecorded]
            w.unrecorded = []
            if w.in_flight:
                jobs.append((self.store.release, ([r.id for r in w.in_flight], None)))
                w.in_flight = []
            for fn, args in jobs:
                try:
                    await fn(*args)
                except StoreError as e:
                    log.error("forwarder %s: events left in flight: %s", w.name, e)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
