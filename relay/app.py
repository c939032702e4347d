"""The gateway's HTTP interface: a thin Starlette layer over the pipeline and the forwarder."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from relay import receive as receive_mod
from relay import status as status_mod
from relay.config import Config
from relay.errors import StoreError
from relay.forwarder import Forwarder
from relay.ingest import Pipeline
from relay.metrics import Metrics
from relay.store import Store

log = logging.getLogger("relay.webhook")
applog = logging.getLogger("relay")

READY_WAIT = 0.5  # /readyz: how long its write may wait for the lock before it says 503


class Runtime:
    """Everything one running gateway holds."""

    def __init__(
        self,
        config: Config,
        housekeeping_interval: float = 30.0,
        worker: int = 0,
        workers: int = 1,
    ):
        self.config = config
        # With workers > 1, each worker process receives webhooks; worker 0 alone forwards.
        self.worker = worker
        self.workers = workers
        self.metrics = Metrics()
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.client: httpx.AsyncClient | None = None
        self.draining = False
        self.housekeeping_interval = housekeeping_interval

    async def start(self) -> None:
        cfg = self.config
        self.store = Store(cfg.relay.database, shared=self.workers > 1)
        self.store.writer.on_commit = self.metrics.commit_seconds.observe
        self.pipeline = Pipeline(cfg, self.store, self.metrics)
        if self.worker > 0:  # receives webhooks only
            applog.info("worker %d of %d ready", self.worker, self.workers)
            return
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
        for name, source in cfg.sources.items():
            if source.verifier is None:
                applog.warning(
                    "source %s accepts webhooks WITHOUT verification (verify = false): anyone "
                    "who can reach /webhooks/%s can send events",
                    name,
                    name,
                )
        applog.info(
            "relay ready: %d source(s), %d destination(s), database %s%s",
            len(cfg.sources),
            len(cfg.destinations),
            cfg.relay.database,
            f", {self.workers} workers" if self.workers > 1 else "",
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


def _error(status: int, code: str, message: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"ok": False, "error": code}
    if message:
        body["message"] = message
    return JSONResponse(body, status_code=status)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    rt: Runtime = request.app.state.relay
    problems: list[str] = []
    if rt.draining:
        problems.append("shutting down")
    forwards = rt.worker == 0  # the other workers leave forwarding to worker 0
    paused: dict[str, str] = {}
    if rt.store is None or (forwards and rt.forwarder is None):
        problems.append("starting")
    else:
        # Could a webhook be stored now? Enough disk for one, then a real write that waits
        # for the lock as a webhook would, but only briefly (another process holding the
        # write lock makes webhooks wait, then fail).
        problem = status_mod.disk_problem(rt.config.relay.database, rt.config.relay.max_body_bytes)
        if problem is None:
            try:
                await rt.store.writer.run_batched(status_mod.touch_all, None, READY_WAIT)
            except StoreError as e:
                problem = str(e)
        if problem is not None:
            problems.append(f"store not writable: {problem}")
        if rt.forwarder is not None:
            if not rt.forwarder.running and not rt.draining:
                problems.append("forwarder not running")
            paused = rt.forwarder.paused()
        else:  # as worker 0 recorded them
            with contextlib.suppress(Exception):
                paused = await status_mod.paused_destinations(rt.store)
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


class Gateway:
    """The ASGI app: webhooks go straight to their handler (relay/receive.py), everything else
    (health, readiness, metrics, lifespan, mounts) through Starlette."""

    def __init__(self, app: Starlette, runtime: Runtime):
        self.app = app
        self.runtime = runtime
        self.state = app.state
        self.router = app.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if receive_mod.is_webhook_post(scope):
            await receive_mod.handle(self.runtime, scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _method_not_allowed(request: Request) -> Response:
    return _error(405, "method_not_allowed", "webhooks are POSTed")


def create_app(
    config: Config,
    housekeeping_interval: float = 30.0,
    mounts: list[BaseRoute] | None = None,
    worker: int = 0,
    workers: int = 1,
) -> Gateway:
    runtime = Runtime(config, housekeeping_interval, worker, workers)

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
            Route(
                "/webhooks/{source}", _method_not_allowed, methods=["GET", "PUT", "DELETE", "PATCH"]
            ),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
            *(mounts or []),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.relay = runtime
    return Gateway(app, runtime)


def _install_sighup(runtime: Runtime) -> None:
    import asyncio

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, runtime.reload)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        pass  # not the main thread (tests) or no SIGHUP on this platform
