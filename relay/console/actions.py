"""The pages that act: Dead letters (list, detail, replay) and Mappings (rules, playground)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay import deadletters
from relay.errors import ConfigError, WebhookError
from relay.mapping import Mapping, load_mappings, try_body
from relay.storage import DEAD, Queued

if TYPE_CHECKING:
    from relay.console.app import Console
    from relay.console.auth import Session

log = logging.getLogger("relay.console")

PAGE = 50
MAX_PASTED = 1 << 20


def _source(console: Console, value: object) -> str | None:
    return value if isinstance(value, str) and value in console.runtime.config.sources else None


async def dead_letters(console: Console, request: Request, session: Session) -> Response:
    store = console.runtime.store
    assert store is not None
    source = _source(console, request.query_params.get("source"))
    raw = request.query_params.get("before", "")
    before = int(raw) if raw.isdigit() and len(raw) < 19 else None
    rows = await store.dead_letter_page(before, PAGE, source)
    count = len(await store.dead_letter_ids(source))
    notes = [n for n in request.query_params.getlist("done")][:1]
    more = None
    if len(rows) == PAGE:
        more = urlencode({k: v for k, v in {"source": source, "before": rows[-1].id}.items() if v})
    return console.render(
        request,
        session,
        "dead.html",
        page="Dead letters",
        dead=rows,
        count=count,
        source=source,
        sources=list(console.runtime.config.sources),
        more=more,
        notes=[_done_note(n) for n in notes],
    )


def _done_note(value: str) -> str:
    replayed, _, problems = value.partition(",")
    note = f"{replayed} dead letter(s) queued again."
    if problems and problems != "0":
        note += f" {problems} could not be replayed (see the log)."
    return note


async def dead_letter(console: Console, request: Request, session: Session) -> Response:
    store = console.runtime.store
    assert store is not None
    row_id = request.path_params["id"]
    e = await store.outbox_entry(row_id)
    if e is None:
        return console.render(
            request,
            session,
            "missing.html",
            status=404,
            page="Dead letters",
            what=f"No dead letter with id {row_id}.",
        )
    body = None
    if e.body:
        try:
            body = json.dumps(json.loads(e.body), indent=2, ensure_ascii=False)
        except ValueError:
            body = e.body
    from relay.console.pages import STATE_WORDS

    word = STATE_WORDS.get(e.state, str(e.state))
    mapping = _mappings(console).get(e.source or "")
    rule = f"events[{e.rule}]" if e.rule is not None else "—"
    if mapping is not None and e.rule is not None and e.rule < len(mapping.rules):
        rule = mapping.rule_label(e.rule)
    return console.render(
        request,
        session,
        "dead_detail.html",
        page="Dead letters",
        d=e,
        body=body,
        dead=e.state == DEAD,
        state=word,
        state_class=word.replace(" ", "-"),
        rule=rule,
    )


async def replay(console: Console, request: Request, session: Session) -> Response:
    rt = console.runtime
    store = rt.store
    assert store is not None
    form = await request.form()
    do_remap = form.get("remap") == "1"
    source = _source(console, form.get("source"))
    one = form.get("one")
    if isinstance(one, str) and one.isdigit():
        ids = [int(one)]
    elif form.get("all") == "1":
        ids = await store.dead_letter_ids(source)
        expected = form.get("expected")
        if not isinstance(expected, str) or expected != str(len(ids)):
            # What matches changed since the page showed the count: say so, act on a new click.
            return console.render(
                request,
                session,
                "confirm.html",
                page="Dead letters",
                count=len(ids),
                expected=expected,
                source=source,
                remap=do_remap,
            )
    else:
        ids = [int(v) for v in form.getlist("ids") if isinstance(v, str) and v.isdigit()]
    if not ids:
        return RedirectResponse("/console/dead?done=0,0", status_code=303)
    entries = {i: await store.outbox_entry(i) for i in ids[:10_000]}
    done, problems = await deadletters.replay(store, rt.config, ids, do_remap)
    client = request.client.host if request.client else ""
    log.info(
        "console: replay of %d dead letter(s)%s from %s: %d queued again, %d problem(s)",
        len(ids),
        " with remap" if do_remap else "",
        client,
        len(done),
        len(problems),
    )
    for p in problems:
        log.warning("console: replay: %s", p)
    if rt.forwarder is not None and done:
        per: dict[str, int] = {}
        for i in done:
            e = entries.get(i)
            if e is not None:
                per[e.destination] = per.get(e.destination, 0) + 1
        now = time.time()
        rt.forwarder.queued({d: Queued(n, now) for d, n in per.items()})
    if len(ids) == 1 and problems:
        return console.render(
            request,
            session,
            "missing.html",
            status=409,
            page="Dead letters",
            what="Not replayed.",
            problems=problems,
        )
    return RedirectResponse(f"/console/dead?done={len(done)},{len(problems)}", status_code=303)


def _mappings(console: Console) -> dict[str, Mapping]:
    mapper = console.runtime.mapper
    if mapper is not None:
        return mapper.mappings
    try:
        return load_mappings(console.runtime.config)
    except ConfigError:
        return {}


async def _rules(console: Console, counted: bool = False) -> list[dict[str, Any]]:
    """Per mapping file its rules; with `counted`, how often each matched in the last 24 h
    (a scan of a day of outbox rows: the page loads it afterwards, see mapping_rules)."""
    store = console.runtime.store
    assert store is not None
    counts = await store.rule_counts(time.time() - 86400) if counted else None
    by_path: dict[Any, dict[str, Any]] = {}
    for name, mapping in _mappings(console).items():
        entry = by_path.setdefault(
            mapping.path, {"path": str(mapping.path), "sources": [], "mapping": mapping}
        )
        entry["sources"].append(name)
    out = []
    for entry in by_path.values():
        mapping = entry.pop("mapping")
        entry["rules"] = [
            {
                "label": r.label,
                "line": r.line,
                "count": None
                if counts is None
                else sum(counts.get((s, r.index), 0) for s in entry["sources"]),
            }
            for r in mapping.rules
        ]
        out.append(entry)
    return out


async def mapping_rules(console: Console, request: Request, session: Session) -> Response:
    """The rules with their 24 h counts, for htmx to put into the Mappings page."""
    html = console.templates.get_template("_rules.html").render(
        mappings=await _rules(console, counted=True)
    )
    return Response(html, media_type="text/html", headers={"cache-control": "no-store"})


async def mappings(console: Console, request: Request, session: Session) -> Response:
    sources = list(console.runtime.config.sources)
    form = {
        "source": _source(console, request.query_params.get("source"))
        or (sources[0] if sources else None),
        "webhook": request.query_params.get("webhook", "")[:20],
    }
    return console.render(
        request,
        session,
        "mappings.html",
        page="Mappings",
        sources=sources,
        form=form,
        result=None,
        mappings=await _rules(console),
    )


async def playground(console: Console, request: Request, session: Session) -> Response:
    """As `relay map`: the events the current mapping makes from a stored or pasted body."""
    form = await request.form()
    sources = list(console.runtime.config.sources)
    name = _source(console, form.get("source"))
    webhook = str(form.get("webhook") or "").strip()
    pasted = str(form.get("body") or "")
    content_type = str(form.get("content_type") or "application/json").strip()[:200]
    shown = {
        "source": name,
        "webhook": webhook,
        "body": pasted[:MAX_PASTED],
        "content_type": content_type,
    }
    result = await _try(console, name, webhook, pasted, content_type)
    return console.render(
        request,
        session,
        "mappings.html",
        page="Mappings",
        sources=sources,
        form=shown,
        result=result,
        mappings=await _rules(console),
    )


async def _try(
    console: Console, name: str | None, webhook: str, pasted: str, content_type: str
) -> dict[str, Any]:
    config = console.runtime.config
    if name is None:
        return {"error": "choose a configured source", "events": []}
    source = config.sources[name]
    headers: dict[str, str] = {}
    if webhook:
        store = console.runtime.store
        assert store is not None
        hook = (
            await store.webhook(int(webhook)) if webhook.isdigit() and len(webhook) < 19 else None
        )
        if hook is None:
            return {"error": f"no stored webhook with id {webhook}", "events": []}
        if hook.source != name:
            return {
                "error": f"webhook {webhook} came to source {hook.source!r}, not {name!r}",
                "events": [],
            }
        body = hook.body
        headers = dict(hook.headers)
        headers.setdefault("content-type", hook.content_type)
    else:
        if not pasted.strip():
            return {"error": "paste a body, or give a stored webhook id", "events": []}
        if len(pasted) > MAX_PASTED:
            return {"error": f"the body is over {MAX_PASTED} bytes", "events": []}
        body = pasted.replace("\r\n", "\n").encode()
        headers["content-type"] = content_type
    mapping = _mappings(console).get(name)
    if mapping is None:
        return {"error": f"the mapping of {name} cannot be loaded", "events": []}
    try:
        mapped = try_body(mapping, source.provider, name, headers, body)
    except WebhookError as e:
        return {
            "error": f"the {source.provider.kind} provider cannot read this body: {e.reason}",
            "events": [],
        }
    out = []
    for ev, result in mapped:
        out.append(
            {
                "event": ev.key,
                "type": ev.type,
                "ignored": result.ignored,
                "events": [
                    {
                        "rule": mapping.rule_label(m.rule),
                        "name": m.event.to_json().get("name"),
                        "track": json.dumps(m.event.to_json(), indent=2, ensure_ascii=False),
                        "notes": list(m.notes),
                    }
                    for m in result.outputs
                ],
                "failures": [
                    {"rule": mapping.rule_label(f.rule), "reason": f.reason}
                    for f in result.failures
                ],
            }
        )
    return {"error": None, "events": out}
