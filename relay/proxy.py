"""The track API's own endpoints, answered by the relay for `provider = "track"` sources.

`POST /api/v1/websites/{id}/track` and `/track/batch` take a bearer key of a track source and
are validated by the rules the sandbox uses (relay/trackapi.py), in the API's order: 401, 404,
400. Accepted events are stored (committed) before the answer, which gives the relay's own
ids, then mapped and forwarded like webhook events. With an `Idempotency-Key` header, a retried
request is a duplicate inside the dedupe window: the same answer, nothing queued twice.

The relay's id of an event is its stored request's id times 100 plus its place in the request
(1-based): unique, growing, and the same for every retry of a request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.errors import PayloadTooLarge, RequestTimeout, StoreError
from relay.ingest import safe_headers
from relay.mapper import Job
from relay.providers.base import Headers, WebhookRequest
from relay.providers.track import TrackProvider, stored_body
from relay.receive import ClientGone, read_body
from relay.storage import Incoming
from relay.trackapi import Invalid, error, parse_batch, parse_single

if TYPE_CHECKING:
    from relay.app import Runtime
    from relay.config import Source

log = logging.getLogger("relay.webhook")

IDS_PER_REQUEST = 100
MAX_IDEMPOTENCY_KEY = 255


def event_ids(webhook_id: int, count: int) -> list[int]:
    return [webhook_id * IDS_PER_REQUEST + i for i in range(1, count + 1)]


def answer(webhook_id: int, count: int, batch: bool) -> JSONResponse:
    ids = event_ids(webhook_id, count)
    if batch:
        return JSONResponse({"ok": True, "processed": len(ids), "event_ids": ids})
    return JSONResponse({"ok": True, "event_id": ids[0]})


def _source_for(rt: Runtime, request: Request) -> Source | None:
    """The track source whose keys hold the request's bearer token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    for source in rt.config.sources.values():
        if isinstance(source.provider, TrackProvider) and source.provider.allows(token):
            return source
    return None


def _website(request: Request, source: Source) -> int | None:
    raw = str(request.path_params["website_id"])
    if not (raw.isascii() and raw.isdigit() and len(raw) < 19):
        return None
    website = int(raw)
    allowed = {d.website_id for d in source.destinations}
    return website if website in allowed else None


async def track(request: Request) -> Response:
    return await _handle(request, batch=False)


async def track_batch(request: Request) -> Response:
    return await _handle(request, batch=True)


async def _handle(request: Request, batch: bool) -> Response:
    rt: Runtime = request.app.state.relay
    started = time.perf_counter()
    received_at = time.time()
    source = _source_for(rt, request)
    if source is None:
        return error(401)
    website = _website(request, source)
    if website is None:
        return error(404)
    if rt.draining or rt.pipeline is None or rt.store is None or rt.mapper is None:
        return error(503, "The relay is shutting down; retry later.", {"Retry-After": "5"})
    relay = rt.config.relay
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    try:
        body = await read_body(request.receive, declared, relay.max_body_bytes, relay.body_timeout)
    except PayloadTooLarge:
        return error(413, f"The body is over {relay.max_body_bytes} bytes.")
    except RequestTimeout as e:
        return error(408, f"The body did not arrive in time: {e.reason}.")
    except ClientGone:
        return Response(status_code=400)
    idempotency = request.headers.get("idempotency-key")
    if idempotency is not None and not (
        0 < len(idempotency) <= MAX_IDEMPOTENCY_KEY
        and idempotency.isascii()
        and idempotency.isprintable()
    ):
        return Invalid(
            {"Idempotency-Key": [f"must be 1..{MAX_IDEMPOTENCY_KEY} printable ASCII characters"]}
        ).response()
    try:
        events = parse_batch(body) if batch else [parse_single(body)]
    except Invalid as e:
        return e.response()

    prefix = f"idem:{idempotency}" if idempotency is not None else f"req:{uuid.uuid4().hex}"
    keys = [f"{prefix}:{i}" for i in range(len(events))]
    headers = Headers((k.lower(), v) for k, v in request.headers.items())
    kept = safe_headers(source, headers)
    kept.pop("idempotency-key", None)
    item = Incoming(
        source.name,
        received_at,
        "application/json",
        json.dumps(kept, ensure_ascii=False),
        stored_body(events, keys, website),
        keys,
        relay.dedupe_window,
    )
    store = rt.store
    try:
        result = await store.ingest(item)
        if result.webhook_id is None:  # a retried request: answered as the first time
            first = await store.seen_in(source.name, keys[0])
            count = await _count(rt, first) if first is not None else None
            if first is not None and count is not None:
                rt.metrics.events.labels(source.name, "duplicate").inc(len(events))
                log.info("track %s 200 duplicate of request %d", source.name, first)
                return answer(first, count, batch)
            return error(503, "Retry later.", {"Retry-After": "1"})
    except StoreError as e:
        log.warning("track %s: cannot store the request: %s", source.name, e)
        return error(503, "The relay cannot store events now; retry later.", {"Retry-After": "5"})
    webhook_id = result.webhook_id
    request_obj = WebhookRequest("POST", "", {}, item.body, received_at)
    accepted = set(result.accepted)
    fresh = [ev for ev in source.provider.parse(request_obj) if ev.key in accepted]
    rt.mapper.submit(Job(webhook_id, source.name, received_at, kept, fresh))
    rt.metrics.webhooks.labels(source.name, "accepted").inc()
    log.info(
        "track %s 200 accepted=%d website=%d (%d bytes, %.1f ms)",
        source.name,
        len(fresh),
        website,
        len(body),
        (time.perf_counter() - started) * 1000,
    )
    return answer(webhook_id, len(events), batch)


async def _count(rt: Runtime, webhook_id: int) -> int | None:
    """How many events the stored track request `webhook_id` holds."""
    assert rt.store is not None
    hook = await rt.store.webhook(webhook_id)
    if hook is None:
        return None
    data = json.loads(hook.body)
    return len(data.get("events", []))


ROUTES = [
    Route("/api/v1/websites/{website_id}/track", track, methods=["POST"]),
    Route("/api/v1/websites/{website_id}/track/batch", track_batch, methods=["POST"]),
]
