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
import re
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
    Event,
    EventStore,
    FaultRule,
    Faults,
    InvalidFault,
    QuotaExceeded,
    RateWindow,
    RequestLog,
    fingerprint,
)

logger = logging.getLogger("relay.sandbox")

MAX_BATCH = 25
MAX_NAME = 128
MAX_PAYLOAD_KEYS = 10
MAX_VALUE = 255
MAX_URL = 2048
MAX_LIST = 10_000
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
DROPPED = 0  # the status recorded for a request whose connection was dropped

ERRORS: dict[int, tuple[str, str]] = {
    400: ("validation_error", "The given data was invalid."),
    401: ("unauthorized", "Missing or invalid API key."),
    402: ("monthly_limit_reached", "Monthly event quota exceeded."),
    403: ("plan_required", "Pro plan required for server-side tracking."),
    404: ("website_not_found", "Website ID does not exist or does not belong to your account."),
    429: ("rate_limit_exceeded", "Too many requests. Wait and retry (see Retry-After)."),
    500: ("server_error", "Internal server error."),
}


def error(
    status: int, message: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The track API's error body: {"ok": false, "error": code, "message": ...}."""
    if status in ERRORS:
        code, default = ERRORS[status]
    elif status >= 500:
        code, default = "server_error", f"Server error ({status})."
    else:
        code, default = "client_error", f"Request refused ({status})."
    message = message or extra.pop("message", None) or default
    body = {"ok": False, "error": code, **extra, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _echo(rule: FaultRule, request: Request) -> dict[str, Any]:
    """With `echo_key`, the error code and message repeat the request's Authorization."""
    if not rule.echo_key:
        return {}
    token = request.headers.get("authorization", "")
    code = ERRORS.get(rule.status or 500, ("server_error", ""))[0]
    return {"error": f"{code} ({token})", "message": f"Refused for {token}."}


class Invalid(Exception):
    """Validation failed; ``errors`` maps field path -> messages, Laravel style."""

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__("invalid")

    def response(self) -> JSONResponse:
        path, messages = next(iter(self.errors.items()))
        more = sum(len(m) for m in self.errors.values()) - 1
        message = f"{path} {messages[0]}" if path != "body" else f"The body {messages[0]}"
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        return error(400, message, errors=self.errors)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON (no NaN/Infinity); raises Invalid."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise Invalid({"body": ["must be valid JSON"]}) from None


def cast(value: str | int | float | bool) -> str:
    """Payload values are stored as strings: true -> "true", 3 -> "3", 49.99 -> "49.99"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def validate_event(obj: Any, prefix: str, errors: dict[str, list[str]]) -> Event | None:
    """Check one event, adding errors under ``prefix``; the Event if it is valid."""
    if not isinstance(obj, dict):
        errors[prefix.rstrip(".") or "body"] = ["must be an object"]
        return None
    before = len(errors)

    name = obj.get("name")
    if name is None or name == "":
        errors[prefix + "name"] = ["is required"]
    elif not isinstance(name, str):
        errors[prefix + "name"] = ["must be a string"]
    elif len(name) > MAX_NAME:
        errors[prefix + "name"] = [f"must be at most {MAX_NAME} characters"]

    payload: dict[str, str] = {}
    raw = obj.get("payload")
    if raw is not None and not isinstance(raw, dict):
        errors[prefix + "payload"] = ["must be an object"]
    elif raw is not None:
        if len(raw) > MAX_PAYLOAD_KEYS:
            errors[prefix + "payload"] = [f"must have at most {MAX_PAYLOAD_KEYS} keys"]
        for k, v in raw.items():
            if not isinstance(v, str | int | float):  # bool is an int
                errors[f"{prefix}payload.{k}"] = ["must be a string, number or boolean"]
                continue
            payload[k] = cast(v)
            if len(payload[k]) > MAX_VALUE:
                errors[f"{prefix}payload.{k}"] = [f"must be at most {MAX_VALUE} characters"]

    visitor_id = obj.get("visitor_id")
    if visitor_id is not None and not (
        isinstance(visitor_id, str) and UUID_RE.fullmatch(visitor_id)
    ):
        errors[prefix + "visitor_id"] = ["must be a valid UUID"]

    for field in ("url", "referrer"):
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            errors[prefix + field] = ["must be a string"]
        elif value is not None and len(value) > MAX_URL:
            errors[prefix + field] = [f"must be at most {MAX_URL} characters"]

    if len(errors) > before:
        return None
    return Event(
        name=str(name),
        payload=payload,
        visitor_id=visitor_id,
        url=obj.get("url"),
        referrer=obj.get("referrer"),
    )


def parse_single(body: bytes) -> Event:
    errors: dict[str, list[str]] = {}
    data = parse_json(body)
    if not isinstance(data, dict):
        raise Invalid({"body": ["must be a JSON object"]})
    event = validate_event(data, "", errors)
    if event is None:
        raise Invalid(errors)
    return event


def parse_batch(body: bytes) -> list[Event]:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise Invalid({"body": ["must be a JSON object"]})
    items = data.get("events")
    if items is None:
        raise Invalid({"events": ["is required"]})
    if not isinstance(items, list):
        raise Invalid({"events": ["must be an array"]})
    errors: dict[str, list[str]] = {}
    if not items:
        errors["events"] = ["must contain at least 1 event"]
    elif len(items) > MAX_BATCH:
        errors["events"] = [f"must contain at most {MAX_BATCH} events"]
    events = [validate_event(item, f"events.{i}.", errors) for i, item in enumerate(items)]
    if errors:
        raise Invalid(errors)
    return [e for e in events if e is not None]


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
