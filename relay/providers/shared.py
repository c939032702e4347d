"""Verification for senders that sign nothing: HTTP Basic credentials or a shared token.

Both compare in constant time. They replace a provider's own signature check when a source
says ``verify = "basic"`` or ``verify = "token"``. A token carried in the body is a credential
like an Authorization header: :meth:`SharedToken.without_token` takes it out before the body is
stored, parsed or shown to templates.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from relay.errors import InvalidBody, InvalidSignature
from relay.providers.base import WebhookRequest
from relay.settings import ConfigTable, Secret


def _same(a: str, b: str) -> bool:
    # surrogatepass: a token from a JSON body may hold a lone surrogate ("\\ud800")
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode())


class BasicAuth:
    """`Authorization: Basic ...` must carry the configured username and password."""

    def __init__(self, username: Secret, password: Secret):
        self.username = username
        self.password = password

    @classmethod
    def from_config(cls, table: ConfigTable) -> BasicAuth:
        return cls(table.secret("username"), table.secret("password"))

    def verify(self, request: WebhookRequest) -> None:
        header = request.header("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            raise InvalidSignature("missing Basic credentials")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidSignature("malformed Basic credentials") from None
        user, sep, password = decoded.partition(":")
        # Evaluate both comparisons, so timing says nothing about which one failed.
        ok_user = _same(user, self.username.reveal())
        ok_pass = _same(password, self.password.reveal())
        if not (sep and ok_user and ok_pass):
            raise InvalidSignature("wrong Basic credentials")


class SharedToken:
    """A shared token in a header (`token_header`) or a body field (`token_field`, dotted)."""

    def __init__(self, token: Secret, header: str | None, field: str | None):
        self.token = token
        self.header = header
        self.field = field

    @classmethod
    def from_config(cls, table: ConfigTable) -> SharedToken:
        token = table.secret("token")
        header = table.string("token_header", None)
        field = table.string("token_field", None)
        if (header is None) == (field is None):
            table.fail("token_header", "say where the token is: token_header or token_field (one)")
        # An empty name would pass the check above and then match nothing, or crash verify().
        for name, value in (("token_header", header), ("token_field", field)):
            if value is not None and not value.strip():
                table.fail(name, "is empty")
        return cls(
            token, header.strip().lower() if header else None, field.strip() if field else None
        )

    def verify(self, request: WebhookRequest) -> None:
        if self.header:
            value = request.header(self.header)
            if value and value.lower().startswith("bearer "):
                value = value[7:].strip()
        else:
            assert self.field is not None
            value = _body_field(request, self.field)
        if not value:
            raise InvalidSignature("missing token")
        if not _same(value, self.token.reveal()):
            raise InvalidSignature("wrong token")

    def without_token(self, request: WebhookRequest) -> WebhookRequest:
        """The verified request with its body token removed: what is stored, parsed and mapped.

        A JSON body is written again without the field (the rest keeps its values); a form
        loses every pair of that name, the other pairs are kept byte for byte.
        """
        if self.field is None:
            return request
        if request.content_type == FORM:
            body = _form_without(request.body, self.field)
        else:
            body = _json_without(request.body, self.field)
        return dataclasses.replace(request, body=body)


FORM = "application/x-www-form-urlencoded"


def _body_field(request: WebhookRequest, path: str) -> str | None:
    """A dotted field from a JSON or form body, or None when it is not there."""
    data: Any
    try:
        if request.content_type == FORM:
            data = dict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
        else:
            data = json.loads(request.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    for part in path.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data if isinstance(data, str) else None


def _form_without(body: bytes, name: str) -> bytes:
    """A urlencoded form without any pair named `name` (names decoded as parse_qsl does)."""
    pairs = body.decode("utf-8").split("&")
    kept = [p for p in pairs if unquote_plus(p.partition("=")[0], errors="replace") != name]
    return "&".join(kept).encode("utf-8")


def _json_without(body: bytes, path: str) -> bytes:
    """A JSON body without the dotted field `path` (which verify() found there)."""
    data = json.loads(body)
    parts = path.split(".")
    parent = data
    for part in parts[:-1]:
        parent = parent[part]
    del parent[parts[-1]]
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
            return json.dumps(data, separators=(",", ":")).encode("ascii")
    except (ValueError, RecursionError):
        raise InvalidBody("the body cannot be stored without its token") from None
