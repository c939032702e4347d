"""The gateway's HTTP interface: a thin Starlette layer over the pipeline and the forwarder."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relay import status as status_mod
from relay.config import Config
from relay.errors import PayloadTooLarge, StoreError, Unavailable, WebhookError
from relay.forwarder import Forwarder
from relay.ingest import Pipeline
from relay.metrics import Metrics
from relay.providers.base import WebhookRequest
from relay.store import Store

log = logging.getLogger("relay.webhook")
applog = logging.getLogger("relay")


class Runtime:
    """Everything one running gateway holds."""

    def __init__(self, config: Config, housekeeping_interval: float = 30.0):
        self.config = config
        self.metrics = Metrics()
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.client: httpx.AsyncClient | None = None
        self.draining = False
        self.housekeeping_interval = housekeeping_interval

    async def start(self) -> None:
        cfg = self.config
        self.store = Store(cfg.relay.database)
        self.pipeline = Pipeline(cfg, self.store, self.metrics)
        self.client = httpx.AsyncClient(
            timeout=cfg.track.timeout,
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
            headers={"user-agent": "webhook-relay"},
        )
        self.forwarder = Forwarder(
            self.store,
            cfg,
            self.client,
            self.metrics,
            housekeeping_interval=self.housekeeping_interval,
        )
        await self.forwarder.start()
        applog.info(
            "relay ready: %d source(s), %d destination(s), database %s",
            len(cfg.sources),
            len(self.forwarder.workers),
            cfg.relay.database,
        )

    async def stop(self) -> None:
        self.draining = True
        if self.forwarder is not None:
            await self.forwarder.stop(self.config.relay.shutdown_grace)
        if self.client is not None:
            await self.client.aclose()
        if self.store is not None:
            self.store.close()
        applog.info("relay stopped cleanly")

    def reload(self) -> bool:
        return self.pipeline.reload_mappings() if self.pipeline is not None else False


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, code: str, message: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"ok": False, "error": code}
    if message:
        body["message"] = message
    return JSONResponse(body, status_code=status)


async def webhook(request: Request) -> Response:
    rt: Runtime = request.app.state.relay
    started = time.perf_counter()
    name = request.path_params["source"]
    received_at = time.time()
    label = name if name in rt.config.sources else "_unknown"
    size = 0
    try:
        if rt.draining or rt.pipeline is None:
            raise Unavailable("the relay is shutting down; retry later")
        source = rt.pipeline.source(name)
        body = await _read_body(request, rt.config.relay.max_body_bytes)
        size = len(body)
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.scope["headers"]
        }
        wr = WebhookRequest(request.method, str(request.url), headers, body, received_at)
        handled = await rt.pipeline.handle(source, wr)
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
        response = _error(e.status, e.code, e.reason)
        if e.status == 503:
            response.headers["retry-after"] = "5"
        return response
    except Exception:  # a bug must not become a 500 with a traceback; the sender retries
        log.exception("webhook %s: unexpected error; answered 503 so the sender retries", name)
        rt.metrics.webhooks.labels(label, "unavailable").inc()
        return _error(503, "unavailable", "internal error; retry later")
    result = handled.result
    assert rt.forwarder is not None
    for dest in result.queued:
        rt.forwarder.notify(dest)
    outcome = "accepted" if result.accepted or not result.duplicates else "duplicate"
    rt.metrics.webhooks.labels(name, outcome).inc()
    log.info(
        "webhook %s 200 accepted=%d duplicates=%d (%d bytes, %.1f ms)",
        name,
        result.accepted,
        result.duplicates,
        size,
        (time.perf_counter() - started) * 1000,
    )
    return JSONResponse({"ok": True, "accepted": result.accepted, "duplicates": result.duplicates})


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    rt: Runtime = request.app.state.relay
    problems: list[str] = []
    if rt.draining:
        problems.append("shutting down")
    if rt.store is None or rt.forwarder is None:
        problems.append("starting")
    else:
        try:
            await rt.store.writer.run(status_mod.touch)
        except StoreError as e:
            problems.append(f"store not writable: {e}")
        if not rt.forwarder.running and not rt.draining:
            problems.append("forwarder not running")
    paused = rt.forwarder.paused() if rt.forwarder is not None else {}
    body = {"ok": not problems, "problems": problems, "paused": paused}
    return JSONResponse(body, status_code=503 if problems else 200)


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.relay
    if rt.store is not None:
        with contextlib.suppress(Exception):
            await status_mod.refresh_gauges(rt.store, rt.metrics, list(rt.config.sources.values()))
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, exc.detail)


def create_app(
    config: Config, housekeeping_interval: float = 30.0, mounts: list[BaseRoute] | None = None
) -> Starlette:
    runtime = Runtime(config, housekeeping_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        _install_sighup(runtime)
        try:
            yield
        finally:
            await runtime.stop()

    app = Starlette(
        routes=[
            Route("/webhooks/{source}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
            *(mounts or []),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.relay = runtime
    return app


def _install_sighup(runtime: Runtime) -> None:
    import asyncio

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, runtime.reload)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        pass  # not the main thread (tests) or no SIGHUP on this platform
