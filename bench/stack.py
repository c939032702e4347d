"""Starting the parts under test on 127.0.0.1: `relay serve`, `relay sandbox`, the bare app
(one process or several on one port); and reading what the relay stored (Counts: its tables
webhooks, dedupe, unmapped and outbox, read-only).

Each benchmark gets fresh secrets, a fresh database and fresh ports. Secrets reach the relay
through the environment, as relay.toml recommends, never on a command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import sqlite3
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import PYTHON, REPO, Child, Procs, free_port, http_get, relay_command

MAPPING = REPO / "mappings" / "stripe.toml"


@dataclass
class Secrets:
    stripe: str
    api_key: str

    @classmethod
    def fresh(cls) -> Secrets:
        return cls("whsec_" + secrets.token_hex(16), "sk_bench_" + secrets.token_hex(16))

    def env(self) -> dict[str, str]:
        return {"BENCH_STRIPE_SECRET": self.stripe, "BENCH_TRACK_API_KEY": self.api_key}


def relay_toml(
    database: Path,
    port: int,
    track_port: int,
    requests_per_minute: int,
    workers: int = 1,
    flush_interval: str | None = None,
    extra_sources: str = "",
) -> str:
    """The bench's relay.toml; `flush_interval` (e.g. "50ms") is left out when None, so the
    relay's default (5s) holds. `extra_sources`: more [sources.NAME] tables (TOML)."""
    flush = f"flush_interval = {json.dumps(flush_interval)}\n" if flush_interval else ""
    return f"""\
[relay]
database = {json.dumps(str(database))}
host = "127.0.0.1"
port = {port}
workers = {workers}

[track]
base_url = "http://127.0.0.1:{track_port}/api/v1"
api_key = "${{BENCH_TRACK_API_KEY}}"
website_id = 1
requests_per_minute = {requests_per_minute}
max_backoff = "2s"
{flush}
[sources.stripe]
provider = "stripe"
secret = "${{BENCH_STRIPE_SECRET}}"
mapping = {json.dumps(str(MAPPING))}
{extra_sources}"""


@dataclass
class Relay:
    child: Child
    port: int
    database: Path
    ready_seconds: float

    @property
    def config(self) -> Path:
        return self.database.with_suffix(".toml")


def start_relay(
    procs: Procs,
    workdir: Path,
    name: str,
    keys: Secrets,
    track_port: int,
    requests_per_minute: int = 60,
    workers: int = 1,
    flush_interval: str | None = None,
    extra_sources: str = "",
) -> Relay:
    port = free_port()
    database = workdir / f"{name}.db"
    config = workdir / f"{name}.toml"
    config.write_text(
        relay_toml(
            database, port, track_port, requests_per_minute, workers, flush_interval, extra_sources
        )
    )
    child = procs.start(
        name, [*relay_command(), "serve", "--config", str(config)], cwd=REPO, env=keys.env()
    )
    ready = child.wait_http(port, "/healthz")
    return Relay(child, port, database, ready)


@dataclass
class Sandbox:
    child: Child
    port: int
    api_key: str

    def get(self, path: str, auth: bool = False) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def stored_events(self) -> int:
        return int(self.get("/api/v1/websites/1/events?limit=1", auth=True)["total"])

    def requests(self) -> dict[str, Any]:
        data: dict[str, Any] = self.get("/_sandbox/requests")
        return data


def start_sandbox(
    procs: Procs,
    workdir: Path,
    name: str,
    keys: Secrets,
    requests_per_minute: int,
    port: int | None = None,
) -> Sandbox:
    port = port or free_port()
    child = procs.start(
        name,
        [
            *relay_command(),
            "sandbox",
            "--port",
            str(port),
            "--api-key",
            keys.api_key,
            "--website-id",
            "1",
            "--requests-per-minute",
            str(requests_per_minute),
            "--database",
            str(workdir / f"{name}.db"),
        ],
        cwd=REPO,
    )
    child.wait_http(port, "/_sandbox/requests")
    return Sandbox(child, port, keys.api_key)


def start_bare(procs: Procs, name: str = "bare", processes: int = 1) -> tuple[Child, int]:
    """The bare app (bench/bare.py); with `processes` > 1, that many uvicorn processes on one
    port, as `relay serve` runs its workers. Returns once every process answers."""
    port = free_port()
    child = procs.start(
        name,
        [PYTHON, "-m", "bench.bare", "--port", str(port), "--processes", str(processes)],
        cwd=REPO,
    )
    child.wait_http(port, "/healthz")
    deadline = time.perf_counter() + 20
    pids: set[int] = set()
    while len(pids) < processes:  # each connection lands on one process's socket
        if not child.alive() or time.perf_counter() > deadline:
            raise RuntimeError(
                f"{name}: {len(pids)} of {processes} processes answered:\n{child.tail()}"
            )
        with contextlib.suppress(OSError, ValueError, KeyError):
            status, body = http_get(port, "/healthz")
            if status == 200:
                pids.add(int(json.loads(body)["pid"]))
    return child, port


def start_floor(procs: Procs, workdir: Path, keys: Secrets) -> tuple[Child, int]:
    """The durable-ack floor (bench/floor.py) on a database of its own."""
    port = free_port()
    database = workdir / "floor.db"
    child = procs.start(
        "floor",
        [PYTHON, "-m", "bench.floor", "--port", str(port), "--database", str(database)],
        cwd=REPO,
        env=keys.env(),
    )
    child.wait_http(port, "/healthz")
    return child, port


@dataclass(frozen=True)
class Commits:
    """The relay's relay_store_commit_seconds histogram: how long its fsyncs took."""

    count: int
    buckets: list[tuple[float, int]]  # (upper bound in seconds, cumulative count)

    def over(self, seconds: float) -> int:
        """Commits that took longer than `seconds` (a bucket bound)."""
        within = next((n for le, n in self.buckets if le == seconds), None)
        if within is None:
            raise ValueError(f"{seconds} s is not a bucket bound")
        return self.count - within

    def slowest(self) -> str:
        """The bucket of the slowest commit, as "0.5-1 s"."""
        previous = 0.0
        for le, n in self.buckets:
            if n == self.count:
                return f"{previous:g}-{le:g} s"
            previous = le
        return f"over {previous:g} s"


def commit_histogram(port: int) -> Commits:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    count = 0
    buckets: list[tuple[float, int]] = []
    for family in text_string_to_metric_families(text):
        if family.name != "relay_store_commit_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                buckets.append((float(sample.labels["le"]), int(sample.value)))
    return Commits(count, sorted(buckets))


@dataclass(frozen=True)
class Counts:
    """What the relay's database holds (read after the relay stopped, or once `unmapped` is 0).

    The acknowledgement stores a webhook and its dedupe keys; the mapper then makes its outbox
    rows and takes it out of `unmapped`. Each bench webhook carries one event that the Stripe
    mapping turns into one track event, so "every event stored once" is: as many dedupe keys
    as webhooks, as outbox rows, as distinct outbox event keys; every outbox row has a body
    (mapped, not failed) and comes from a dedupe key of its own webhook; nothing unmapped.
    """

    webhooks: int
    dedupe: int
    unmapped: int
    outbox: int
    distinct_event_keys: int  # distinct event_key among the outbox rows
    mapped: int  # outbox rows with a track event (body not NULL)
    linked: int  # outbox rows whose (webhook_id, event_key) is a dedupe row
    outbox_by_state: dict[int, int]

    @property
    def events(self) -> int:
        """Events taken: the dedupe keys stored."""
        return self.dedupe

    @property
    def stored_once(self) -> bool:
        return (
            self.dedupe
            == self.webhooks
            == self.outbox
            == self.distinct_event_keys
            == self.mapped
            == self.linked
            and self.unmapped == 0
        )

    def describe(self) -> str:
        return (
            f"webhooks {self.webhooks:,}, dedupe keys {self.dedupe:,}, unmapped "
            f"{self.unmapped:,}, outbox {self.outbox:,} ({self.distinct_event_keys:,} distinct "
            f"event keys, {self.mapped:,} mapped, {self.linked:,} linked to their key), by "
            f"state {self.outbox_by_state}"
        )


def _read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)


def count_rows(database: Path) -> Counts:
    conn = _read_only(database)

    def one(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    try:
        conn.execute("BEGIN")  # one snapshot for every count
        by_state = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"))
        return Counts(
            webhooks=one("SELECT count(*) FROM webhooks"),
            dedupe=one("SELECT count(*) FROM dedupe"),
            unmapped=one("SELECT count(*) FROM unmapped"),
            outbox=one("SELECT count(*) FROM outbox"),
            distinct_event_keys=one("SELECT count(DISTINCT event_key) FROM outbox"),
            mapped=one("SELECT count(*) FROM outbox WHERE body IS NOT NULL"),
            linked=one(
                "SELECT count(*) FROM outbox o JOIN dedupe d "
                "ON d.webhook_id = o.webhook_id AND d.key = o.event_key"
            ),
            outbox_by_state={int(k): int(v) for k, v in by_state.items()},
        )
    finally:
        conn.close()


def unmapped(database: Path) -> int:
    """Webhooks acknowledged but not mapped yet (the relay may still be running)."""
    conn = _read_only(database)
    try:
        return int(conn.execute("SELECT count(*) FROM unmapped").fetchone()[0])
    finally:
        conn.close()


def wait_mapped(database: Path, timeout: float = 30.0) -> tuple[int, float]:
    """Poll until the running relay has mapped every acknowledged webhook, or `timeout`.
    (webhooks unmapped when called, seconds it took until none were); the seconds are
    math.inf when some were still unmapped at the timeout."""
    started = time.perf_counter()
    first = left = unmapped(database)
    while left:
        if time.perf_counter() - started > timeout:
            return first, math.inf
        time.sleep(0.02)
        left = unmapped(database)
    return first, time.perf_counter() - started


def database_bytes(database: Path) -> tuple[int, int]:
    """(main file, WAL) sizes in bytes."""

    def size(p: Path) -> int:
        return p.stat().st_size if p.exists() else 0

    return size(database), size(database.with_name(database.name + "-wal"))
