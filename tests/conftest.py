"""Fixtures: the sandbox track API and the relay, both real servers on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import sandbox as sandbox_mod
from relay.app import create_app
from relay.config import Config, load_config
from relay.storage import Store, open_store, run_with
from tests.servers import ThreadedServer

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = ROOT / "mappings"
API_KEY = "sk_test_relay_0123456789abcdef"
STRIPE_SECRET = "whsec_test_e2e_secret"


class Sandbox:
    def __init__(self, server: ThreadedServer, api_keys: list[str]):
        self.server = server
        self.api_keys = api_keys

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/api/v1"

    def events(
        self, website_id: int = 1, limit: int = 10000, key: str | None = None
    ) -> list[dict[str, Any]]:
        r = httpx.get(
            f"{self.base_url}/websites/{website_id}/events",
            params={"limit": limit},
            headers={"authorization": f"Bearer {key or self.api_keys[0]}"},
        )
        r.raise_for_status()
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    def requests(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/_sandbox/requests").json()
        return data

    def fault(self, **spec: Any) -> None:
        httpx.post(f"{self.url}/_sandbox/faults", json=spec).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/faults").raise_for_status()

    def wait_for(self, n: int, website_id: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events(website_id)
            if len(events) >= n or time.monotonic() > deadline:
                return events
            time.sleep(0.1)


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    started: list[ThreadedServer] = []

    def make(
        api_keys: list[str] | None = None,
        website_ids: tuple[int, ...] = (1, 2, 3),
        requests_per_minute: int = 6000,
        **options: Any,
    ) -> Sandbox:
        keys = api_keys or [API_KEY]
        app = sandbox_mod.create_app(
            keys,
            website_ids,
            requests_per_minute,
            tmp_path / f"sandbox{len(started)}.db",
            **options,
        )
        server = ThreadedServer(app).start()
        started.append(server)
        return Sandbox(server, keys)

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_factory()


def _table(name: str, defaults: dict[str, Any], overrides: str) -> str:
    """A flat TOML table: defaults, then the keys of `overrides` (TOML text) on top."""
    import tomllib

    values = {**defaults, **tomllib.loads(overrides)}
    lines = [f"[{name}]"]
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def relay_toml(
    base_url: str,
    database: Path | str,
    *,
    sources: str | None = None,
    track: str = "",
    relay: str = "",
) -> str:
    stripe = f"""
[sources.stripe]
provider = "stripe"
secret = "{STRIPE_SECRET}"
mapping = "{MAPPINGS / "stripe.toml"}"
"""
    track_defaults = {
        "base_url": base_url,
        "api_key": API_KEY,
        "website_id": 1,
        "flush_interval": "300ms",
        "max_backoff": "2s",
    }
    return (
        _table("relay", {"database": str(database)}, relay)
        + _table("track", track_defaults, track)
        + (sources if sources is not None else stripe)
    )


TABLES = ("webhooks", "dedupe", "outbox")


def query(db: Path | str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one plain SQL query on the relay's database: a SQLite file, or a PostgreSQL
    URL (the tests' look inside; the relay itself goes through relay.storage only)."""
    if isinstance(db, str):
        import psycopg

        with psycopg.connect(db) as pg:
            return list(pg.execute(sql).fetchall())
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


def row_counts(db: Path | str, tables: tuple[str, ...] = TABLES) -> dict[str, int]:
    """How many rows each of the relay's tables holds (read from its database), once every
    stored webhook is mapped (the mapper works after the acknowledgement)."""
    wait_mapped(db)
    return {t: int(query(db, f"SELECT count(*) FROM {t}")[0][0]) for t in tables}


def wait_mapped(db: Path | str, timeout: float = 10.0) -> None:
    """Until the relay has mapped every webhook it stored (its unmapped set is empty)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        try:
            left = int(query(db, "SELECT count(*) FROM unmapped")[0][0])
        except sqlite3.OperationalError:  # no schema yet
            left = 0
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} stored webhooks still not mapped after {timeout} s")
        time.sleep(0.02)


class Relay:
    """The relay under uvicorn in a thread; `restart()` keeps its database."""

    def __init__(
        self, config_path: Path, housekeeping_interval: float = 30.0, rate_window: float = 60.0
    ):
        self.config_path = config_path
        self.housekeeping_interval = housekeeping_interval
        self.rate_window = rate_window
        self.server: ThreadedServer | None = None
        self.port: int | None = None
        self.client = httpx.Client(timeout=30)

    @property
    def config(self) -> Config:
        return self.app.state.relay.config  # type: ignore[no-any-return]

    def start(self) -> Relay:
        config = load_config(self.config_path)
        self.app = create_app(
            config,
            housekeeping_interval=self.housekeeping_interval,
            rate_window=self.rate_window,
        )
        self.server = ThreadedServer(self.app, self.port).start()
        self.port = self.server.port
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def post(self, source: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.client.post(f"{self.url}/webhooks/{source}", content=body, headers=headers)

    @property
    def runtime(self) -> Any:
        return self.app.state.relay

    @property
    def db(self) -> Path | str:
        """The SQLite file, or the PostgreSQL URL (see `query`)."""
        return self.config.relay.database

    def rows(self) -> dict[str, int]:
        return row_counts(self.db)


@pytest.fixture
def relay_backend(request: pytest.FixtureRequest) -> str:
    """The relay_factory's database: "sqlite" unless a test module parametrizes it, e.g.
    `pytestmark = pytest.mark.parametrize("relay_backend", BACKENDS, indirect=True)`."""
    return getattr(request, "param", "sqlite")


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture
def relay_factory(
    tmp_path: Path, relay_backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Relay]]:
    started: list[Relay] = []

    def make(
        sandbox: Sandbox,
        *,
        sources: str | None = None,
        track: str = "",
        relay: str = "",
        housekeeping_interval: float = 30.0,
        rate_window: float = 60.0,
        start: bool = True,
    ) -> Relay:
        path = tmp_path / f"relay{len(started)}.toml"
        database: Any = tmp_path / f"relay{len(started)}.db"
        if relay_backend == "postgres":  # a database of its own
            database = request.getfixturevalue("pg_server").create_database()
        path.write_text(
            relay_toml(
                sandbox.base_url,
                database,
                sources=sources,
                track=track,
                relay=relay,
            )
        )
        r = Relay(path, housekeeping_interval, rate_window)
        started.append(r)
        return r.start() if start else r

    yield make
    for r in started:
        r.stop()


def stripe_event(
    event_type: str = "checkout.session.completed", **overrides: Any
) -> dict[str, Any]:
    from relay.providers.stripe import sample_event

    event = sample_event(event_type)
    event.update(overrides)
    return event


def stripe_post(
    event: dict[str, Any], secret: str = STRIPE_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A body and headers signed the way Stripe signs them (with the stripe package)."""
    import stripe

    body = json.dumps(event).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=ts)
    return body, {"stripe-signature": header, "content-type": "application/json"}


def settled(sandbox: Sandbox, n: int) -> list[dict[str, Any]]:
    """The sandbox's events once `n` arrived and a little longer, so extras would show."""
    sandbox.wait_for(n, timeout=20)
    time.sleep(0.6)  # two flush intervals: anything more on its way would have arrived
    return sandbox.events()


def refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["ok"] is False and body["error"] == "invalid_signature"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server for the session (per xdist worker), stopped at the end; skips
    when the server binaries or psycopg are not installed."""
    from tests.pgserver import PGServer, binaries

    bindir = binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    server = PGServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a fresh, empty PostgreSQL database (with its password)."""
    url: str = pg_server.create_database()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A factory of stores on one fresh database of each backend (the storage tests)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return lambda: open_store(url)
    return lambda: open_store(tmp_path / "relay.db")


def run(make: Callable[[], Store], body: Callable[[Store], Awaitable[Any]]) -> Any:
    """`body` on a store fresh from `make`, opened and closed around it."""
    return run_with(make(), body)
