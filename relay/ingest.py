"""Receiving one webhook: verify, split into provider events, then dedupe and store.

The web layer calls :meth:`Pipeline.handle`; it raises a WebhookError for anything the sender
got wrong, and Unavailable when the store cannot keep the webhook (so the sender retries). The
answer waits only for the commit: the webhook's new events go to the mapper after it
(relay/mapper.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping as MappingABC

from relay.config import Config, Source
from relay.errors import InvalidBody, StoreError, Unavailable, UnknownSource
from relay.mapper import Job, Mapper
from relay.mapproc import MapperProcess
from relay.metrics import Metrics
from relay.providers.base import CREDENTIAL_HEADERS, WebhookRequest
from relay.providers.shared import SharedToken
from relay.storage import Incoming, Ingested, Store

log = logging.getLogger("relay.webhook")

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


class Pipeline:
    def __init__(
        self, config: Config, store: Store, metrics: Metrics, mapper: Mapper | MapperProcess
    ):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.mapper = mapper

    def source(self, name: str) -> Source:
        source = self.config.sources.get(name)
        if source is None:
            raise UnknownSource(f"no source named {name!r}")
        return source

    async def handle(self, source: Source, request: WebhookRequest) -> Ingested:
        if source.verifier is not None:
            # A verifier that must fetch something first (PayPal's certificate) does it here.
            verify_async = getattr(source.verifier, "verify_async", None)
            if verify_async is not None:
                await verify_async(request)
            else:
                source.verifier.verify(request)
        if isinstance(source.verifier, SharedToken):  # a body token is never stored or mapped
            request = source.verifier.without_token(request)
        events = source.provider.parse(request)
        headers = safe_headers(source, request.headers)
        try:
            headers_json = json.dumps(headers, ensure_ascii=False)
        except (TypeError, ValueError):
            raise InvalidBody("headers cannot be stored") from None
        item = Incoming(
            source.name,
            request.received_at,
            request.content_type,
            headers_json,
            request.body,
            [ev.key for ev in events],
            self.config.relay.dedupe_window,
            [(ev.key, ev.token) for ev in events if ev.token is not None],
        )
        try:
            result = await self.store.ingest(item)
        except StoreError as e:
            raise Unavailable(str(e)) from None
        if result.duplicates:
            self.metrics.events.labels(source.name, "duplicate").inc(result.duplicates)
        if result.webhook_id is not None:
            accepted = set(result.accepted)
            fresh = []
            for ev in events:  # in body order, each accepted key once
                if ev.key in accepted:
                    accepted.discard(ev.key)
                    fresh.append(ev)
            self.mapper.submit(
                Job(result.webhook_id, source.name, request.received_at, headers, fresh)
            )
        return result
