"""Receiving one webhook: verify, split, map, then dedupe and store in one group commit.

The web layer calls :meth:`Pipeline.handle`; it raises a WebhookError for anything the sender
got wrong, and Unavailable when the store cannot keep the webhook (so the sender retries).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping as MappingABC
from pathlib import Path

from relay import store as ops
from relay.config import Config, Source
from relay.errors import ConfigError, InvalidBody, StoreError, Unavailable, UnknownSource
from relay.examples import run_examples
from relay.mapping import Mapping, MapResult, load_mapping
from relay.metrics import Metrics
from relay.providers.base import CREDENTIAL_HEADERS, ProviderEvent, WebhookRequest
from relay.providers.shared import SharedToken
from relay.store import IncomingEvent, IngestResult, Output, Store

log = logging.getLogger("relay.webhook")


def load_mappings(config: Config) -> dict[str, Mapping]:
    """Every source's mapping, each file loaded once. Raises ConfigError."""
    by_file: dict[Path, Mapping] = {}
    out: dict[str, Mapping] = {}
    for name, source in config.sources.items():
        path = source.mapping
        if path not in by_file:
            by_file[path] = load_mapping(path)
        out[name] = by_file[path]
    return out


MAX_STORED_HEADERS = 64
MAX_STORED_HEADER_BYTES = 16384  # names and values


def safe_headers(source: Source, headers: MappingABC[str, str]) -> dict[str, str]:
    """The headers stored with a webhook and shown to its mapping: no credentials, and a bounded
    set. Content-Type (how to read the body) and the headers that the relay and the provider
    read (see Headers: signature, timestamp, id) are always kept; the others in the order they
    came while they fit in MAX_STORED_HEADERS headers and MAX_STORED_HEADER_BYTES in all. One
    that does not fit is dropped; a smaller one after it may still fit."""
    hidden = set(CREDENTIAL_HEADERS)
    if isinstance(source.verifier, SharedToken) and source.verifier.header:
        hidden.add(source.verifier.header)
    read: set[str] = getattr(headers, "read", set())
    kept = {k for k in read | {"content-type"} if k in headers and k not in hidden}
    room = MAX_STORED_HEADER_BYTES - sum(len(k) + len(headers[k]) for k in kept)
    for k, v in headers.items():
        if len(kept) >= MAX_STORED_HEADERS:
            break
        if k not in hidden and k not in kept and len(k) + len(v) <= room:
            kept.add(k)
            room -= len(k) + len(v)
    return {k: v for k, v in headers.items() if k in kept}


def outputs_of(source: Source, result: MapResult) -> tuple[str, list[Output], int]:
    """The outbox rows of one mapped event, its outcome, and how many were fitted."""
    dest = source.destination.name
    outs = [
        Output(
            dest, m.rule, json.dumps(m.event.to_json(), separators=(",", ":"), ensure_ascii=False)
        )
        for m in result.outputs
    ]
    outs += [Output(dest, f.rule, None, f"mapping failed: {f.reason}") for f in result.failures]
    if result.outputs:
        outcome = "mapped"
    elif result.failures:
        outcome = "failed"
    else:
        outcome = "ignored"
    fitted = sum(1 for m in result.outputs if m.notes)
    return outcome, outs, fitted


class Pipeline:
    def __init__(self, config: Config, store: Store, metrics: Metrics):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.mappings = load_mappings(config)

    def reload_mappings(self) -> bool:
        """Load every mapping again and run its examples; keep the old ones if any is broken."""
        try:
            fresh = load_mappings(self.config)
        except ConfigError as e:
            log.error("mapping reload refused, keeping the mappings in use: %s", e.message)
            return False
        problems = []
        for name, mapping in fresh.items():
            problems += [
                str(p) for p in run_examples(mapping, self.config.sources[name].provider, name)
            ]
        if problems:
            log.error(
                "mapping reload refused, keeping the mappings in use: an example fails: %s",
                "; ".join(problems[:3]),
            )
            return False
        self.mappings = fresh
        log.info("mappings reloaded: %s", ", ".join(sorted({str(m.path) for m in fresh.values()})))
        return True

    def source(self, name: str) -> Source:
        source = self.config.sources.get(name)
        if source is None:
            raise UnknownSource(f"no source named {name!r}")
        return source

    def map_events(
        self, source: Source, events: list[ProviderEvent], headers: dict[str, str]
    ) -> list[IncomingEvent]:
        mapping = self.mappings[source.name]
        incoming = []
        for ev in events:
            result = mapping.apply(ev, source.name, headers)
            outcome, outs, fitted = outputs_of(source, result)
            if fitted:
                self.metrics.fitted.labels(source.name).inc(fitted)
                for m in result.outputs:
                    if m.notes:
                        log.warning(
                            "source %s event %s: %s fitted to the track API: %s",
                            source.name,
                            ev.key,
                            mapping.rule_label(m.rule),
                            "; ".join(m.notes),
                        )
            for f in result.failures:
                log.error(
                    "source %s event %s: %s failed: %s",
                    source.name,
                    ev.key,
                    mapping.rule_label(f.rule),
                    f.reason,
                )
            incoming.append(IncomingEvent(ev.key, ev.type, outcome, outs))
        return incoming

    async def handle(self, source: Source, request: WebhookRequest) -> IngestResult:
        if source.verifier is not None:
            source.verifier.verify(request)
        if isinstance(source.verifier, SharedToken):  # a body token is never stored or mapped
            request = source.verifier.without_token(request)
        events = source.provider.parse(request)
        headers = safe_headers(source, request.headers)
        incoming = self.map_events(source, events, headers)
        try:
            headers_json = json.dumps(headers, ensure_ascii=False)
        except (TypeError, ValueError):
            raise InvalidBody("headers cannot be stored") from None
        item = ops.Incoming(
            source.name,
            request.received_at,
            request.content_type,
            headers_json,
            request.body,
            incoming,
            self.config.relay.dedupe_window,
            [(ev.key, ev.token) for ev in events if ev.token is not None],
        )
        try:
            result: IngestResult = await self.store.writer.run_batched(ops.ingest_many, item)
        except StoreError as e:
            raise Unavailable(str(e)) from None
        for outcome, n in result.outcomes.items():
            self.metrics.events.labels(source.name, outcome).inc(n)
        if result.duplicates:
            self.metrics.events.labels(source.name, "duplicate").inc(result.duplicates)
        for destination, n in result.dead.items():
            self.metrics.dead_letters.labels(destination).inc(n)
        return result
