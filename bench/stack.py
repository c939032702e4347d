"""Starting the parts under test on 127.0.0.1: `relay serve`, `relay sandbox`, the bare app.

Each benchmark gets fresh secrets, a fresh database and fresh ports. Secrets reach the relay
through the environment, as relay.toml recommends, never on a command line.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import PYTHON, REPO, Child, Procs, free_port, relay_command

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
    database: Path, port: int, track_port: int, requests_per_minute: int, workers: int = 1
) -> str:
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

[sources.stripe]
provider = "stripe"
secret = "${{BENCH_STRIPE_SECRET}}"
mapping = {json.dumps(str(MAPPING))}
"""


@dataclass
class Relay:
    child: Child
    port: int
    database: Path
    ready_seconds: float


def start_relay(
    procs: Procs,
    workdir: Path,
    name: str,
    keys: Secrets,
    track_port: int,
    requests_per_minute: int = 60,
    workers: int = 1,
) -> Relay:
    port = free_port()
    database = workdir / f"{name}.db"
    config = workdir / f"{name}.toml"
    config.write_text(relay_toml(database, port, track_port, requests_per_minute, workers))
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


def start_bare(procs: Procs, name: str = "bare") -> tuple[Child, int]:
    port = free_port()
    child = procs.start(name, [PYTHON, "-m", "bench.bare", "--port", str(port)], cwd=REPO)
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
    """What the relay's database holds, read after the relay stopped."""

    webhooks: int
    dedupe: int
    events: int
    distinct_event_keys: int
    mapped: int
    outbox: int
    outbox_by_state: dict[int, int]


def count_rows(database: Path) -> Counts:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)

    def one(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    try:
        by_state = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"))
        return Counts(
            webhooks=one("SELECT count(*) FROM webhooks"),
            dedupe=one("SELECT count(*) FROM dedupe"),
            events=one("SELECT count(*) FROM events"),
            distinct_event_keys=one("SELECT count(DISTINCT source || ' ' || key) FROM events"),
            mapped=one("SELECT count(*) FROM events WHERE outcome = 'mapped'"),
            outbox=one("SELECT count(*) FROM outbox"),
            outbox_by_state={int(k): int(v) for k, v in by_state.items()},
        )
    finally:
        conn.close()


def database_bytes(database: Path) -> tuple[int, int]:
    """(main file, WAL) sizes in bytes."""

    def size(p: Path) -> int:
        return p.stat().st_size if p.exists() else 0

    return size(database), size(database.with_name(database.name + "-wal"))
