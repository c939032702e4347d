"""The console's ASGI app: routes, sign-in, the CSRF check and the security headers."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.console.auth import CSRF_FIELD, CSRF_HEADER, Access, Session
from relay.redact import Redactor

if TYPE_CHECKING:
    from relay.app import Runtime

log = logging.getLogger("relay.console")

BASE = "/console"
HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]

Handler = Callable[["Console", Request, Session], Awaitable[Response]]


def ts(value: float | None) -> str:
    if value is None:
        return "—"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class Console:
    """What every page needs: the gateway's runtime, access, the templates."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        settings = runtime.config.console
        self.access = Access(settings.token if settings is not None else None)
        self.redact = Redactor.of(runtime.config)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            # No configured secret on any page, whatever the data holds.
            finalize=lambda v: self.redact(v) if isinstance(v, str) else v,
        )
        self.templates.filters["ts"] = ts
        self.templates.filters["age"] = age

    def render(
        self,
        request: Request,
        session: Session | None,
        name: str,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        context.setdefault("notes", [])
        context.setdefault("problems", [])
        context.setdefault("nav", session is not None and session.signed_in)
        context.setdefault("page", "")
        html = self.templates.get_template(name).render(
            base=BASE, csrf=self.access.csrf(session) if session else "", **context
        )
        response = HTMLResponse(html, status_code=status)
        response.headers["cache-control"] = "no-store"
        return response


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page behind the sign-in (a POST also behind the CSRF check)."""

    async def endpoint(request: Request) -> Response:
        console: Console = request.app.state.console
        access = console.access
        session = access.session(request)
        fresh = None
        if session is None and not access.required and request.method == "GET":
            session = fresh = access.new_session(signed_in=True)
        if request.method == "POST" and not await csrf_ok(console, request, session):
            return forbidden()
        if session is None or not session.signed_in:
            if request.method == "POST":
                return forbidden()
            return RedirectResponse(f"{BASE}/signin", status_code=303)
        response = await handler(console, request, session)
        if fresh is not None:
            access.set_cookie(request, response, fresh)
        return response

    return endpoint


async def csrf_ok(console: Console, request: Request, session: Session | None) -> bool:
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        try:
            form = await request.form()
        except Exception:  # not a form at all
            return False
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    ok = console.access.csrf_ok(session, given)
    if not ok:
        client = request.client.host if request.client else ""
        log.warning(
            "console: %s %s refused: missing or wrong CSRF token (from %s)",
            request.method,
            request.url.path,
            client,
        )
    return ok


def forbidden() -> Response:
    return HTMLResponse(
        "<!doctype html><title>403</title><p>Forbidden: missing or wrong CSRF token, or not "
        "signed in. Reload the page and try again.</p>",
        status_code=403,
    )


async def signin_page(request: Request) -> Response:
    console: Console = request.app.state.console
    access = console.access
    if not access.required:
        return RedirectResponse(f"{BASE}/", status_code=303)
    session = access.session(request)
    if session is not None and session.signed_in:
        return RedirectResponse(f"{BASE}/", status_code=303)
    fresh = session or access.new_session(signed_in=False)
    response = console.render(request, fresh, "signin.html", page="Sign in", nav=False)
    if session is None:
        access.set_cookie(request, response, fresh)
    return response


async def signin(request: Request) -> Response:
    console: Console = request.app.state.console
    access = console.access
    session = access.session(request)
    if not await csrf_ok(console, request, session):
        return forbidden()
    assert session is not None
    form = await request.form()
    token = form.get("token")
    client = request.client.host if request.client else ""
    if not isinstance(token, str) or not access.token_ok(token):
        log.warning("console: sign-in refused: wrong token (from %s)", client)
        return console.render(
            request,
            session,
            "signin.html",
            status=401,
            page="Sign in",
            nav=False,
            problems=["Wrong token."],
        )
    log.info("console: signed in (from %s)", client)
    response = RedirectResponse(f"{BASE}/", status_code=303)
    access.set_cookie(request, response, access.new_session(signed_in=True))
    return response


class SecurityHeaders:
    """Every console response (pages, fragments, files, errors) carries the CSP."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


async def not_found(request: Request, exc: Exception) -> Response:
    console: Console = request.app.state.console
    session = console.access.session(request)
    return console.render(
        request, session, "missing.html", status=404, page="Not found", what="No such page."
    )


def console_mount(runtime: Runtime) -> Mount:
    from relay.console import actions, pages

    app = Starlette(
        routes=[
            Route("/", page(pages.overview), methods=["GET"]),
            Route("/signin", signin_page, methods=["GET"]),
            Route("/signin", signin, methods=["POST"]),
            Route("/webhooks", page(pages.webhooks), methods=["GET"]),
            Route("/webhooks/rows", page(pages.webhook_rows), methods=["GET"]),
            Route("/webhooks/{id:int}", page(pages.webhook), methods=["GET"]),
            Route("/refused", page(pages.refused), methods=["GET"]),
            Route("/dead", page(actions.dead_letters), methods=["GET"]),
            Route("/dead/replay", page(actions.replay), methods=["POST"]),
            Route("/dead/{id:int}", page(actions.dead_letter), methods=["GET"]),
            Route("/mappings", page(actions.mappings), methods=["GET"]),
            Route("/mappings/rules", page(actions.mapping_rules), methods=["GET"]),
            Route("/mappings", page(actions.playground), methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={404: not_found},
    )
    app.state.console = Console(runtime)
    return Mount(BASE, app=SecurityHeaders(app))
