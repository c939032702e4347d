"""How each answer of the track API is read (the table in relay/forwarder.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from relay.answers import Delivered, Invalid, Pause, RateLimited, Retry, classify


def answer(
    status: int, body: Any = None, headers: dict[str, str] | None = None, text: str | None = None
) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (answer(200, {"ok": True, "processed": 2, "event_ids": [7, 8]}), Delivered([7, 8])),
        (answer(200, {"ok": True, "event_ids": [7, "x"]}), Delivered([7, None])),
        (answer(200, {"ok": True}), Delivered([])),
        (answer(200, text="<html>"), Retry("malformed answer: 200 without JSON")),
        (answer(200, {"ok": False}), Retry("malformed answer: 200 without ok")),
        (answer(200, [1, 2]), Retry("malformed answer: 200 without ok")),
        (
            answer(400, {"ok": False, "error": "validation_error"}),
            Invalid('{"ok":false,"error":"validation_error"}'),
        ),
        (
            answer(401, {"ok": False, "error": "unauthorized"}),
            Pause(401, "HTTP 401 unauthorized", whole_key=True),
        ),
        (
            answer(402, {"ok": False, "error": "monthly_limit_reached"}),
            Pause(402, "HTTP 402 monthly_limit_reached", whole_key=True),
        ),
        (
            answer(403, {"ok": False, "error": "plan_required"}),
            Pause(403, "HTTP 403 plan_required", whole_key=True),
        ),
        (
            answer(404, {"ok": False, "error": "website_not_found"}),
            Pause(404, "HTTP 404 website_not_found", whole_key=False),
        ),
        (answer(500, {"ok": False, "error": "server_error"}), Retry("HTTP 500 server_error")),
        (answer(502, text="bad gateway"), Retry("HTTP 502")),
        (answer(418, {"error": 5}), Retry("HTTP 418")),
    ],
)
def test_answers(response: httpx.Response, expected: object) -> None:
    assert classify(response) == expected


@pytest.mark.parametrize(
    ("headers", "body", "wait"),
    [
        ({"retry-after": "30"}, {"retry_after": 30}, 30.0),
        ({"retry-after": "12"}, {"retry_after": 20}, 20.0),  # never less than either says
        ({}, {"retry_after": 7}, 7.0),
        ({"retry-after": "9"}, None, 9.0),
        ({"retry-after": "soon"}, {"ok": False}, 60.0),  # nothing usable: a whole window
    ],
)
def test_429_waits_at_least_what_the_api_asks(
    headers: dict[str, str], body: Any, wait: float
) -> None:
    response = (
        answer(429, body, headers) if body is not None else answer(429, text="", headers=headers)
    )
    assert classify(response) == RateLimited(wait)
