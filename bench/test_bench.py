"""Checks of the benchmark's own parts: `python -m pytest bench -q` (a few seconds).

The figures are only worth something if the requests are what they claim to be (distinct,
~1 KB, correctly signed), the wrk script counts what it says, the database counts read the
relay's schema as it is, the bare app runs as many processes as asked, the paced client keeps
its pace, and the pass/fail arithmetic is right; these tests hold each of those.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from bench import client, forward, ingest, stack, webhooks
from bench.procs import Procs, http_get
from bench.report import Row, render
from bench.stack import Commits, Counts, start_bare
from relay.config import Secret
from relay.errors import InvalidSignature
from relay.providers.base import WebhookRequest
from relay.providers.stripe import StripeProvider
from relay.storage.sqlite_schema import migrate

SECRET = "whsec_" + "ab" * 16
# 100 commits: 90 within 10 ms, 6 more within 25 ms, 3 within 100 ms, the slowest in 0.25-0.5 s
COMMITS = Commits(
    100, [(0.005, 60), (0.01, 90), (0.025, 96), (0.05, 98), (0.1, 99), (0.25, 99), (0.5, 100)]
)


def _split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def test_requests_are_distinct_1kb_and_verify_with_the_relays_stripe_provider() -> None:
    requests = webhooks.make(50, 8000, SECRET)
    provider = StripeProvider((Secret(SECRET),))
    ids = set()
    for raw in requests:
        line, headers, body = _split(raw)
        assert line == "POST /webhooks/stripe HTTP/1.1"
        assert int(headers["content-length"]) == len(body) == webhooks.BODY_BYTES
        wr = WebhookRequest(
            "POST", "http://127.0.0.1:8000/webhooks/stripe", headers, body, time.time()
        )
        provider.verify(wr)
        event = json.loads(body)
        assert event["type"] == "checkout.session.completed"
        assert event["data"]["object"]["payment_status"] == "paid"  # the mapping emits one
        ids.add(event["id"])
    assert len(ids) == 50


def test_a_request_signed_with_another_secret_does_not_verify() -> None:
    _, headers, body = _split(webhooks.make(1, 8000, "whsec_other")[0])
    wr = WebhookRequest("POST", "http://x/webhooks/stripe", headers, body, time.time())
    with pytest.raises(InvalidSignature):
        StripeProvider((Secret(SECRET),)).verify(wr)


def test_files_split_distinct_requests_between_threads(tmp_path: Path) -> None:
    files = webhooks.write_files(tmp_path / "r", 2, 101, 8000, SECRET)
    shares = [list(webhooks.read_file(f)) for f in files]
    assert [len(s) for s in shares] == [51, 51]
    ids = [webhooks.event_id(raw) for share in shares for raw in share]
    assert len(set(ids)) == len(ids)


def test_make_parallel_gives_the_count_asked() -> None:
    requests = webhooks.make_parallel(7, 8000, SECRET, workers=2)
    assert len({webhooks.event_id(r) for r in requests}) == 7


def _record(batches: list[tuple[float, int, int]]) -> dict[str, Any]:
    requests = [{"at": at, "status": status, "events": events} for at, status, events in batches]
    by_status: dict[str, int] = {}
    for r in requests:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    return {"total": len(requests), "by_status": by_status, "requests": requests}


def test_forward_window_counts_whole_minutes_from_the_first_accepted_batch() -> None:
    # 10 batches at once (the window's quota), then one more a minute later, then a partial.
    batches = [(1000.0 + i * 0.1, 200, 25) for i in range(10)]
    batches += [(1060.2, 200, 25), (1061.0, 200, 7), (999.0, 503, 25)]
    m = forward.measure(_record(batches))
    assert m["minutes"] == 1
    assert m["batches"] == 10
    assert m["per_minute"] == 250
    assert m["mean_batch"] == 25
    assert m["mean_batch_all"] == pytest.approx((11 * 25 + 7) / 12)


def test_forward_window_shows_a_slow_drain() -> None:
    # One batch every 10 s: 6 in the first minute, well under a quota of 10.
    batches = [(1000.0 + i * 10, 200, 25) for i in range(14)]
    rows = forward.rows(_record(batches), 350, 350, _counts(350, delivered=350), 10, 250)
    assert rows[0].ok is False
    assert "150 of 250" in rows[0].value


def test_forward_refuses_a_backlog_shorter_than_a_minute() -> None:
    with pytest.raises(SystemExit):
        forward.check_options(events=1500, rpm=60, speedup=1)
    assert forward.check_options(events=20_000, rpm=60, speedup=10) == 600


def _counts(
    n: int,
    delivered: int = 0,
    outbox: int | None = None,
    unmapped: int = 0,
    keys: int | None = None,
) -> Counts:
    rows = n if outbox is None else outbox
    return Counts(
        webhooks=n,
        dedupe=n,
        unmapped=unmapped,
        outbox=rows,
        distinct_event_keys=rows if keys is None else keys,
        mapped=rows,
        linked=rows,
        outbox_by_state={2: delivered, 0: rows - delivered},
    )


def _wrk(
    answered: int,
    issued: int,
    accepted: int,
    rps: float = 1000.0,
    p99: float = 20.0,
    statuses: dict[str, int] | None = None,
    duplicates: int = 0,
    repeats: int = 0,
    cpu: float | None = 5.0,
) -> ingest.WrkResult:
    raw = {
        "requests": answered,
        "issued": issued,
        "accepted": accepted,
        "duplicates": duplicates,
        "repeats": repeats,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "by_status": statuses if statuses is not None else {"200": answered},
        "latency_us": {"max": 90_000},
    }
    return ingest.WrkResult(rps, 5.0, p99, raw, cpu, 0.5, 5.0)


def _by_measure(rows: list[Row]) -> dict[str, Row]:
    return {r.measure: r for r in rows}


def test_ingest_passes_when_every_answer_was_stored_once() -> None:
    bare = _wrk(10_000, 10_064, 0, rps=2000)
    relay = _wrk(1000, 1064, 1000, rps=1000)
    rows = _by_measure(ingest.rows(bare, bare, [ingest.RelayRun(1, relay, _counts(1030), COMMITS)]))
    assert rows["relay / bare requests/s"].ok is True
    assert rows["relay answers"].ok is True
    assert rows["relay events stored once"].ok is True
    commits = rows["relay commits (fsync) over 25 / 100 ms"]
    assert (commits.value, commits.ok) == ("4 / 1 of 100, slowest 0.25-0.5 s", None)


@pytest.mark.parametrize(
    "counts",
    [
        _counts(999),  # an accepted event is missing
        _counts(1065),  # more stored than were ever sent
        _counts(1000, outbox=1001),  # an event queued twice
        _counts(1000, outbox=1001, keys=1000),  # one event key with two outbox rows
        _counts(1000, unmapped=1),  # one webhook acknowledged and never mapped
    ],
)
def test_ingest_fails_when_storage_does_not_match_the_answers(counts: Counts) -> None:
    relay = _wrk(1000, 1064, 1000)
    rows = _by_measure(ingest.rows(relay, relay, [ingest.RelayRun(1, relay, counts, COMMITS)]))
    assert rows["relay events stored once"].ok is False


def test_ingest_fails_on_any_answer_but_200_and_on_slow_p99() -> None:
    relay = _wrk(1000, 1064, 999, p99=26.0, statuses={"200": 999, "503": 1})
    rows = _by_measure(
        ingest.rows(relay, relay, [ingest.RelayRun(1, relay, _counts(999), COMMITS)])
    )
    assert rows["relay answers"].ok is False
    assert rows["relay p50 / p99 / max latency"].ok is False


def test_ingest_shows_cpu_per_webhook_and_compares_n_workers_with_n_bare_processes() -> None:
    bare = _wrk(10_000, 10_064, 0, rps=2000, cpu=0.5)  # 50 µs a request
    multi = _wrk(20_000, 20_064, 0, rps=4000, cpu=0.8)  # 40 µs
    one = ingest.RelayRun(1, _wrk(1000, 1064, 1000, rps=1500), _counts(1030), COMMITS, 0.12)
    two = ingest.RelayRun(2, _wrk(1000, 1064, 1000), _counts(1030), COMMITS, 0.26, 3, 0.01)
    rows = _by_measure(ingest.rows(bare, bare, [one, two], {2: multi}))
    cpu = rows["bare CPU per webhook (before / after)"]
    assert (cpu.value, cpu.target, cpu.ok) == ("50 µs / 50 µs", "aim <= 130 µs", None)
    assert rows["bare 2 processes CPU per webhook"].value == "40 µs"
    assert rows["bare 2 processes requests/s"].value == "4,000"
    assert rows["relay CPU per webhook (mapping included)"].value.startswith("120 µs")
    two_cpu = rows["relay, 2 workers CPU per webhook (mapping included)"]
    assert two_cpu.value == "260 µs (3 unmapped at the stop, mapped 0.01 s later)"
    assert rows["relay, 2 workers / bare requests/s"].value == "0.50"
    versus = rows["relay, 2 workers / bare 2 processes requests/s"]
    assert (versus.value, versus.ok) == ("0.25", False)
    assert "relay / bare 1 processes requests/s" not in rows
    assert not [m for m in rows if m.startswith("relay / bare ") and "process" in m]


def _relay_database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    return conn


def _store_webhook(conn: sqlite3.Connection, n: int, mapped: bool, key: str | None = None) -> None:
    conn.execute(
        "INSERT INTO webhooks (id, source, received_at, content_type, headers, body) "
        "VALUES (?, 'stripe', 1.0, 'application/json', '{}', x'7b7d')",
        (n,),
    )
    conn.execute(
        "INSERT INTO dedupe (source, key, seen_at, webhook_id) VALUES ('stripe', ?, 1.0, ?)",
        (f"evt_{n}", n),
    )
    if mapped:
        conn.execute(
            "INSERT INTO outbox (destination, webhook_id, event_key, event_type, rule, body, "
            "created_at) VALUES ('k/1', ?, ?, 'checkout.session.completed', 0, '{}', 1.0)",
            (n, key or f"evt_{n}"),
        )
    else:
        conn.execute("INSERT INTO unmapped (webhook_id, keys) VALUES (?, NULL)", (n,))


def test_count_rows_reads_the_relays_schema(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    conn = _relay_database(db)
    for n in (1, 2):
        _store_webhook(conn, n, mapped=True)
    _store_webhook(conn, 3, mapped=False)  # acknowledged, not mapped yet
    counts = stack.count_rows(db)
    assert (counts.webhooks, counts.dedupe, counts.unmapped, counts.outbox) == (3, 3, 1, 2)
    assert counts.outbox_by_state == {0: 2}
    assert not counts.stored_once
    assert stack.unmapped(db) == 1
    assert stack.wait_mapped(db, timeout=0.1)[0] == 1

    conn.execute("DELETE FROM unmapped")  # the mapper's round
    conn.execute(
        "INSERT INTO outbox (destination, webhook_id, event_key, event_type, rule, body, "
        "created_at) VALUES ('k/1', 3, 'evt_3', 'checkout.session.completed', 0, '{}', 1.0)"
    )
    counts = stack.count_rows(db)
    assert counts.stored_once and counts.events == 3
    left, seconds = stack.wait_mapped(db, timeout=0.1)
    assert left == 0 and seconds < 0.05

    _store_webhook(conn, 4, mapped=True, key="evt_other")  # a row not from its own key
    counts = stack.count_rows(db)
    assert (counts.outbox, counts.linked) == (4, 3)
    assert not counts.stored_once
    conn.close()


def test_relay_toml_sets_flush_interval_only_when_asked(tmp_path: Path) -> None:
    from relay.config import load_config

    env = stack.Secrets.fresh().env()
    for flush, seconds in ((None, 5.0), ("50ms", 0.05)):
        path = tmp_path / "relay.toml"
        path.write_text(stack.relay_toml(tmp_path / "r.db", 8000, 8001, 600, 2, flush))
        config = load_config(path, env)
        assert config.track.flush_interval == seconds
        assert (config.relay.workers, config.track.requests_per_minute) == (2, 600)


def test_bare_runs_the_processes_asked_and_stops_them(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        bare, port = start_bare(procs, processes=2)
        pids = {json.loads(http_get(port, "/healthz")[1])["pid"] for _ in range(30)}
        assert len(pids) == 2 and bare.pid not in pids
        assert procs.stop(bare) == 0
    time.sleep(0.2)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_post_paced_keeps_the_rate_and_times_each_answer(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        _, port = start_bare(procs)
        requests = webhooks.make(20, port, SECRET)
        started = time.time()
        answers = client.post_paced(port, requests, rate=100)
    assert [a.index for a in answers] == list(range(20))
    assert {a.status for a in answers} == {200}
    assert answers[-1].at - started >= 0.19  # the 20th went out 0.19 s after the first
    assert all(started <= a.at <= started + 2 for a in answers)


def test_latency_percentiles_and_row() -> None:
    delays = [i / 100 for i in range(1, 101)]  # 10 ms .. 1 s
    m = forward.Latency("5s", True, 50, 100, 100, delays, 100, True)
    assert (m.percentile(50), m.percentile(99), m.percentile(100)) == (0.5, 0.99, 1.0)
    row = forward.latency_row(m)
    assert row.value == "500 / 990 / 1,000 ms; 100 of 100 delivered"
    assert "flush_interval 5s default" in row.measure and row.ok is True
    lost = forward.latency_row(forward.Latency("50ms", False, 50, 100, 100, delays[:99], 99, False))
    assert lost.ok is False and "99 of 100 delivered" in lost.value


def test_commit_histogram_counts_the_slow_commits() -> None:
    assert (COMMITS.over(0.025), COMMITS.over(0.1), COMMITS.over(0.5)) == (4, 1, 0)
    assert COMMITS.slowest() == "0.25-0.5 s"
    assert Commits(3, [(0.001, 3), (0.01, 3)]).slowest() == "0-0.001 s"
    assert Commits(3, [(0.001, 1), (0.01, 2)]).slowest() == "over 0.01 s"
    with pytest.raises(ValueError):
        COMMITS.over(0.03)


def test_render_aligns_columns() -> None:
    text = render([Row("a", "m", "1", "t", True), Row("bench2", "measure", "22")])
    lines = text.splitlines()
    assert lines[0].split() == ["bench", "measure", "value", "target", "result"]
    assert lines[2].endswith("PASS")
    assert lines[3].rstrip() == lines[3] and not lines[3].endswith("PASS")
    assert lines[2].index("1") == lines[3].index("22")  # the value column starts together


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_wrk_script_sends_each_threads_own_requests_and_counts_statuses(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        bare, port = start_bare(procs)
        webhooks.write_files(tmp_path / "req", 2, 40, port, SECRET)
        result = ingest.run_wrk(port, tmp_path / "req", 1, bare.pid)
    raw = result.raw
    assert raw["loaded"] == 40
    assert result.answered > 40  # the bare side cycles through its 40
    assert raw["repeats"] == raw["issued"] - 40
    assert result.statuses == {"200": result.answered}
    assert result.all_200
    assert 0 < result.p50_ms <= result.p99_ms


def test_floor_stores_each_signed_webhook_once_and_refuses_a_bad_signature(
    tmp_path: Path,
) -> None:
    import httpx

    keys = stack.Secrets.fresh()
    good, other = webhooks.make(2, 8000, keys.stripe)
    with Procs(tmp_path) as procs:
        child, port = stack.start_floor(procs, tmp_path, keys)
        url = f"http://127.0.0.1:{port}/webhooks/stripe"
        answers = []
        for raw in (good, good, other):
            _, headers, body = _split(raw)
            answers.append(httpx.post(url, content=body, headers=headers).json())
        _, headers, body = _split(good)
        del headers["content-length"]
        tampered = httpx.post(url, content=body.replace(b"}", b" }", 1), headers=headers)
        procs.stop(child)
    assert [(a["accepted"], a["duplicates"]) for a in answers] == [(1, 0), (0, 1), (1, 0)]
    assert tampered.status_code == 401
    conn = sqlite3.connect(tmp_path / "floor.db")
    assert conn.execute("SELECT count(*) FROM dedupe").fetchone() == (2,)
    conn.close()


def test_ingest_rows_compare_the_relay_with_the_floor() -> None:
    bare = _wrk(10_000, 10_064, 0, rps=2000, cpu=0.5)
    floor = _wrk(10_000, 10_064, 0, rps=1000, cpu=0.5)
    one = ingest.RelayRun(1, _wrk(1000, 1064, 1000, rps=500), _counts(1030), COMMITS, 0.12)
    rows = _by_measure(ingest.rows(bare, bare, [one], None, floor))
    assert rows["floor requests/s (verify, parse, durable insert)"].value.startswith(
        "1,000, 0.50 x bare"
    )
    assert rows["relay / floor requests/s"].value == "0.50"
