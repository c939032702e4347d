"""The sandbox: a local, faithful implementation of the track API (``track-api.md``).

Developers run it with ``relay sandbox``; ``relay dev`` and the end-to-end tests mount or serve
it. Besides the reference's endpoints it has an events listing and ``/_sandbox/*`` endpoints
(no auth) to inject faults and to see which track requests arrived.

Checks run in the reference's order: auth (401), injected faults, rate limit (429), website
(404), plan (403), validation (400), monthly quota (402); then one commit stores the events.

Closing: served alone, the app's lifespan closes the SQLite connection on shutdown. Mounted
inside another app (whose lifespan does not reach it), call ``app.state.sandbox.close()`` when
done; the store opens lazily on first use, so mounting costs nothing until a request arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from relay.config import Secret
from relay.errors import ConfigError
from relay.sandbox_store import (
    WINDOW_SECONDS,
    EventStore,
    FaultRule,
    Faults,
    InvalidFault,
    QuotaExceeded,
    RateWindow,
    RequestLog,
    fingerprint,
)
from relay.trackapi import (
    ERRORS,
    MAX_BATCH,
    MAX_LIST,
    Invalid,
    error,
    parse_batch,
    parse_json,
    parse_single,
)

logger = logging.getLogger("relay.sandbox")

DROPPED = 0  # the status recorded for a request whose connection was dropped


def _echo(rule: FaultRule, request: Request) -> dict[str, Any]:
    """With `echo_key`, the error code and message repeat the request's Authorization."""
    if not rule.echo_key:
        return {}
    token = request.headers.get("authorization", "")
    code = ERRORS.get(rule.status or 500, ("server_error", ""))[0]
    return {"error": f"{code} ({token})", "message": f"Refused for {token}."}


def count_events(body: bytes, batch: bool) -> int:
    """How many events a body carries, for the request record; 0 if it cannot tell."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 0
    if not batch:
        return 1 if isinstance(data, dict) else 0
    items = data.get("events") if isinstance(data, dict) else None
    return len(items) if isinstance(items, list) else 0


def month_start(now: float) -> float:
    """Start of the calendar month (UTC) that ``now`` falls in."""
    day = datetime.fromtimestamp(now, UTC)
    return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


class DroppedResponse(Response):
    """Promises a body, sends part of it and stops: the client sees a broken connection."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok": tr', "more_body": True})
        # Returning with the body incomplete makes uvicorn close the connection.


class Sandbox:
    """The sandbox's state and handlers; ``app.state.sandbox`` of the app."""

    def __init__(
        self,
        api_keys: Sequence[str],
        website_ids: Sequence[int],
        requests_per_minute: int,
        database: str | Path,
        monthly_quota: int | None,
        plan: str,
        clock: Callable[[], float],
        window: float = WINDOW_SECONDS,
    ):
        self._keys = {hashlib.sha256(k.encode()).hexdigest(): Secret(k) for k in api_keys}
        self.website_ids = frozenset(website_ids)
        self.monthly_quota = monthly_quota
        self.plan = plan
        self.store = EventStore(database)
        self.window = RateWindow(requests_per_minute, clock, window)
        self.requests = RequestLog()
        self.faults = Faults()

    def close(self) -> None:
        self.store.close()

    def _authenticate(self, request: Request) -> str | None:
        """The key's fingerprint, or None when the Bearer token is missing or unknown."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if hashlib.sha256(token.encode()).hexdigest() not in self._keys:
            return None
        return fingerprint(token)

    def _website(self, request: Request) -> int | None:
        raw = str(request.path_params["website_id"])
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None

    async def track(self, request: Request) -> Response:
        return await self._record(request, batch=False)

    async def track_batch(self, request: Request) -> Response:
        return await self._record(request, batch=True)

    async def _record(self, request: Request, batch: bool) -> Response:
        at = time.time()
        body = await request.body()
        key_fp = self._authenticate(request)
        website_id = self._website(request)
        faulted = False
        try:
            if key_fp is None:
                response: Response = error(401)
            else:
                rule = self.faults.pick(key_fp, website_id)
                if rule is not None and rule.latency_ms:
                    await asyncio.sleep(rule.latency_ms / 1000)
                if rule is not None and rule.breaks_response:
                    faulted = True
                    if rule.drop:
                        response = DroppedResponse()
                    elif rule.malformed:
                        response = Response(
                            b'{"ok": true, "event_id": <html>', 200, media_type="application/json"
                        )
                    elif rule.status == 429 and rule.retry_after_header is not None:
                        headers = {"Retry-After": rule.retry_after_header}
                        response = error(429, headers=headers, **_echo(rule, request))
                    elif rule.status == 429:
                        retry = rule.retry_after or 1
                        response = error(
                            429,
                            headers={"Retry-After": str(retry)},
                            retry_after=retry,
                            **_echo(rule, request),
                        )
                    else:
                        response = error(rule.status or 500, **_echo(rule, request))
                else:
                    response = self._accept(key_fp, website_id, body, batch, at)
        except Exception:
            logger.exception("sandbox track request failed")
            response = error(500)
        status = DROPPED if isinstance(response, DroppedResponse) else response.status_code
        self.requests.record(
            at, key_fp, website_id, status, count_events(body, batch), batch, faulted
        )
        return response

    def _accept(
        self, key_fp: str, website_id: int | None, body: bytes, batch: bool, at: float
    ) -> Response:
        retry = self.window.hit(key_fp)
        if retry is not None:
            return error(429, headers={"Retry-After": str(retry)}, retry_after=retry)
        if website_id is None or website_id not in self.website_ids:
            return error(404)
        if self.plan != "pro":
            return error(403)
        try:
            events = parse_batch(body) if batch else [parse_single(body)]
        except Invalid as e:
            return e.response()
        try:
            ids = self.store.insert(
                website_id, key_fp, events, round(at, 3), self.monthly_quota, month_start(at)
            )
        except QuotaExceeded as e:
            return error(
                402,
                f"Monthly event quota exceeded ({e.used} of {e.quota} events "
                f"used; this request has {len(events)}).",
            )
        if batch:
            return JSONResponse({"ok": True, "processed": len(ids), "event_ids": ids})
        return JSONResponse({"ok": True, "event_id": ids[0]})

    async def list_events(self, request: Request) -> Response:
        if self._authenticate(request) is None:
            return error(401)
        website_id = self._website(request)
        if website_id is None or website_id not in self.website_ids:
            return error(404)
        raw = request.query_params.get("limit", "100")
        limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 7 else 0
        if not 1 <= limit <= MAX_LIST:
            return Invalid({"limit": [f"must be an integer 1..{MAX_LIST}"]}).response()
        total, events = self.store.list(website_id, limit, request.query_params.get("name"))
        return JSONResponse({"ok": True, "total": total, "events": events})

    async def faults_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.faults.add(parse_json(await request.body()))
            except Invalid as e:
                return e.response()
            except InvalidFault as e:
                return Invalid(e.errors).response()
        elif request.method == "DELETE":
            self.faults.clear()
        return JSONResponse({"ok": True, "faults": self.faults.list()})

    async def requests_endpoint(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.requests.clear()
        return JSONResponse({"ok": True, **self.requests.snapshot()})


def guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Internal errors answer a JSON 500 and keep the connection (an escaping exception would
    make uvicorn close it under a client that already got its answer)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            logger.exception("sandbox request failed")
            return error(500)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code != 500:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "client_error")
        return JSONResponse(
            {"ok": False, "error": code, "message": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )
    return error(500)


def create_app(
    api_keys: Sequence[str],
    website_ids: Sequence[int] = (1,),
    requests_per_minute: int = 60,
    database: str | Path = "sandbox.db",
    monthly_quota: int | None = None,
    plan: str = "pro",
    clock: Callable[[], float] = time.monotonic,
    window: float = WINDOW_SECONDS,
) -> Starlette:
    """The sandbox track API as a Starlette app; every key owns every website listed.
    `window` (seconds the rate limit counts over) is for tests only: the API's is 60 s."""
    if not api_keys:
        raise ConfigError(None, "api_keys", "at least one API key is needed")
    if not website_ids:
        raise ConfigError(None, "website_ids", "at least one website is needed")
    if requests_per_minute < 1:
        raise ConfigError(None, "requests_per_minute", "must be at least 1")
    if monthly_quota is not None and monthly_quota < 0:
        raise ConfigError(None, "monthly_quota", "must be 0 or more")
    if plan not in ("pro", "free"):
        raise ConfigError(None, "plan", f"must be 'pro' or 'free', not {plan!r}")
    sandbox = Sandbox(
        api_keys, website_ids, requests_per_minute, database, monthly_quota, plan, clock, window
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            sandbox.close()

    routes = [
        Route("/api/v1/websites/{website_id}/track", sandbox.track, methods=["POST"]),
        Route("/api/v1/websites/{website_id}/track/batch", sandbox.track_batch, methods=["POST"]),
        Route(
            "/api/v1/websites/{website_id}/events", guarded(sandbox.list_events), methods=["GET"]
        ),
        Route(
            "/_sandbox/faults", guarded(sandbox.faults_endpoint), methods=["GET", "POST", "DELETE"]
        ),
        Route("/_sandbox/requests", guarded(sandbox.requests_endpoint), methods=["GET", "DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    app.state.sandbox = sandbox
    return app


def run(
    host: str,
    port: int,
    api_keys: list[str],
    website_ids: list[int],
    requests_per_minute: int,
    database: str,
    monthly_quota: int | None = None,
    plan: str = "pro",
) -> None:
    """Serve the sandbox until interrupted, after printing how to use it."""
    keys = list(api_keys) or ["sk_sandbox_" + secrets.token_hex(16)]
    app = create_app(keys, website_ids, requests_per_minute, database, monthly_quota, plan)
    if not api_keys:
        print(f"API key:   {keys[0]}  (generated; pass --api-key to choose your own)")
    else:
        print(f"API keys:  {len(keys)} from --api-key")
    print(f"Base URL:  http://{host}:{port}/api/v1")
    print(f"Websites:  {', '.join(str(w) for w in website_ids)}")
    quota = "unlimited" if monthly_quota is None else f"{monthly_quota} events/month per key"
    print(
        f"Limit:     {requests_per_minute} requests/minute per key; {MAX_BATCH} events/batch; "
        f"quota {quota}; plan {plan}"
    )
    print(f"Events:    GET http://{host}:{port}/api/v1/websites/{website_ids[0]}/events")
    uvicorn.run(app, host=host, port=port, log_level="info")
