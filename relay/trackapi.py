"""The track API's request rules (``track-api.md``): what a valid event is, and the error
bodies the API answers.

Both sides of the relay that speak the API's language use this one module: the sandbox (the
local track API) and the relay's own track endpoints (``provider = "track"``), so the two give
the same status and body for the same request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from starlette.responses import JSONResponse

MAX_BATCH = 25
MAX_NAME = 128
MAX_PAYLOAD_KEYS = 10
MAX_VALUE = 255
MAX_URL = 2048
MAX_LIST = 10_000
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Event:
    """One valid event, payload values already cast to strings."""

    name: str
    payload: dict[str, str] = dataclass_field(default_factory=dict)
    visitor_id: str | None = None
    url: str | None = None
    referrer: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as the API takes it; absent fields are left out."""
        out: dict[str, Any] = {"name": self.name}
        if self.payload:
            out["payload"] = self.payload
        for key in ("visitor_id", "url", "referrer"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


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
