"""The mapper: stored webhooks become outbox rows, after the acknowledgement.

The acknowledgement stores a webhook and its event keys and answers; the webhook then waits in
the store's unmapped set. The mapper takes every webhook handed to it since its last round,
maps their events on its own thread (a slow template delays only mapping, never an answer)
and saves the rows of the whole round in one write, which also takes the webhooks out of the
unmapped set. What it queued is reported to the forwarder, which so knows its queue depth
without asking the store.

A webhook committed but not mapped when the process died is still in the unmapped set: at
start the mapper maps those first (parsing the stored body again). Saving is idempotent (the
store saves a webhook's rows once, whoever mapped it), so two processes sharing a database may
both recover one without doubling it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relay.config import Config, Source
from relay.errors import ConfigError, StoreError, WebhookError
from relay.examples import run_examples
from relay.mapping import Mapping, MapResult, load_mappings
from relay.metrics import Metrics
from relay.providers.base import ProviderEvent, WebhookRequest
from relay.storage import Mapped, Output, Queued, Store, StoredWebhook

log = logging.getLogger("relay.webhook")

ROUND_EVENTS = 2048  # events mapped in one round at most (then saved in one write)
RECOVER_PAGE = 200  # stored webhooks read at a time at start
SAVE_RETRY_FIRST = 0.1
SAVE_RETRY_MAX = 2.0


@dataclass(frozen=True)
class Job:
    """One stored webhook's new events, to map."""

    webhook_id: int
    source: str
    received_at: float
    headers: dict[str, str]
    events: Sequence[ProviderEvent]


def outputs_of(source: Source, event: ProviderEvent, result: MapResult) -> list[Output]:
    """The outbox rows of one mapped event: its track events and its mapping failures."""
    website = event.data.get("website_id") if source.provider.kind == "track" else None
    dest = source.website_destination(website).name if website else source.destination.name
    outs = [
        Output(
            dest,
            event.key,
            m.rule,
            json.dumps(m.event.to_json(), separators=(",", ":"), ensure_ascii=False),
            event_type=event.type,
        )
        for m in result.outputs
    ]
    outs += [
        Output(dest, event.key, f.rule, None, f"mapping failed: {f.reason}", event.type)
        for f in result.failures
    ]
    return outs


def outcome_of(result: MapResult) -> str:
    if result.outputs:
        return "mapped"
    return "failed" if result.failures else "ignored"


def job_of(config: Config, hook: StoredWebhook) -> Job | None:
    """A stored webhook as a job again (its body parsed anew); None when it cannot be."""
    source = config.sources.get(hook.source)
    if source is None:
        log.error(
            "webhook %d: source %s is no longer configured; it stays stored, unmapped",
            hook.id,
            hook.source,
        )
        return None
    headers = dict(hook.headers)
    headers.setdefault("content-type", hook.content_type)
    request = WebhookRequest("POST", "", headers, hook.body, hook.received_at)
    try:
        events = source.provider.parse(request)
    except WebhookError as e:
        log.error("webhook %d: its stored body no longer parses: %s", hook.id, e.reason)
        events = []
    if hook.accepted is not None:
        wanted = set(hook.accepted)
        events = [ev for ev in events if ev.key in wanted]
    seen: set[str] = set()
    unique = []
    for ev in events:  # a body may carry one event twice: it was accepted once
        if ev.key not in seen:
            seen.add(ev.key)
            unique.append(ev)
    return Job(hook.id, hook.source, hook.received_at, hook.headers, unique)


def reloaded_mappings(config: Config) -> dict[str, Mapping] | None:
    """Every mapping loaded again with its examples run, or None (logged) if any is broken."""
    problems = []
    refused = "mapping reload refused, keeping the mappings in use: %s"
    try:
        fresh = load_mappings(config)
        for name, mapping in fresh.items():
            problems += [str(p) for p in run_examples(mapping, config.sources[name].provider, name)]
    except ConfigError as e:
        log.error(refused, e.message)
        return None
    except Exception as e:  # a bug must not end as a traceback in the loop's signal handler
        log.error(refused, f"{type(e).__name__}: {e}")
        return None
    if problems:
        log.error(refused, "an example fails: " + "; ".join(problems[:3]))
        return None
    log.info("mappings reloaded: %s", ", ".join(sorted({str(m.path) for m in fresh.values()})))
    return fresh


class Mapper:
    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        on_queued: Callable[[dict[str, Queued]], None] | None = None,
        inline: bool = False,
        mappings: dict[str, Mapping] | None = None,
    ):
        """`inline`: map on the event loop rather than on a thread of its own (a process that
        does nothing but map: relay/mapproc.py). `mappings`: loaded already (else loaded)."""
        self.config = config
        self.store = store
        self.metrics = metrics
        self.on_queued = on_queued
        # Told after every saved round, rows or not (relay/mapproc.py reports its counts).
        self.on_round: Callable[[dict[str, Queued]], None] | None = None
        self.mappings: dict[str, Mapping] = mappings or load_mappings(config)
        self._jobs: collections.deque[Job] = collections.deque()
        self._wake = asyncio.Event()
        self._inline = inline
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="relay-mapping")
        self._task: asyncio.Task[None] | None = None
        self._first_live: int | None = None  # the first webhook handed over by this process
        self._scan = False  # read the store's unmapped set again (scan())
        self._stopping = False

    # -- life

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mapper")

    async def stop(self, grace: float) -> None:
        """Map and save what was handed over, for up to `grace` seconds (what is left stays
        in the unmapped set, for the next start)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def scan(self) -> None:
        """Map whatever is in the store's unmapped set (stored by another process)."""
        self._scan = True
        self._wake.set()

    def submit(self, job: Job) -> None:
        if self._first_live is None:
            self._first_live = job.webhook_id
        self._jobs.append(job)
        self._wake.set()

    # -- mapping rules

    def reload(self) -> bool:
        """Load every mapping again and run its examples; keep the old ones if any is broken."""
        fresh = reloaded_mappings(self.config)
        if fresh is None:
            return False
        self.mappings = fresh
        return True

    # -- the rounds

    async def _run(self) -> None:
        try:
            await self._recover()
        except StoreError as e:
            log.error("mapper: cannot read the unmapped webhooks: %s (mapped at next start)", e)
        while True:
            if self._scan and not self._stopping:
                self._scan = False
                try:
                    await self._recover(quiet=True)
                except StoreError as e:
                    log.error("mapper: cannot read the unmapped webhooks: %s (trying again)", e)
                continue
            if not self._jobs:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs: list[Job] = []
            events = 0
            while self._jobs and (not jobs or events + len(self._jobs[0].events) <= ROUND_EVENTS):
                job = self._jobs.popleft()
                jobs.append(job)
                events += len(job.events)
            await self._round(jobs)

    async def _recover(self, quiet: bool = False) -> None:
        after = 0
        recovered = 0
        while not self._stopping:
            hooks = await self.store.unmapped(after, RECOVER_PAGE)
            if self._first_live is not None:
                hooks = [h for h in hooks if h.id < self._first_live]
            if not hooks:
                break
            after = hooks[-1].id
            jobs = [j for j in (job_of(self.config, h) for h in hooks) if j is not None]
            recovered += len(jobs)
            await self._round(jobs)
        if recovered and not quiet:
            log.warning("mapped %d webhooks stored before the last stop but not mapped", recovered)

    async def _round(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        mappings = self.mappings
        if self._inline:
            mapped = self._map(jobs, mappings)
        else:
            try:
                mapped = await loop.run_in_executor(self._thread, self._map, jobs, mappings)
            except RuntimeError:  # the thread pool is shut down: stopping
                return
        pause = SAVE_RETRY_FIRST
        failed_at: float | None = None
        while True:
            try:
                queued = await self.store.save_mapped(mapped)
                break
            except StoreError as e:
                if self._stopping:
                    log.error("mapper: %s; %d webhooks are mapped at next start", e, len(jobs))
                    return
                if failed_at is None:
                    failed_at = time.monotonic()
                    log.error("mapper: cannot save mapped events: %s; trying again", e)
                await asyncio.sleep(pause)
                pause = min(pause * 2, SAVE_RETRY_MAX)
        for dest, q in queued.items():
            if q.dead:
                self.metrics.dead_letters.labels(dest).inc(q.dead)
        if self.on_queued is not None and queued:
            self.on_queued(queued)
        if self.on_round is not None:
            self.on_round(queued)

    def _map(self, jobs: list[Job], mappings: dict[str, Mapping]) -> list[Mapped]:
        """On the mapping thread: every job's events, mapped in order."""
        out = []
        for job in jobs:
            source = self.config.sources.get(job.source)
            mapping = mappings.get(job.source)
            if source is None or mapping is None:
                continue
            rows: list[Output] = []
            outcomes: dict[str, int] = {}
            for event in job.events:
                result = mapping.apply(event, job.source, job.headers)
                outcome = outcome_of(result)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                rows += outputs_of(source, event, result)
                self._report(source, mapping, event, result)
            for outcome, n in outcomes.items():
                self.metrics.events.labels(job.source, outcome).inc(n)
            out.append(Mapped(job.webhook_id, job.received_at, rows))
        return out

    def _report(
        self, source: Source, mapping: Mapping, event: ProviderEvent, result: MapResult
    ) -> None:
        fitted = [m for m in result.outputs if m.notes]
        if fitted:
            self.metrics.fitted.labels(source.name).inc(len(fitted))
            for m in fitted:
                log.warning(
                    "source %s event %s: %s fitted to the track API: %s",
                    source.name,
                    event.key,
                    mapping.rule_label(m.rule),
                    "; ".join(m.notes),
                )
        for f in result.failures:
            log.error(
                "source %s event %s: %s failed: %s",
                source.name,
                event.key,
                mapping.rule_label(f.rule),
                f.reason,
            )
