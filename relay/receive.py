"""`POST /webhooks/{source}`: the hot path, as a plain ASGI handler.

Every webhook passes here, so it skips the framework's request and response objects, routing
and middleware: it reads the scope and the body itself and sends pre-encoded JSON. What it
does is the contract of DESIGN.md: verify, dedupe, store, then answer; a refused request
stores nothing and never gets a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from relay.config import format_duration
from relay.errors import (
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    UnknownSource,
    WebhookError,
)
from relay.providers.base import Headers, WebhookRequest

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from relay.app import Runtime

log = logging.getLogger("relay.webhook")

PREFIX = "/webhooks/"


class ClientGone(Exception):
    """The sender hung up before its body arrived."""


async def read_body(receive: Receive, declared: int | None, limit: int, timeout: float) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all, and a body
    that takes more than `timeout` seconds in all to arrive (however steadily it trickles)."""
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"body over {limit} bytes")
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(
            f"body not received within {format_duration(timeout)} ({size} bytes arrived)"
        ) from None


def request_url(scope: Scope, headers: dict[str, str]) -> str:
    """The URL as the sender called it (scheme, Host header, path, query)."""
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("localhost", 80)
        host = f"{server[0]}:{server[1]}"
    url = f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{scope['path']}"
    query = scope.get("query_string", b"")
    return f"{url}?{query.decode('latin-1')}" if query else url


MAX_SHOWN_NAME = 100  # characters of an unknown source's name that logs and answers repeat


async def _answer(
    send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def handle(rt: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
    started = time.perf_counter()
    received_at = time.time()
    name = scope["path"][len(PREFIX) :]
    label = name if name in rt.config.sources else "_unknown"
    if label == "_unknown" and len(name) > MAX_SHOWN_NAME:  # shown in logs and the answer
        name = name[:MAX_SHOWN_NAME] + "…"
    size = 0
    try:
        if rt.draining or rt.pipeline is None:
            raise Unavailable("the relay is shutting down; retry later")
        source = rt.pipeline.source(name) if "/" not in name else None
        if source is None:
            raise UnknownSource(f"no source named {name!r}")
        headers = Headers(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
        )
        length = headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        size = declared or 0  # as declared, until the body is read
        relay = rt.config.relay
        body = await read_body(receive, declared, relay.max_body_bytes, relay.body_timeout)
        size = len(body)
        request = WebhookRequest(
            scope["method"], request_url(scope, headers), headers, body, received_at
        )
        result = await rt.pipeline.handle(source, request)
    except ClientGone:
        rt.metrics.webhooks.labels(label, "client_gone").inc()
        log.info("webhook %s: the sender hung up before its body arrived", name)
        return
    except WebhookError as e:
        rt.metrics.webhooks.labels(label, e.code).inc()
        log.info(
            "webhook %s %d %s: %s (%d bytes, %.1f ms)",
            name,
            e.status,
            e.code,
            e.reason,
            size,
            (time.perf_counter() - started) * 1000,
        )
        if e.status != 503:  # a refusal, not the relay's own trouble
            client = scope.get("client")
            rt.refusals.add(
                received_at, name, e.status, e.code, e.detail, size, client[0] if client else ""
            )
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if e.status == 503:
            extra = ((b"retry-after", b"5"),)
        elif e.status == 408:  # the rest of the body may still trickle in: not on this connection
            extra = ((b"connection", b"close"),)
        body = json.dumps({"ok": False, "error": e.code, "message": e.reason}).encode()
        await _answer(send, e.status, body, extra)
        return
    except Exception:  # a bug must not become a 500 with a traceback; the sender retries
        log.exception("webhook %s: unexpected error; answered 503 so the sender retries", name)
        rt.metrics.webhooks.labels(label, "unavailable").inc()
        body = b'{"ok": false, "error": "unavailable", "message": "internal error; retry later"}'
        await _answer(send, 503, body, ((b"retry-after", b"5"),))
        return
    accepted = len(result.accepted)
    outcome = "accepted" if accepted or not result.duplicates else "duplicate"
    rt.metrics.webhooks.labels(name, outcome).inc()
    log.info(
        "webhook %s 200 accepted=%d duplicates=%d (%d bytes, %.1f ms)",
        name,
        accepted,
        result.duplicates,
        size,
        (time.perf_counter() - started) * 1000,
    )
    body = b'{"ok":true,"accepted":%d,"duplicates":%d}' % (accepted, result.duplicates)
    await _answer(send, 200, body)


def is_webhook_post(scope: Scope) -> bool:
    """A webhook delivery; other methods on /webhooks/ get Starlette's JSON 405."""
    return bool(
        scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(PREFIX)
    )
