"""The relay as the track API (`provider = "track"`): the same validation as the API (checked
against the sandbox, row by row), idempotent retries, and bursts sent on in full batches."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Relay, Sandbox

INGEST_KEY = "rk_ingest_backend_0123456789"

TRACK_SOURCE = f"""
[sources.backend]
provider = "track"
keys = ["{INGEST_KEY}", "rk_second_key"]
websites = [1, 2]
"""

V = "550e8400-e29b-41d4-a716-446655440000"


def ev(**fields: Any) -> dict[str, Any]:
    return {"name": "purchase", **fields}


# (path, body: JSON value or raw bytes); the same request goes to the sandbox and the relay.
ROWS: list[tuple[str, str, Any]] = [
    ("missing name", "track", {"payload": {"a": "1"}}),
    ("empty name", "track", {"name": ""}),
    ("name not a string", "track", {"name": 12}),
    ("name too long", "track", {"name": "x" * 129}),
    ("name at the limit", "track", {"name": "x" * 128}),
    ("payload not an object", "track", ev(payload=["a"])),
    ("payload with 11 keys", "track", ev(payload={f"k{i}": "v" for i in range(11)})),
    ("payload with 10 keys", "track", ev(payload={f"k{i}": "v" for i in range(10)})),
    ("payload value too long", "track", ev(payload={"a": "x" * 256})),
    ("payload value nested", "track", ev(payload={"a": {"b": 1}})),
    ("payload value null", "track", ev(payload={"a": None})),
    ("payload numbers and booleans", "track", ev(payload={"a": 20.25, "b": True, "c": 3})),
    ("visitor_id not a UUID", "track", ev(visitor_id="abc")),
    ("visitor_id a number", "track", ev(visitor_id=5)),
    ("visitor_id valid", "track", ev(visitor_id=V)),
    ("url not a string", "track", ev(url=5)),
    ("url too long", "track", ev(url="https://e.com/" + "x" * 2048)),
    ("referrer too long", "track", ev(referrer="https://e.com/" + "x" * 2048)),
    ("several errors", "track", {"name": 5, "visitor_id": "x", "url": 1}),
    ("not JSON", "track", b"{not json"),
    ("NaN", "track", b'{"name": "a", "payload": {"x": NaN}}'),
    ("empty body", "track", b""),
    ("an array", "track", [ev()]),
    ("a string", "track", "purchase"),
    ("batch without events", "track/batch", {"name": "x"}),
    ("batch events not an array", "track/batch", {"events": {"name": "x"}}),
    ("batch of none", "track/batch", {"events": []}),
    ("batch of 26", "track/batch", {"events": [ev() for _ in range(26)]}),
    ("batch of 25", "track/batch", {"events": [ev() for _ in range(25)]}),
    ("batch item not an object", "track/batch", {"events": [ev(), "x"]}),
    ("batch with one bad event", "track/batch", {"events": [ev(), ev(), {"name": ""}]}),
    ("batch with two bad events", "track/batch", {"events": [{"x": 1}, ev(visitor_id="y")]}),
    ("batch not an object", "track/batch", [ev()]),
    ("batch valid", "track/batch", {"events": [ev(), ev(payload={"n": 1.0}, visitor_id=V)]}),
]


def _content(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """An answer without its ids (the relay's are its own)."""
    out = dict(body)
    if "event_id" in out:
        out["event_id"] = int
    if "event_ids" in out:
        out["event_ids"] = len(out["event_ids"])
    return out


@pytest.fixture
def pair(
    sandbox_factory: Callable[..., Sandbox], relay_factory: Callable[..., Relay]
) -> tuple[Sandbox, Relay, Sandbox]:
    """A reference sandbox (the API the clients knew), and a relay proxying to another one."""
    reference = sandbox_factory()
    downstream = sandbox_factory()
    relay = relay_factory(downstream, sources=TRACK_SOURCE)
    return reference, relay, downstream


@pytest.mark.parametrize("path,body", [(p, b) for _, p, b in ROWS], ids=[r[0] for r in ROWS])
def test_validation_matches_the_api(
    pair: tuple[Sandbox, Relay, Sandbox], path: str, body: Any
) -> None:
    reference, relay, _ = pair
    content = _content(body)
    headers = {"content-type": "application/json"}
    api = httpx.post(
        f"{reference.base_url}/websites/1/{path}",
        content=content,
        headers={**headers, "authorization": f"Bearer {API_KEY}"},
    )
    ours = relay.client.post(
        f"{relay.url}/api/v1/websites/1/{path}",
        content=content,
        headers={**headers, "authorization": f"Bearer {INGEST_KEY}"},
    )
    assert ours.status_code == api.status_code, ours.text
    assert _comparable(ours.json()) == _comparable(api.json())


AUTH_ROWS = [
    ("no authorization", {}, 1),
    ("wrong key", {"authorization": "Bearer nope"}, 1),
    ("not bearer", {"authorization": f"Basic {INGEST_KEY}"}, 1),
    ("unknown website", {"authorization": "Bearer {key}"}, 999),
    ("website not a number", {"authorization": "Bearer {key}"}, "abc"),
]


@pytest.mark.parametrize(
    "headers,website", [(h, w) for _, h, w in AUTH_ROWS], ids=[r[0] for r in AUTH_ROWS]
)
def test_auth_and_website_match_the_api(
    pair: tuple[Sandbox, Relay, Sandbox], headers: dict[str, str], website: Any
) -> None:
    reference, relay, _ = pair
    for path in ("track", "track/batch"):
        api = httpx.post(
            f"{reference.base_url}/websites/{website}/{path}",
            json={"name": ""},  # invalid too: auth and website come first
            headers={k: v.format(key=API_KEY) for k, v in headers.items()},
        )
        ours = relay.client.post(
            f"{relay.url}/api/v1/websites/{website}/{path}",
            json={"name": ""},
            headers={k: v.format(key=INGEST_KEY) for k, v in headers.items()},
        )
        assert (ours.status_code, ours.json()) == (api.status_code, api.json())
    assert relay.rows()["webhooks"] == 0


def _post(relay: Relay, path: str, body: Any, **headers: str) -> httpx.Response:
    return relay.client.post(
        f"{relay.url}/api/v1/websites/1/{path}",
        json=body,
        headers={"authorization": f"Bearer {INGEST_KEY}", **headers},
    )


def test_accepted_events_are_stored_then_forwarded_unchanged(
    pair: tuple[Sandbox, Relay, Sandbox],
) -> None:
    _, relay, downstream = pair
    r = _post(relay, "track", ev(payload={"amount": 49.99, "paid": True}, visitor_id=V))
    assert r.status_code == 200 and r.json()["ok"] is True
    assert isinstance(r.json()["event_id"], int)
    b = _post(relay, "track/batch", {"events": [ev(), {"name": "signup", "url": "https://e"}]})
    assert b.json()["processed"] == 2 and len(set(b.json()["event_ids"])) == 2
    events = downstream.wait_for(3)
    assert len(events) == 3
    by_name = {e["name"]: e for e in events}
    assert by_name["signup"]["url"] == "https://e"
    first = next(e for e in events if e["payload"])
    assert first["payload"] == {"amount": "49.99", "paid": "true"}
    assert first["visitor_id"] == V


def test_websites_go_to_their_own_destination(pair: tuple[Sandbox, Relay, Sandbox]) -> None:
    _, relay, downstream = pair
    r = relay.client.post(
        f"{relay.url}/api/v1/websites/2/track",
        json=ev(),
        headers={"authorization": "Bearer rk_second_key"},
    )
    assert r.status_code == 200
    assert len(downstream.wait_for(1, website_id=2)) == 1
    assert downstream.events(1) == []
    # website 3 is the sandbox's but not the source's
    r3 = relay.client.post(
        f"{relay.url}/api/v1/websites/3/track",
        json=ev(),
        headers={"authorization": f"Bearer {INGEST_KEY}"},
    )
    assert r3.status_code == 404 and r3.json()["error"] == "website_not_found"


def test_the_real_api_key_stays_in_the_relay(pair: tuple[Sandbox, Relay, Sandbox]) -> None:
    _, relay, downstream = pair
    # The API key is not an ingest key of the relay's ...
    r = relay.client.post(
        f"{relay.url}/api/v1/websites/1/track",
        json=ev(),
        headers={"authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 401 and API_KEY not in r.text
    ok = _post(relay, "track", ev())
    assert API_KEY not in ok.text and INGEST_KEY not in ok.text
    downstream.wait_for(1)
    # ... and neither key is stored with the request.
    conn = sqlite3.connect(relay.db)
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert INGEST_KEY not in dump and API_KEY not in dump


def test_an_idempotency_key_makes_a_retry_a_duplicate(pair: tuple[Sandbox, Relay, Sandbox]) -> None:
    _, relay, downstream = pair
    body = {"events": [ev(payload={"order_id": "A"}), ev(payload={"order_id": "B"})]}
    first = _post(relay, "track/batch", body, **{"Idempotency-Key": "order-A-B"})
    again = _post(relay, "track/batch", body, **{"Idempotency-Key": "order-A-B"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    single = _post(relay, "track", ev(payload={"order_id": "C"}), **{"Idempotency-Key": "c"})
    assert (
        _post(relay, "track", ev(payload={"order_id": "C"}), **{"Idempotency-Key": "c"}).json()
        == single.json()
    )
    # Without the header, or with another key, a request is new.
    other = _post(relay, "track/batch", body, **{"Idempotency-Key": "other"})
    assert other.json()["event_ids"] != first.json()["event_ids"]
    _post(relay, "track", ev(payload={"order_id": "D"}))
    _post(relay, "track", ev(payload={"order_id": "D"}))
    downstream.wait_for(7)
    time.sleep(0.8)  # anything more on its way would have arrived
    orders = sorted(e["payload"]["order_id"] for e in downstream.events())
    assert orders == ["A", "A", "B", "B", "C", "D", "D"]


def test_a_bad_idempotency_key_is_a_validation_error(pair: tuple[Sandbox, Relay, Sandbox]) -> None:
    _, relay, _ = pair
    r = _post(relay, "track", ev(), **{"Idempotency-Key": "x" * 256})
    assert r.status_code == 400 and r.json()["error"] == "validation_error"
    assert relay.rows()["webhooks"] == 0


def test_webhooks_are_not_taken_on_a_track_source(pair: tuple[Sandbox, Relay, Sandbox]) -> None:
    _, relay, _ = pair
    r = relay.post("backend", b'{"events": []}', {"authorization": f"Bearer {INGEST_KEY}"})
    assert r.status_code == 401
    assert relay.rows()["webhooks"] == 0


def test_a_burst_of_1000_goes_as_40_full_batches_without_a_429(
    sandbox_factory: Callable[..., Sandbox], relay_factory: Callable[..., Relay]
) -> None:
    # The API's limit, over a 2 s window instead of 60 s (both sides: see the window seams).
    downstream = sandbox_factory(requests_per_minute=12, window=2.0)
    relay = relay_factory(
        downstream,
        sources=TRACK_SOURCE,
        track='requests_per_minute = 12\nflush_interval = "60s"',
        rate_window=2.0,
    )

    def send(i: int) -> int:
        with httpx.Client() as c:
            r = c.post(
                f"{relay.url}/api/v1/websites/1/track",
                json={"name": "reading", "payload": {"n": i}},
                headers={"authorization": f"Bearer {INGEST_KEY}"},
            )
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(1000)))
    assert statuses == [200] * 1000
    events = downstream.wait_for(1000, timeout=60)
    assert len(events) == 1000
    assert sorted(int(e["payload"]["n"]) for e in events) == list(range(1000))
    requests = downstream.requests()
    assert requests["by_status"] == {"200": 40}
    assert [r["events"] for r in requests["requests"]] == [25] * 40
    assert all(r["batch"] for r in requests["requests"])


def test_the_docs_source_and_mapping_work(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    """docs/track-proxy.md's source and mapping, as written."""
    import re

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "track-proxy.md").read_text(encoding="utf-8")
    source, mapping = re.findall(r"```toml\n(.*?)```", text, re.S)
    (tmp_path / "backend.toml").write_text(mapping)
    source = source.replace(
        '# mapping = "mappings/backend.toml"', f'mapping = "{tmp_path / "backend.toml"}"'
    )
    relay = relay_factory(sandbox, sources=source.replace("${RELAY_INGEST_KEY}", INGEST_KEY))
    r = _post(
        relay,
        "track/batch",
        {"events": [{"name": "signup", "payload": {"plan": "pro"}}, {"name": "other"}]},
    )
    assert r.status_code == 200 and r.json()["processed"] == 2
    time.sleep(1.0)
    [event] = sandbox.wait_for(1)
    assert event["name"] == "user_signed_up"
    assert event["payload"] == {"plan": "pro", "source": "backend"}


def test_relay_map_takes_a_track_request(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from relay.cli import main
    from tests.conftest import relay_toml

    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "r.db", sources=TRACK_SOURCE)
    )
    body = tmp_path / "batch.json"
    body.write_text(json.dumps({"events": [ev(payload={"n": 1}), {"name": "signup"}]}))
    result = CliRunner().invoke(main, ["map", "--config", str(config), "backend", str(body)])
    assert result.exit_code == 0, result.output
    tracks = [e["events"][0]["track"] for e in json.loads(result.output)]
    assert tracks == [{"name": "purchase", "payload": {"n": "1"}}, {"name": "signup"}]
    body.write_text(json.dumps({"name": ""}))
    bad = CliRunner().invoke(main, ["map", "--config", str(config), "backend", str(body)])
    assert bad.exit_code == 1 and "name is required" in bad.output
