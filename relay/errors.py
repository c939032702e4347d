"""The relay's exceptions.

    RelayError
    ├── ConfigError(file, key, reason)     a bad relay.toml or mapping file
    ├── WebhookError(status, code)         a webhook we refuse; maps to an HTTP answer
    │   ├── InvalidSignature(reason)       401 invalid_signature
    │   ├── InvalidBody(reason)            400 invalid_body
    │   ├── UnknownSource                  404 unknown_source
    │   ├── PayloadTooLarge                413 payload_too_large
    │   ├── RequestTimeout                 408 request_timeout (the body came too slowly)
    │   └── Unavailable(reason)            503 unavailable (the sender should retry)
    └── StoreError                         the database could not do what was asked

Reasons are for logs and operators: they never contain a secret.
"""

from __future__ import annotations

from pathlib import Path


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A mistake in a config or mapping file, named by file, key and reason."""

    def __init__(
        self, file: Path | str | None, key: str | None, reason: str, line: int | None = None
    ):
        self.file = str(file) if file is not None else None
        self.key = key
        self.reason = reason
        self.line = line
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.reason}"
        return f"{where}: {self.reason}"


class WebhookError(RelayError):
    status: int = 400
    code: str = "invalid_request"

    def __init__(self, reason: str = "", detail: str | None = None):
        self.reason = reason or self.code
        # What the console's "Refused" page shows: more precise than the answer's reason
        # (e.g. how old the timestamp was), never a secret or a signature value.
        self.detail = detail or self.reason
        super().__init__(self.reason)


class InvalidSignature(WebhookError):
    status = 401
    code = "invalid_signature"


class InvalidBody(WebhookError):
    status = 400
    code = "invalid_body"


class UnknownSource(WebhookError):
    status = 404
    code = "unknown_source"


class PayloadTooLarge(WebhookError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(WebhookError):
    status = 408
    code = "request_timeout"


class Unavailable(WebhookError):
    status = 503
    code = "unavailable"


class StoreError(RelayError):
    """The store failed (disk full, read-only file, closed)."""
