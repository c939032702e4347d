"""The floor for a durable acknowledgement: the least an endpoint can do and keep the promise.

Each webhook is verified with the stripe library as the relay verifies it, parsed, and its
body and event key are stored in SQLite (WAL, `synchronous = FULL`, dedupe by a unique key in
the same statement) before the 200; the statements and the commit run on one writer thread
that takes every webhook waiting since its last commit (group commit), so the event loop only
does HTTP, verification and parsing. Like the relay, webhooks bypass Starlette's routing.

What it leaves out is what the relay does besides: mapping, metrics, the log line, the bounds
on hostile input, the forwarder. So relay / floor says how much of the gap to the bare
endpoint is the relay's own work, and floor / bare how much any durable ack costs here.

    python -m bench.floor --port 9000 --database /tmp/floor.db   (BENCH_STRIPE_SECRET set)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import threading
import time
from typing import Any

import stripe
import uvicorn

from bench.bare import HOST

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (id INTEGER PRIMARY KEY, body BLOB, received_at REAL);
CREATE TABLE IF NOT EXISTS dedupe (key TEXT PRIMARY KEY, webhook_id INTEGER);
"""

Waiting = tuple[bytes, str, "asyncio.Future[bool]"]


class Floor:
    def __init__(self, database: str, secret: str):
        self.secret = secret
        self.conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.executescript(SCHEMA)
        self.waiting: list[Waiting] = []
        self.ready = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._write, daemon=True, name="floor-writer").start()

    def _write(self) -> None:
        assert self.loop is not None
        while True:
            with self.ready:
                while not self.waiting:
                    self.ready.wait()
                group, self.waiting = self.waiting, []
            self.conn.execute("BEGIN IMMEDIATE")
            results = []
            for body, key, future in group:
                cur = self.conn.execute(
                    "INSERT INTO webhooks (body, received_at) VALUES (?, ?)", (body, time.time())
                )
                new = self.conn.execute(
                    "INSERT INTO dedupe (key, webhook_id) VALUES (?, ?) "
                    "ON CONFLICT (key) DO NOTHING RETURNING webhook_id",
                    (key, cur.lastrowid),
                ).fetchone()
                results.append((future, new is not None))
            self.conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(_settle, results)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        status, answer = 200, {"ok": True, "pid": os.getpid()}
        if scope["path"] != "/healthz":
            status, answer = await self.webhook(dict(scope["headers"]), body)
        out = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    async def webhook(self, headers: dict[bytes, bytes], body: bytes) -> tuple[int, Any]:
        signature = headers.get(b"stripe-signature", b"").decode("latin-1")
        try:
            stripe.WebhookSignature.verify_header(body.decode(), signature, self.secret, 300)
            event = json.loads(body)
        except (stripe.SignatureVerificationError, ValueError):
            return 401, {"ok": False, "error": "invalid_signature"}
        assert self.loop is not None
        future: asyncio.Future[bool] = self.loop.create_future()
        with self.ready:
            self.waiting.append((body, f"stripe:{event['id']}", future))
            self.ready.notify()
        new = await future
        return 200, {"ok": True, "accepted": int(new), "duplicates": int(not new)}


def _settle(results: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for future, new in results:
        if not future.done():
            future.set_result(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", required=True)
    args = parser.parse_args()
    app = Floor(args.database, os.environ["BENCH_STRIPE_SECRET"])
    uvicorn.run(
        app,
        host=HOST,
        port=args.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )


if __name__ == "__main__":
    main()
