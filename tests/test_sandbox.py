"""The sandbox track API, over real HTTP on 127.0.0.1: the reference's behaviour, then the
sandbox's own fault and request-record endpoints."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.routing import Mount

import relay.sandbox
from relay.cli import main
from relay.sandbox import create_app
from tests.servers import ThreadedServer, serve

KEY = "sk_test_" + "a1" * 16
OTHER = "sk_test_" + "b2" * 16
FP = hashlib.sha256(KEY.encode()).hexdigest()[:12]
UUID = "550e8400-e29b-41d4-a716-446655440000"
TRACK = "/api/v1/websites/1/track"
BATCH = "/api/v1/websites/1/track/batch"
EVENTS = "/api/v1/websites/1/events"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeClock:
    """The rate window's clock, moved by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """One server for tests that need no special settings and no exact counts."""
    db = tmp_path_factory.mktemp("sandbox") / "shared.db"
    app = create_app([KEY, OTHER], [1, 2], requests_per_minute=1_000_000, database=db)
    with serve(app) as server:
        yield server


@pytest.fixture
def api(shared: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared.url, headers=bearer(KEY), timeout=5) as client:
        client.delete("/_sandbox/faults")
        client.delete("/_sandbox/requests")
        yield client
        client.delete("/_sandbox/faults")
        client.delete("/_sandbox/requests")


Make = Callable[..., httpx.Client]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """A dedicated sandbox with the given create_app settings, and a client using KEY."""
    with ExitStack() as stack:

        def start(**settings: Any) -> httpx.Client:
            settings.setdefault("api_keys", [KEY, OTHER])
            settings.setdefault("website_ids", [1, 2])
            settings.setdefault("database", tmp_path / f"sandbox-{time.monotonic_ns()}.db")
            server = stack.enter_context(serve(create_app(**settings)))
            return stack.enter_context(
                httpx.Client(base_url=server.url, headers=bearer(KEY), timeout=5)
            )

        yield start


def total(client: httpx.Client, website: int = 1) -> int:
    r = client.get(f"/api/v1/websites/{website}/events")
    assert r.status_code == 200
    return int(r.json()["total"])


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


# --- success ------------------------------------------------------------------------------


def test_single_event_is_stored_and_listed(make: Make) -> None:
    client = make()
    event = {
        "name": "purchase",
        "payload": {"order_id": "ORD-1234", "amount": "49.99"},
        "visitor_id": UUID,
        "url": "https://example.com/checkout",
        "referrer": "https://ref.example/",
    }
    r = client.post(TRACK, json=event)
    assert r.status_code == 200
    assert r.json() == {"ok": True, "event_id": 1}
    listed = client.get(EVENTS).json()
    assert listed["ok"] is True and listed["total"] == 1
    (got,) = listed["events"]
    assert {k: got[k] for k in ("id", "name", "payload", "visitor_id", "url", "referrer")} == {
        "id": 1,
        **event,
    }
    assert abs(got["received_at"] - time.time()) < 5


def test_batch_answers_ids_in_input_order(make: Make) -> None:
    client = make()
    client.post(TRACK, json={"name": "first"})
    events = [{"name": f"e{i}", "payload": {"i": i}} for i in range(25)]
    r = client.post(BATCH, json={"events": events})
    assert r.status_code == 200
    assert r.json() == {"ok": True, "processed": 25, "event_ids": list(range(2, 27))}
    listed = client.get(EVENTS, params={"limit": 30}).json()["events"]
    assert [e["name"] for e in listed] == [f"e{i}" for i in reversed(range(25))] + ["first"]
    assert [e["id"] for e in listed] == list(range(26, 0, -1))


def test_numbers_and_booleans_are_stored_as_strings(make: Make) -> None:
    client = make()
    payload = {
        "price": 49.99,
        "yes": True,
        "no": False,
        "n": 3,
        "zero": 0,
        "neg": -1.5,
        "whole": 3.0,
        "text": "x",
    }
    assert client.post(TRACK, json={"name": "cast", "payload": payload}).status_code == 200
    assert client.get(EVENTS).json()["events"][0]["payload"] == {
        "price": "49.99",
        "yes": "true",
        "no": "false",
        "n": "3",
        "zero": "0",
        "neg": "-1.5",
        "whole": "3",
        "text": "x",
    }


@pytest.mark.parametrize(
    "event",
    [
        {"name": "n" * 128},
        {"name": "a", "payload": {f"k{i}": "v" for i in range(10)}},
        {"name": "a", "payload": {"v": "x" * 255}},
        {"name": "a", "payload": {}},
        {"name": "a", "payload": None, "visitor_id": None, "url": None, "referrer": None},
        {"name": "a", "visitor_id": UUID.upper()},
        {"name": "a", "url": "u" * 2048, "referrer": "r" * 2048},
        {"name": "a", "unknown": {"nested": [1]}, "id": 5},
    ],
    ids=[
        "name128",
        "10keys",
        "value255",
        "empty-payload",
        "nulls",
        "upper-uuid",
        "url2048",
        "unknown-fields",
    ],
)
def test_boundary_events_are_accepted(api: httpx.Client, event: dict[str, Any]) -> None:
    r = api.post(TRACK, json=event)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["event_id"], int)


# --- 400 validation_error ---------------------------------------------------------------

NOT_SCALAR = "must be a string, number or boolean"
INVALID_EVENTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("name-missing", {}, "name", "is required"),
    ("name-null", {"name": None}, "name", "is required"),
    ("name-empty", {"name": ""}, "name", "is required"),
    ("name-number", {"name": 7}, "name", "must be a string"),
    ("name-129", {"name": "n" * 129}, "name", "must be at most 128 characters"),
    ("payload-array", {"name": "a", "payload": [1]}, "payload", "must be an object"),
    ("payload-string", {"name": "a", "payload": "x"}, "payload", "must be an object"),
    (
        "payload-11-keys",
        {"name": "a", "payload": {f"k{i}": "v" for i in range(11)}},
        "payload",
        "must have at most 10 keys",
    ),
    ("value-object", {"name": "a", "payload": {"n": {"x": 1}}}, "payload.n", NOT_SCALAR),
    ("value-array", {"name": "a", "payload": {"n": [1]}}, "payload.n", NOT_SCALAR),
    ("value-null", {"name": "a", "payload": {"n": None}}, "payload.n", NOT_SCALAR),
    (
        "value-256",
        {"name": "a", "payload": {"note": "x" * 256}},
        "payload.note",
        "must be at most 255 characters",
    ),
    (
        "number-256-digits",
        {"name": "a", "payload": {"big": 10**255}},
        "payload.big",
        "must be at most 255 characters",
    ),
    (
        "visitor-not-uuid",
        {"name": "a", "visitor_id": "visitor-1"},
        "visitor_id",
        "must be a valid UUID",
    ),
    ("visitor-number", {"name": "a", "visitor_id": 12}, "visitor_id", "must be a valid UUID"),
    (
        "visitor-trailing",
        {"name": "a", "visitor_id": UUID + "\n"},
        "visitor_id",
        "must be a valid UUID",
    ),
    ("url-number", {"name": "a", "url": 5}, "url", "must be a string"),
    ("url-2049", {"name": "a", "url": "u" * 2049}, "url", "must be at most 2048 characters"),
    ("referrer-array", {"name": "a", "referrer": ["x"]}, "referrer", "must be a string"),
    (
        "referrer-2049",
        {"name": "a", "referrer": "r" * 2049},
        "referrer",
        "must be at most 2048 characters",
    ),
]


@pytest.mark.parametrize(
    ("event", "path", "message"),
    [c[1:] for c in INVALID_EVENTS],
    ids=[c[0] for c in INVALID_EVENTS],
)
def test_invalid_event_is_refused_with_its_field(
    api: httpx.Client, event: dict[str, Any], path: str, message: str
) -> None:
    body = assert_error(api.post(TRACK, json=event), 400, "validation_error")
    assert body["errors"] == {path: [message]}
    body = assert_error(
        api.post(BATCH, json={"events": [{"name": "ok"}, event]}), 400, "validation_error"
    )
    assert body["errors"] == {f"events.1.{path}": [message]}


@pytest.mark.parametrize(
    "raw", [b"not json", b"", b"[1, 2]", b'"text"', b"null", b'{"name": NaN}', b"[" * 100_000]
)
@pytest.mark.parametrize("url", [TRACK, BATCH])
def test_body_must_be_a_json_object(api: httpx.Client, url: str, raw: bytes) -> None:
    body = assert_error(api.post(url, content=raw), 400, "validation_error")
    assert list(body["errors"]) == ["body"]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({}, "is required"),
        ({"events": None}, "is required"),
        ({"events": {"name": "a"}}, "must be an array"),
        ({"events": []}, "must contain at least 1 event"),
        ({"events": [{"name": "a"}] * 26}, "must contain at most 25 events"),
    ],
)
def test_batch_needs_1_to_25_events(api: httpx.Client, batch: dict[str, Any], message: str) -> None:
    body = assert_error(api.post(BATCH, json=batch), 400, "validation_error")
    assert body["errors"] == {"events": [message]}


def test_one_invalid_event_refuses_the_whole_batch_listing_every_error(make: Make) -> None:
    client = make()
    events: list[Any] = [{"name": "fine"} for _ in range(6)]
    events[1] = "not an object"
    events[3] = {"name": "x", "payload": {"note": "n" * 256, "ok": "y"}}
    events[5] = {"payload": {"a": None}, "visitor_id": "nope"}
    body = assert_error(client.post(BATCH, json={"events": events}), 400, "validation_error")
    assert body["errors"] == {
        "events.1": ["must be an object"],
        "events.3.payload.note": ["must be at most 255 characters"],
        "events.5.name": ["is required"],
        "events.5.payload.a": [NOT_SCALAR],
        "events.5.visitor_id": ["must be a valid UUID"],
    }
    assert "(and 4 more errors)" in body["message"]
    assert total(client) == 0


# --- 401, 402, 403, 404, 500 ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("sk_wrong"),
        bearer(KEY + "x"),
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": KEY},
    ],
    ids=["missing", "wrong", "longer", "basic", "empty", "no-scheme"],
)
@pytest.mark.parametrize("method,url", [("POST", TRACK), ("POST", BATCH), ("GET", EVENTS)])
def test_unauthorized(
    shared: ThreadedServer, headers: dict[str, str], method: str, url: str
) -> None:
    r = httpx.request(
        method,
        shared.url + url,
        headers=headers,
        json={"events": [{"name": "a"}]} if url == BATCH else {"name": "a"},
    )
    body = assert_error(r, 401, "unauthorized")
    assert KEY not in r.text and "sk_wrong" not in body["message"]


def test_monthly_quota_is_per_key_and_a_batch_must_fit_whole(make: Make) -> None:
    client = make(monthly_quota=3)
    assert client.post(TRACK, json={"name": "a"}).status_code == 200
    assert client.post(TRACK, json={"name": "b"}).status_code == 200
    r = client.post(BATCH, json={"events": [{"name": "c"}, {"name": "d"}]})
    assert_error(r, 402, "monthly_limit_reached")
    assert client.post(BATCH, json={"events": [{"name": "c"}]}).status_code == 200
    assert_error(client.post(TRACK, json={"name": "e"}), 402, "monthly_limit_reached")
    assert total(client) == 3
    assert client.post(TRACK, json={"name": "f"}, headers=bearer(OTHER)).status_code == 200


@pytest.mark.parametrize("url,body", [(TRACK, {"name": "a"}), (BATCH, {"events": [{"name": "a"}]})])
def test_free_plan_is_refused(make: Make, url: str, body: dict[str, Any]) -> None:
    client = make(plan="free")
    assert_error(client.post(url, json=body), 403, "plan_required")
    assert total(client) == 0


@pytest.mark.parametrize("website", ["3", "0", "-1", "abc", "99999999999999999999999"])
def test_website_not_owned(api: httpx.Client, website: str) -> None:
    r = api.post(f"/api/v1/websites/{website}/track", json={"name": "a"})
    assert_error(r, 404, "website_not_found")
    assert_error(api.get(f"/api/v1/websites/{website}/events"), 404, "website_not_found")


def test_internal_error_is_a_json_500_without_traceback(make: Make, tmp_path: Path) -> None:
    client = make(database=tmp_path)  # a directory: SQLite cannot open it
    r = client.post(TRACK, json={"name": "a"})
    body = assert_error(r, 500, "server_error")
    assert set(body) == {"ok", "error", "message"}
    assert "Traceback" not in r.text and "sqlite" not in r.text.lower()
    assert_error(client.get(EVENTS), 500, "server_error")
    assert client.get("/_sandbox/requests").json()["by_status"] == {"500": 1}


# --- check order ------------------------------------------------------------------------


def test_check_order(make: Make) -> None:
    free = make(plan="free", monthly_quota=0)
    assert_error(
        free.post("/api/v1/websites/9/track", content=b"x", headers=bearer("bad")),
        401,
        "unauthorized",
    )
    assert_error(free.post("/api/v1/websites/9/track", content=b"x"), 404, "website_not_found")
    assert_error(free.post(TRACK, content=b"x"), 403, "plan_required")
    empty = make(monthly_quota=0)
    assert_error(empty.post(TRACK, content=b"x"), 400, "validation_error")
    assert_error(empty.post(TRACK, json={"name": "a"}), 402, "monthly_limit_reached")


def test_refused_404_and_400_requests_count_toward_the_rate_limit(make: Make) -> None:
    client = make(requests_per_minute=2, clock=FakeClock())
    assert_error(
        client.post("/api/v1/websites/9/track", json={"name": "a"}), 404, "website_not_found"
    )
    assert_error(client.post(TRACK, json={}), 400, "validation_error")
    assert_error(client.post(TRACK, json={"name": "a"}), 429, "rate_limit_exceeded")
    assert_error(client.post("/api/v1/websites/9/track", json={}), 429, "rate_limit_exceeded")


# --- 429 rate_limit_exceeded ------------------------------------------------------------


def test_61st_request_in_a_minute_gets_retry_after_to_the_second(make: Make) -> None:
    clock = FakeClock(1000.0)
    client = make(clock=clock)
    for i in range(60):
        clock.now = 1000.0 + i * 0.5  # the last one at 1029.5
        assert client.post(TRACK, json={"name": "a"}).status_code == 200
    for now, expected in [(1030.2, 30), (1031.0, 29), (1059.0, 1), (1059.99, 1)]:
        clock.now = now
        r = client.post(TRACK, json={"name": "a"})
        body = assert_error(r, 429, "rate_limit_exceeded")
        assert body["retry_after"] == expected
        assert r.headers["Retry-After"] == str(expected)
    clock.now = 1060.0  # the oldest (1000.0) leaves the window
    assert client.post(TRACK, json={"name": "a"}).status_code == 200
    r = client.post(TRACK, json={"name": "a"})  # next oldest 1000.5 leaves at 1060.5
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.headers["Retry-After"] == "1"
    clock.now = 1065.2  # 1000.5 .. 1005.0 have left: ten more fit, not eleven
    for _ in range(10):
        assert client.post(TRACK, json={"name": "a"}).status_code == 200
    r = client.post(TRACK, json={"name": "a"})  # 1005.5 leaves at 1065.5: 0.3 s rounds up
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"


def test_refused_requests_do_not_count(make: Make) -> None:
    clock = FakeClock(0.0)
    client = make(requests_per_minute=2, clock=clock)
    for now in (0.0, 1.0):
        clock.now = now
        assert client.post(TRACK, json={"name": "a"}).status_code == 200
    for now in (2.0, 30.0, 59.0):
        clock.now = now
        r = client.post(TRACK, json={"name": "a"})
        assert r.status_code == 429 and r.headers["Retry-After"] == str(int(60 - now))
    clock.now = 60.0  # only 0.0 left; the 429s at 2, 30, 59 never entered the window
    assert client.post(TRACK, json={"name": "a"}).status_code == 200
    r = client.post(TRACK, json={"name": "a"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"


def test_limit_is_per_key_and_a_batch_counts_once(make: Make) -> None:
    client = make(requests_per_minute=2, clock=FakeClock())
    batch = {"events": [{"name": "a"}] * 25}
    assert client.post(BATCH, json=batch).status_code == 200
    assert client.post(BATCH, json=batch).status_code == 200
    assert client.post(BATCH, json=batch).status_code == 429
    assert client.post(BATCH, json=batch, headers=bearer(OTHER)).status_code == 200
    for _ in range(3):  # listing is not rate limited
        assert client.get(EVENTS).status_code == 200
    assert total(client) == 75


def test_real_clock_61st_quick_request_waits_about_a_minute(make: Make) -> None:
    client = make()
    for _ in range(60):
        assert client.post(TRACK, json={"name": "a"}).status_code == 200
    r = client.post(TRACK, json={"name": "a"})
    body = assert_error(r, 429, "rate_limit_exceeded")
    assert r.headers["Retry-After"] in ("59", "60")
    assert body["retry_after"] == int(r.headers["Retry-After"])


# --- events listing ---------------------------------------------------------------------


def test_listing_limit_total_name_and_website(make: Make) -> None:
    client = make()
    client.post(BATCH, json={"events": [{"name": "a" if i % 2 else "b"} for i in range(10)]})
    client.post("/api/v1/websites/2/track", json={"name": "other-site"})
    listed = client.get(EVENTS, params={"limit": 3}).json()
    assert listed["total"] == 10
    assert [e["id"] for e in listed["events"]] == [10, 9, 8]
    named = client.get(EVENTS, params={"name": "a"}).json()
    assert named["total"] == 5 and {e["name"] for e in named["events"]} == {"a"}
    assert [e["id"] for e in named["events"]] == [10, 8, 6, 4, 2]
    assert client.get(EVENTS).json()["total"] == 10
    assert len(client.get(EVENTS, params={"limit": 10000}).json()["events"]) == 10
    site2 = client.get("/api/v1/websites/2/events", headers=bearer(OTHER)).json()
    assert [e["name"] for e in site2["events"]] == ["other-site"]
    assert site2["events"][0]["key"] == FP


@pytest.mark.parametrize("limit", ["0", "10001", "-1", "ten", "1.5", ""])
def test_listing_limit_must_be_1_to_10000(api: httpx.Client, limit: str) -> None:
    body = assert_error(api.get(EVENTS, params={"limit": limit}), 400, "validation_error")
    assert list(body["errors"]) == ["limit"]


def test_database_is_wal_and_never_holds_the_key(make: Make, tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    client = make(database=db)
    client.post(TRACK, json={"name": "a", "payload": {"k": "v"}, "visitor_id": UUID})
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT * FROM events").fetchall()
        (fp,) = conn.execute("SELECT key_fingerprint FROM events").fetchone()
    conn.close()
    assert fp == FP and len(rows) == 1
    assert KEY not in json.dumps(rows)
    files = list(tmp_path.glob("events.db*"))
    assert len(files) >= 2 and not any(KEY.encode() in f.read_bytes() for f in files)
    assert any(b"visitor_id" in f.read_bytes() for f in files)  # the check can see content


# --- faults -----------------------------------------------------------------------------


def add_fault(client: httpx.Client, **rule: Any) -> list[dict[str, Any]]:
    r = client.post("/_sandbox/faults", json=rule)
    assert r.status_code == 200, r.text
    faults: list[dict[str, Any]] = r.json()["faults"]
    return faults


@pytest.mark.parametrize(
    "status,code",
    [
        (400, "validation_error"),
        (401, "unauthorized"),
        (402, "monthly_limit_reached"),
        (403, "plan_required"),
        (404, "website_not_found"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
    ],
)
def test_fault_status_answers_the_apis_own_error(api: httpx.Client, status: int, code: str) -> None:
    add_fault(api, status=status)
    assert_error(api.post(TRACK, json={"name": "a"}), status, code)
    assert_error(api.post(BATCH, json={"events": [{"name": "a"}]}), status, code)


def test_fault_429_sends_retry_after(api: httpx.Client) -> None:
    add_fault(api, status=429, retry_after=5, count=1)
    add_fault(api, status=429, count=1)
    r = api.post(TRACK, json={"name": "a"})
    assert assert_error(r, 429, "rate_limit_exceeded")["retry_after"] == 5
    assert r.headers["Retry-After"] == "5"
    r = api.post(TRACK, json={"name": "a"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert api.post(TRACK, json={"name": "a"}).status_code == 200


def test_faulted_requests_are_not_stored_or_counted(make: Make) -> None:
    client = make(requests_per_minute=1, clock=FakeClock())
    add_fault(client, status=500, count=3)
    for _ in range(3):
        assert client.post(TRACK, json={"name": "a"}).status_code == 500
    assert client.post(TRACK, json={"name": "a"}).status_code == 200
    assert client.post(TRACK, json={"name": "a"}).status_code == 429
    assert total(client) == 1


def test_fault_count_then_delete_clears(api: httpx.Client) -> None:
    add_fault(api, status=503, count=2)
    statuses = [api.post(TRACK, json={"name": "a"}).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    add_fault(api, status=500)
    assert api.post(TRACK, json={"name": "a"}).status_code == 500
    assert api.get("/_sandbox/faults").json()["faults"][0]["applied"] == 2
    assert api.delete("/_sandbox/faults").json() == {"ok": True, "faults": []}
    assert api.get("/_sandbox/faults").json()["faults"] == []
    assert api.post(TRACK, json={"name": "a"}).status_code == 200


def test_fault_rate_applies_to_about_that_share(api: httpx.Client) -> None:
    add_fault(api, status=500, rate=0.3, seed=7)
    statuses = [api.post(TRACK, json={"name": "a"}).status_code for _ in range(100)]
    assert set(statuses) == {200, 500}
    assert 15 <= statuses.count(500) <= 45
    assert api.get("/_sandbox/faults").json()["faults"][0]["applied"] == statuses.count(500)
    api.delete("/_sandbox/faults")
    add_fault(api, status=500, rate=0)
    assert {api.post(TRACK, json={"name": "a"}).status_code for _ in range(10)} == {200}


def test_fault_latency_delays_an_otherwise_normal_answer(api: httpx.Client) -> None:
    add_fault(api, latency_ms=300, count=1)
    started = time.perf_counter()
    r = api.post(TRACK, json={"name": "slow"})
    assert time.perf_counter() - started >= 0.3
    assert r.status_code == 200 and "event_id" in r.json()
    started = time.perf_counter()
    api.post(TRACK, json={"name": "fast"})
    assert time.perf_counter() - started < 0.3


def test_fault_drop_breaks_the_connection(api: httpx.Client) -> None:
    add_fault(api, drop=True, count=1)
    with pytest.raises(httpx.TransportError):
        api.post(BATCH, json={"events": [{"name": "a"}]})
    assert api.post(TRACK, json={"name": "a"}).status_code == 200
    statuses = [r["status"] for r in api.get("/_sandbox/requests").json()["requests"]]
    assert statuses == [0, 200]


def test_fault_malformed_answers_200_that_is_not_json(api: httpx.Client) -> None:
    add_fault(api, malformed=True, count=1)
    r = api.post(TRACK, json={"name": "a"})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()


def test_fault_for_key_and_for_website(api: httpx.Client) -> None:
    faults = add_fault(api, status=503, for_key=OTHER)
    assert faults[0]["for_key"] == hashlib.sha256(OTHER.encode()).hexdigest()[:12]
    assert OTHER not in api.get("/_sandbox/faults").text
    assert api.post(TRACK, json={"name": "a"}).status_code == 200
    assert api.post(TRACK, json={"name": "a"}, headers=bearer(OTHER)).status_code == 503
    api.delete("/_sandbox/faults")
    add_fault(api, status=502, for_website=2)
    assert api.post(TRACK, json={"name": "a"}).status_code == 200
    assert api.post("/api/v1/websites/2/track", json={"name": "a"}).status_code == 502


def test_faults_apply_after_auth_and_only_to_track(api: httpx.Client) -> None:
    add_fault(api, status=500)
    assert_error(api.post(TRACK, json={"name": "a"}, headers=bearer("bad")), 401, "unauthorized")
    assert api.get(EVENTS).status_code == 200


@pytest.mark.parametrize(
    "rule,field",
    [
        ({"status": 200}, "status"),
        ({"status": "500"}, "status"),
        ({"rate": 1.5}, "rate"),
        ({"count": 0}, "count"),
        ({"drop": "yes"}, "drop"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"for_website": "2"}, "for_website"),
        ([], "body"),
    ],
)
def test_invalid_fault_rule_is_refused(api: httpx.Client, rule: Any, field: str) -> None:
    body = assert_error(api.post("/_sandbox/faults", json=rule), 400, "validation_error")
    assert list(body["errors"]) == [field]
    assert api.get("/_sandbox/faults").json()["faults"] == []


# --- /_sandbox/requests -----------------------------------------------------------------


def test_request_record_counts_statuses_and_batch_sizes(make: Make) -> None:
    client = make()
    before = time.time()
    client.post(TRACK, json={"name": "a"})
    client.post(BATCH, json={"events": [{"name": "a"}] * 3})
    httpx.post(str(client.base_url) + TRACK, json={"name": "a"})
    client.post("/api/v1/websites/9/track/batch", json={"events": [{"name": "a"}] * 2})
    client.post(TRACK, json={"name": ""})
    client.get(EVENTS)
    r = client.get("/_sandbox/requests")
    record = r.json()
    assert KEY not in r.text
    assert record["total"] == 5
    assert record["by_status"] == {"200": 2, "400": 1, "401": 1, "404": 1}
    got = [(q["key"], q["website_id"], q["status"], q["events"]) for q in record["requests"]]
    assert got == [
        (FP, 1, 200, 1),
        (FP, 1, 200, 3),
        (None, 1, 401, 1),
        (FP, 9, 404, 2),
        (FP, 1, 400, 1),
    ]
    assert all(before - 1 <= q["at"] <= time.time() + 1 for q in record["requests"])
    client.delete("/_sandbox/requests")
    assert client.get("/_sandbox/requests").json()["total"] == 0
    assert client.get("/_sandbox/requests").json()["requests"] == []


def test_batch_of_25_is_fast(make: Make) -> None:
    client = make(requests_per_minute=1000)
    batch = {
        "events": [
            {
                "name": "purchase",
                "payload": {f"k{j}": "v" * 20 for j in range(10)},
                "visitor_id": UUID,
            }
            for _ in range(25)
        ]
    }
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        assert client.post(BATCH, json=batch).status_code == 200
        timings.append(time.perf_counter() - started)
    assert min(timings) < 0.005


# --- hosting: lifespan, mounting, CLI ---------------------------------------------------


def test_lifespan_closes_the_database(tmp_path: Path) -> None:
    app = create_app([KEY], database=tmp_path / "s.db")
    with serve(app) as server:
        assert httpx.post(server.url + TRACK, json={"name": "a"}, headers=bearer(KEY)).is_success
        assert not app.state.sandbox.store.closed
    assert app.state.sandbox.store.closed


def test_works_mounted_under_a_prefix(tmp_path: Path) -> None:
    sandbox = create_app([KEY], [4], database=tmp_path / "s.db")
    parent = Starlette(routes=[Mount("/track-api", app=sandbox)])
    with (
        serve(parent) as server,
        httpx.Client(base_url=server.url + "/track-api", headers=bearer(KEY)) as client,
    ):
        r = client.post("/api/v1/websites/4/track/batch", json={"events": [{"name": "a"}]})
        assert r.json() == {"ok": True, "processed": 1, "event_ids": [1]}
        assert client.get("/api/v1/websites/4/events").json()["total"] == 1
        assert client.get("/_sandbox/requests").json()["total"] == 1
        assert_error(client.post(TRACK, json={"name": "a"}), 404, "website_not_found")
    sandbox.state.sandbox.close()
    assert sandbox.state.sandbox.store.closed


def test_cli_help() -> None:
    result = CliRunner().invoke(main, ["sandbox", "--help"])
    assert result.exit_code == 0, result.output
    assert "--requests-per-minute" in result.output and "--api-key" in result.output


def test_cli_prints_a_generated_key_that_works(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr(
        relay.sandbox.uvicorn, "run", lambda app, **options: served.update(app=app, **options)
    )
    args = [
        "sandbox",
        "--port",
        "8123",
        "--website-id",
        "1",
        "--website-id",
        "7",
        "--requests-per-minute",
        "30",
        "--database",
        str(tmp_path / "s.db"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    match = re.search(r"sk_sandbox_[0-9a-f]{32}", result.output)
    assert match, result.output
    assert "http://127.0.0.1:8123/api/v1" in result.output
    assert "1, 7" in result.output and "30 requests/minute" in result.output
    assert served["port"] == 8123
    with serve(served["app"]) as server:
        r = httpx.post(
            server.url + "/api/v1/websites/7/track",
            json={"name": "a"},
            headers=bearer(match.group()),
        )
        assert r.status_code == 200


def test_cli_does_not_print_given_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(relay.sandbox.uvicorn, "run", lambda app, **options: None)
    result = CliRunner().invoke(
        main, ["sandbox", "--api-key", KEY, "--database", str(tmp_path / "s.db")]
    )
    assert result.exit_code == 0, result.output
    assert KEY not in result.output and "sk_sandbox_" not in result.output
