"""Console: page timings with a big store (1,000,000 webhooks by default).

Fills a SQLite store through the storage layer (the SQLite backend's bulk load, then the
store's own save_mapped / claim / delivered / dead_letter, in big transactions): webhooks
spread over the last 48 hours, each mapped to one track event, most delivered, one in 200
dead. Then starts `relay serve` on it with the console on and times the pages over HTTP,
each the median of a few requests: overview, the webhook list (first page, a page deep in
the past, filtered), search (by event id, and by body text), a webhook's detail, the dead
letters.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from pathlib import Path

from bench import stack
from bench.procs import REPO, Procs, free_port, progress, relay_command
from bench.report import Row
from relay.config import load_config
from relay.storage import Incoming, Mapped, Output
from relay.storage.sqlite import SQLiteStore

TARGET = 0.5  # seconds a page may take with a million webhooks
CHUNK = 20_000
SPAN = 48 * 3600.0
DEAD_EVERY = 200
TRIES = 5


def body(n: int, at: float) -> bytes:
    event = {
        "id": f"evt_bench_{n:08d}",
        "object": "event",
        "type": "checkout.session.completed",
        "created": int(at),
        "data": {
            "object": {
                "id": f"cs_bench_{n:08d}",
                "object": "checkout.session",
                "amount_total": 4999,
                "currency": "usd",
                "customer_email": f"buyer{n}@example.com",
                "metadata": {"visitor_id": f"v{n}", "plan": "pro"},
            }
        },
    }
    return json.dumps(event).encode()


def track_body(n: int) -> str:
    return json.dumps(
        {"name": "purchase", "payload": {"order_id": f"cs_bench_{n:08d}", "amount": "49.99"}}
    )


async def fill(database: Path, destination: str, webhooks: int) -> float:
    started = time.monotonic()
    store = SQLiteStore(database)
    await store.open()
    now = time.time()
    first = now - SPAN
    try:
        for start in range(0, webhooks, CHUNK):
            count = min(CHUNK, webhooks - start)
            items = []
            for n in range(start, start + count):
                at = first + SPAN * n / webhooks
                items.append(
                    Incoming(
                        "stripe",
                        at,
                        "application/json",
                        '{"content-type": "application/json", "user-agent": "Stripe/1.0"}',
                        body(n, at),
                        (f"evt_bench_{n:08d}",),
                        SPAN * 2,
                    )
                )
            got = await store.load(items)
            mapped = [
                Mapped(
                    g.webhook_id,
                    item.received_at,
                    [
                        Output(
                            destination,
                            g.accepted[0],
                            0,
                            track_body(start + i),
                            None,
                            "checkout.session.completed",
                        )
                    ],
                )
                for i, (g, item) in enumerate(zip(got, items, strict=True))
                if g.webhook_id is not None
            ]
            await store.save_mapped(mapped)
            rows = await store.claim(destination, count, now)
            # each delivered (or dead) a few seconds after it came, in groups of 500
            for at in range(0, len(rows), 500):
                group = rows[at : at + 500]
                when = items[min(at + 499, len(items) - 1)].received_at + 5.0
                ok = [r.id for r in group if r.id % DEAD_EVERY != 0]
                await store.delivered(ok, ok, destination, when)
                failed = [r.id for r in group if r.id % DEAD_EVERY == 0]
                if failed:
                    await store.dead_letter(failed, "HTTP 400 validation_error: amount", when)
            if (start // CHUNK) % 10 == 0:
                progress(
                    f"  {start + count:,} webhooks stored ({time.monotonic() - started:.0f} s)"
                )
    finally:
        await store.close()
    return time.monotonic() - started


def timed(port: int, path: str) -> tuple[float, int]:
    times = []
    size = 0
    for _ in range(TRIES):
        t = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
            size = len(r.read())
            assert r.status == 200, (path, r.status)
        times.append(time.perf_counter() - t)
    return statistics.median(times), size


def run(workdir: Path, webhooks: int) -> list[Row]:
    keys = stack.Secrets.fresh()
    rows: list[Row] = []
    with Procs(workdir) as procs:
        sandbox = stack.start_sandbox(procs, workdir, "console-sandbox", keys, 60)
        name = "console-relay"
        database = workdir / f"{name}.db"
        config = workdir / f"{name}.toml"
        port = free_port()
        config.write_text(
            stack.relay_toml(database, port, sandbox.port, 60) + "\n[console]\nenabled = true\n"
        )
        parsed = load_config(config, env=keys.env())
        destination = parsed.destinations[0].name
        progress(f"console: filling a store with {webhooks:,} webhooks")
        seconds = asyncio.run(fill(database, destination, webhooks))
        size = database.stat().st_size
        rows.append(Row("console", f"fill {webhooks:,} webhooks", f"{seconds:.0f} s"))
        rows.append(Row("console", "database size", f"{size / 1e6:,.0f} MB"))
        child = procs.start(
            name,
            [*relay_command(), "serve", "--config", str(config)],
            cwd=REPO,
            env=keys.env(),
        )
        child.wait_http(port, "/healthz")
        middle = webhooks // 2
        pages = [
            ("overview", "/console/"),
            ("webhooks: first page", "/console/webhooks"),
            (f"webhooks: a page {webhooks - middle:,} back", f"/console/webhooks?before={middle}"),
            ("webhooks: outcome dead", "/console/webhooks?outcome=dead"),
            (
                "webhooks: source + event type",
                "/console/webhooks?source=stripe&type=checkout.session.completed",
            ),
            ("search: event id", f"/console/webhooks?q=evt_bench_{middle:08d}"),
            ("search: body text (newest match)", "/console/webhooks?q=buyer"),
            ("search: body text (oldest only)", "/console/webhooks?q=buyer0%40example.com"),
            ("webhook detail", f"/console/webhooks/{middle}"),
            ("dead letters", "/console/dead"),
            ("mappings", "/console/mappings"),
            ("mappings: 24 h rule counts (loaded after)", "/console/mappings/rules"),
        ]
        for label, path in pages:
            progress(f"  GET {path}")
            seconds, _ = timed(port, path)
            rows.append(
                Row(
                    "console",
                    label,
                    f"{seconds * 1000:,.0f} ms",
                    f"< {TARGET * 1000:.0f} ms",
                    seconds < TARGET,
                )
            )
    return rows
