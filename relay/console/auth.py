"""Who may use the console: a signed session cookie, and a CSRF token bound to it.

The cookie is `<session id>.<expiry>.<signed in: 1|0>.<HMAC>`, keyed by a digest of the console
token, so every worker process accepts the sessions of the others and a new token ends every
session. Without a token (a gateway on loopback only) each visitor gets a signed-in session
at once. The CSRF token is an HMAC of the session id: a POST must carry it in a `csrf` field
or an `X-CSRF-Token` header, whatever its Origin or Referer say.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from relay.config import Secret

COOKIE = "relay_console"
LIFETIME = 12 * 3600.0
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    id: str
    expires: int
    signed_in: bool


class Access:
    def __init__(self, token: Secret | None):
        self.token = token
        self.required = token is not None
        if token is None:
            self._key = secrets.token_bytes(32)
        else:
            self._key = hashlib.sha256(
                b"relay console session\0" + token.reveal().encode()
            ).digest()

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def session(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE, "")
        parts = raw.split(".")
        if len(parts) != 4:
            return None
        sid, expires, signed_in, mac = parts
        if not hmac.compare_digest(mac, self._sign(f"{sid}.{expires}.{signed_in}")):
            return None
        if not expires.isdigit() or int(expires) < time.time():
            return None
        return Session(sid, int(expires), signed_in == "1")

    def new_session(self, signed_in: bool) -> Session:
        return Session(secrets.token_urlsafe(18), int(time.time() + LIFETIME), signed_in)

    def set_cookie(self, request: Request, response: Response, session: Session) -> None:
        flag = "1" if session.signed_in else "0"
        text = f"{session.id}.{session.expires}.{flag}"
        response.set_cookie(
            COOKIE,
            f"{text}.{self._sign(text)}",
            max_age=int(LIFETIME),
            path="/console",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf:{session.id}")[:40]

    def csrf_ok(self, session: Session | None, given: str | None) -> bool:
        if session is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())

    def token_ok(self, given: str) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(given.encode(), self.token.reveal().encode())


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def start_problem(enabled: bool, token: Secret | None, host: str) -> str | None:
    """Why the gateway must not start with this console setting, if so (one line)."""
    if enabled and token is None and not is_loopback(host):
        return (
            f"[console] token is required when [console] enabled = true and the gateway "
            f"listens beyond loopback (host {host}); set [console] token, or enabled = false"
        )
    return None
