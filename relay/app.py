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

from relay import proxy
from relay import receive as receive_mod
from relay import status as status_mod
from relay.config import Config
from relay.forwarder import Forwarder
from relay.housekeeping import Housekeeper
from relay.ingest import Pipeline
from relay.mapper import Mapper
from relay.mapproc import MapperProcess
from relay.metrics import Metrics
from relay.refusals import Refusals
from relay.storage import Store, open_store

log = logging.getLogger("relay.webhook")
applog = logging.getLogger("relay")


class Runtime:
    """Everything one running gateway holds."""

    def __init__(
        self,
        config: Config,
        housekeeping_interval: float = 30.0,
        worker: int = 0,
        workers: int = 1,
        rate_window: float = 60.0,
        mapper_process: tuple[str, str] | None = None,
    ):
        self.config = config
        # (log format, level): map in a child process (relay/mapproc.py), as `relay serve`
        # does with one process; None: on a thread of this one.
        self.mapper_process = mapper_process
        self.rate_window = rate_window  # tests only: see Forwarder
        # With workers > 1, each worker process receives webhooks; worker 0 alone forwards.
        self.worker = worker
        self.workers = workers
        self.metrics = Metrics()
        self.refusals = Refusals()  # the console's "Refused" page
        self.store: Store | None = None
        self.mapper: Mapper | MapperProcess | None = None
        self.pipeline: Pipeline | None = None
        self.forwarder: Forwarder | None = None
        self.housekeeper: Housekeeper | None = None
        self.client: httpx.AsyncClient | None = None
        self.draining = False
        self.housekeeping_interval = housekeeping_interval

    async def start(self) -> None:
        cfg = self.config
        store = open_store(
            cfg.relay.database,
            on_commit=self.metrics.commit_seconds.observe,
            shared=self.workers > 1,
        )
        await store.open()
        self.store = store
        if self.mapper_process is not None and self.workers == 1:
            self.mapper = MapperProcess(cfg, self.metrics, *self.mapper_process)
        else:
            self.mapper = Mapper(cfg, store, self.metrics)
        if self.worker > 0 and not store.replicated:  # receives and maps webhooks only
            await self.mapper.start()
            self.pipeline = Pipeline(cfg, store, self.metrics, self.mapper)
            applog.info("worker %d of %d ready", self.worker, self.workers)
            return
        self.client = httpx.AsyncClient(
            timeout=cfg.track.timeout,
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
            headers={"user-agent": "webhook-relay"},
        )
        self.forwarder = Forwarder(store, cfg, self.client, self.metrics, window=self.rate_window)
        await self.forwarder.start()
        self.mapper.on_queued = self.forwarder.queued
        await self.mapper.start()
        self.pipeline = Pipeline(cfg, store, self.metrics, self.mapper)
        self.housekeeper = Housekeeper(store, cfg, self.metrics, self.housekeeping_interval)
        self.housekeeper.start()
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
            store.url,
            f", {self.workers} workers" if self.workers > 1 else "",
        )

    async def stop(self) -> None:
        self.draining = True
        grace = self.config.relay.shutdown_grace
        if self.housekeeper is not None:
            await self.housekeeper.stop()
        if self.mapper is not None:  # what was acknowledged is mapped (or mapped at next start)
            await self.mapper.stop(grace)
        if self.forwarder is not None:
            await self.forwarder.stop(grace)
        if self.client is not None:
            await self.client.aclose()
        if self.store is not None:
            await self.store.close()
        applog.info("relay stopped cleanly")

    def reload(self) -> bool:
        return self.mapper.reload() if self.mapper is not None else False


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
        problem = await rt.store.check_writable(rt.config.relay.max_body_bytes)
        if problem is not None:
            problems.append(f"store not writable: {problem}")
        if rt.mapper is not None and not rt.mapper.running and not rt.draining:
            problems.append("mapper not running")
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
    rate_window: float = 60.0,
    mapper_process: tuple[str, str] | None = None,
) -> Gateway:
    runtime = Runtime(config, housekeeping_interval, worker, workers, rate_window, mapper_process)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        _install_sighup(runtime)
        try:
            yield
        finally:
            await runtime.stop()

    console: list[BaseRoute] = []
    if config.console is not None and config.console.enabled:
        from relay.console import console_mount

        console = [console_mount(runtime)]
    app = Starlette(
        routes=[
            Route(
                "/webhooks/{source}", _method_not_allowed, methods=["GET", "PUT", "DELETE", "PATCH"]
            ),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
            *console,
            *(
                proxy.ROUTES
                if any(s.provider.kind == "track" for s in config.sources.values())
                else []
            ),
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
