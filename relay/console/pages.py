"""The pages that only read: Overview, Webhooks (list, live rows, detail), Refused."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from relay.providers.base import WebhookRequest
from relay.refusals import KEPT
from relay.storage import DEAD, DELIVERED, IN_FLIGHT, OUTCOMES, PENDING, StoredWebhook
from relay.storage.base import WebhookSummary

if TYPE_CHECKING:
    from relay.console.app import Console
    from relay.console.auth import Session

PAGE = 50
STATE_WORDS = {PENDING: "pending", IN_FLIGHT: "in flight", DELIVERED: "delivered", DEAD: "dead"}
HIDDEN = "(hidden)"
# Header values never shown: credentials and signatures (stored ones are already without
# credentials; signatures and tokens are hidden too).
SENSITIVE = ("signature", "authorization", "cookie", "token", "secret", "api-key", "apikey")


async def overview(console: Console, request: Request, session: Session) -> Response:
    rt = console.runtime
    store = rt.store
    config = rt.config
    now = time.time()
    if store is None:
        return console.render(
            request,
            session,
            "overview.html",
            page="Overview",
            destinations=[],
            chart=chart({}, {}, 60),
            webhooks_note="starting",
        )
    rows = {d.name: d for d in await store.destinations()}
    dests = config.destinations
    depths = await store.queue_depths([d.name for d in dests])
    dead = len(await store.dead_letter_ids())
    paused_now = rt.forwarder.paused() if rt.forwarder is not None else {}
    track = config.track
    out = []
    for d in dests:
        q = depths.get(d.name)
        row = rows.get(d.name)
        window = rt.rate_window
        used = len(await store.requests_since(d.key_id, now - window))
        backlog = q.pending if q else 0
        per_second = track.requests_per_minute * track.batch_size / window
        out.append(
            {
                "name": d.name,
                "sources": [
                    s.name for s in config.sources.values() if s.destination.name == d.name
                ],
                "backlog": backlog,
                "oldest": (now - q.oldest) if q and q.oldest is not None else None,
                "used": used,
                "limit": track.requests_per_minute,
                "drain": backlog / per_second,
                "paused": paused_now.get(d.name) or (row.paused_reason if row else None),
                "last_error": row.last_error if row else None,
                "last_error_at": row.last_error_at if row else None,
            }
        )
    start = now - 3600
    act = await store.activity(start, 60.0, now)
    return console.render(
        request,
        session,
        "overview.html",
        page="Overview",
        destinations=out,
        chart=chart(act.received, act.delivered, 60),
        webhooks_note=f"{sum(act.received.values())} webhooks received in the last hour; "
        f"{dead} dead letter{'' if dead == 1 else 's'}.",
        dead=dead,
    )


def chart(received: dict[int, int], delivered: dict[int, int], steps: int) -> dict[str, Any]:
    width, height = 600, 120
    top = max([1, *received.values(), *delivered.values()])
    w = width / steps / 2
    bars = []
    for i in range(steps):
        rx, dx = received.get(i, 0), delivered.get(i, 0)
        bars.append(
            {
                "x": round(i * 2 * w, 2),
                "w": round(w * 0.9, 2),
                "rx": round(rx / top * height, 2),
                "dx": round(dx / top * height, 2),
                "rx_n": rx,
                "dx_n": dx,
                "label": f"{steps - i} min ago",
            }
        )
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "max": top,
        "received": sum(received.values()),
        "delivered": sum(delivered.values()),
    }


@dataclass(frozen=True)
class Filters:
    source: str | None
    outcome: str | None
    type: str | None
    q: str | None

    @classmethod
    def of(cls, request: Request, sources: list[str]) -> Filters:
        def get(name: str) -> str | None:
            value = request.query_params.get(name, "").strip()
            return value[:500] or None

        source = get("source")
        outcome = get("outcome")
        return cls(
            source if source in sources else None,
            outcome if outcome in OUTCOMES else None,
            get("type"),
            get("q"),
        )

    @property
    def any(self) -> bool:
        return any((self.source, self.outcome, self.type, self.q))

    def query(self, **more: Any) -> str:
        pairs = {k: v for k, v in vars(self).items() if v}
        pairs.update({k: v for k, v in more.items() if v is not None})
        return urlencode(pairs)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) < 19 else None


async def _page(
    console: Console, f: Filters, before: int | None, after: int | None
) -> list[WebhookSummary]:
    store = console.runtime.store
    assert store is not None
    if f.q:
        return await store.search_webhooks(f.q, list(console.runtime.config.sources), before, PAGE)
    return await store.webhook_page(before, PAGE, f.source, f.outcome, f.type, after)


def _row(console: Console, w: WebhookSummary) -> dict[str, Any]:
    types = list(w.event_types) or [e[1] for e in _provider_events(console, w.hook)[0]]
    return {
        "id": w.hook.id,
        "received_at": w.hook.received_at,
        "source": w.hook.source,
        "types": list(dict.fromkeys(types)),
        "outcome": w.outcome,
        "size": len(w.hook.body),
    }


def _provider_events(
    console: Console, hook: StoredWebhook
) -> tuple[list[tuple[str, str]], str | None]:
    source = console.runtime.config.sources.get(hook.source)
    if source is None:
        return [], f"source {hook.source!r} is no longer configured"
    headers = dict(hook.headers)
    headers.setdefault("content-type", hook.content_type)
    request = WebhookRequest("POST", "", headers, hook.body, hook.received_at)
    try:
        return [(e.key, e.type) for e in source.provider.parse(request)], None
    except Exception as e:  # a body stored by an older relay, or another provider setting
        return [], str(getattr(e, "reason", e))


async def webhooks(console: Console, request: Request, session: Session) -> Response:
    sources = list(console.runtime.config.sources)
    f = Filters.of(request, sources)
    before = _int(request.query_params.get("before"))
    found = await _page(console, f, before, None)
    rows = [_row(console, w) for w in found]
    newest = rows[0]["id"] if rows else 0
    live = f.query(after=newest) if before is None and not f.q else None
    more = f.query(before=rows[-1]["id"]) if len(rows) == PAGE else None
    return console.render(
        request,
        session,
        "webhooks.html",
        page="Webhooks",
        rows=rows,
        f=f,
        sources=sources,
        outcomes=OUTCOMES,
        live=live,
        more=more,
    )


async def webhook_rows(console: Console, request: Request, session: Session) -> Response:
    """The rows newer than `after`, and the poller that asks again (htmx, every 2 s)."""
    f = Filters.of(request, list(console.runtime.config.sources))
    after = _int(request.query_params.get("after")) or 0
    found = [] if f.q else await _page(console, f, None, after)
    rows = [_row(console, w) for w in found]
    newest = rows[0]["id"] if rows else after
    html = console.templates.get_template("_rows.html").render(
        base="/console", rows=rows, live=f.query(after=newest)
    )
    return Response(html, media_type="text/html", headers={"cache-control": "no-store"})


def shown_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    return [
        (k, HIDDEN if any(word in k.lower() for word in SENSITIVE) else v)
        for k, v in sorted(headers.items())
    ]


def pretty(body: bytes, content_type: str) -> str:
    text = body.decode("utf-8", "replace")
    if "json" in content_type or text.lstrip()[:1] in ("{", "["):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            return text
    if "x-www-form-urlencoded" in content_type:
        return "\n".join(f"{k} = {v}" for k, v in parse_qsl(text, keep_blank_values=True))
    return text


async def webhook(console: Console, request: Request, session: Session) -> Response:
    store = console.runtime.store
    assert store is not None
    wid = request.path_params["id"]
    hook = await store.webhook(wid)
    if hook is None:
        return console.render(
            request,
            session,
            "missing.html",
            status=404,
            page="Webhooks",
            what=f"No stored webhook with id {wid} (pruned, or never stored).",
        )
    outbox = await store.webhook_outbox(wid)
    events, parse_error = _provider_events(console, hook)
    owners = await store.event_owners(hook.source, [k for k, _ in events])
    made = {o.event_key for o in outbox}
    shown_events = []
    for key, etype in events:
        owner = owners.get(key)
        if owner == wid or (owner is None and key in made):
            taken = "accepted"
        elif owner is not None:
            taken = f"duplicate (taken by webhook #{owner})"
        else:
            taken = "not known any more (past the dedupe window)"
        shown_events.append({"key": key, "type": etype, "taken": taken})
    mapping = None
    if console.runtime.mapper is not None:
        mapping = console.runtime.mapper.mappings.get(hook.source)
    rows = []
    for o in outbox:
        name = None
        body = None
        if o.body:
            try:
                data = json.loads(o.body)
                name = data.get("name") if isinstance(data, dict) else None
                body = json.dumps(data, indent=2, ensure_ascii=False)
            except ValueError:
                body = o.body
        rule = f"events[{o.rule}]" if o.rule is not None else "the mapping"
        if mapping is not None and o.rule is not None and o.rule < len(mapping.rules):
            rule = mapping.rule_label(o.rule)
        word = STATE_WORDS.get(o.state, str(o.state))
        rows.append(
            {
                "state": word,
                "state_class": word.replace(" ", "-"),
                "name": name,
                "event_key": o.event_key,
                "rule": rule,
                "destination": o.destination,
                "track_id": o.track_id if o.state == DELIVERED else None,
                "error": o.last_error if o.state == DEAD else None,
                "dead_id": o.id if o.state == DEAD else None,
                "body": body,
            }
        )
    summary = WebhookSummary(
        hook,
        {s: sum(1 for o in outbox if o.state == s) for s in {o.state for o in outbox}},
        (),
        not outbox and await _waiting(console, wid),
    )
    return console.render(
        request,
        session,
        "webhook.html",
        page="Webhooks",
        hook=hook,
        outcome=summary.outcome,
        events=shown_events,
        parse_error=parse_error,
        outbox=rows,
        unmapped=summary.unmapped,
        headers=shown_headers(hook.headers),
        body=pretty(hook.body, hook.content_type),
        size=len(hook.body),
    )


async def _waiting(console: Console, wid: int) -> bool:
    store = console.runtime.store
    assert store is not None
    page = await store.webhook_page(wid + 1, 1, outcome="pending", after=wid - 1)
    return bool(page)


async def refused(console: Console, request: Request, session: Session) -> Response:
    return console.render(
        request,
        session,
        "refused.html",
        page="Refused",
        refused=console.runtime.refusals.newest(),
        kept=KEPT,
    )
