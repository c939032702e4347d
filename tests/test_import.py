"""`relay import`: rows of a CSV or JSON-lines file as events of an import source."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay import importing
from relay.cli import main
from relay.config import load_config
from relay.storage import Incoming, open_store, run_with
from tests.conftest import Relay, Sandbox, relay_toml

MAPPING = """
[[events]]
on = "*"
if = "status != 'cancelled'"
name = "offline_purchase"
[events.payload]
order_id = "{{ order_id }}"
amount = "{{ amount }}"
store = "{{ store }}"
"""

SOURCE = """
[sources.orders]
provider = "import"
id_column = "order_id"
mapping = "orders.toml"
"""


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    (tmp_path / "orders.toml").write_text(MAPPING)
    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "relay.db", sources=SOURCE)
    )
    return config


def relay_import(config: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["import", "--config", str(config), *args], env=env)


def outbox(config: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(config.parent / "relay.db")
    try:
        rows = conn.execute("SELECT event_key, body FROM outbox ORDER BY id").fetchall()
    finally:
        conn.close()
    return [{"key": k, **json.loads(b)} for k, b in rows]


def test_csv_rows_become_events_with_standard_quoting(setup: Path, tmp_path: Path) -> None:
    f = tmp_path / "orders.csv"
    f.write_text(
        "order_id,amount,store,status\n"
        'A1,20.25,"Main St, 5",paid\n'
        'A2,10,"two\nlines",paid\n'
        'A3,7,"say ""hi""",paid\n'
        "A4,1,x,cancelled\n",
        encoding="utf-8",
    )
    result = relay_import(setup, "orders", str(f))
    assert result.exit_code == 0, result.output
    assert "4 rows read, 4 taken, 3 events queued" in result.output
    events = outbox(setup)
    assert [e["payload"] for e in events] == [
        {"order_id": "A1", "amount": "20.25", "store": "Main St, 5"},
        {"order_id": "A2", "amount": "10", "store": "two\nlines"},
        {"order_id": "A3", "amount": "7", "store": 'say "hi"'},
    ]
    assert [e["key"] for e in events] == ["A1", "A2", "A3"]


def test_importing_a_file_again_queues_nothing(setup: Path, tmp_path: Path) -> None:
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\nA1,1,x\nA2,2,y\n")
    assert relay_import(setup, "orders", str(f)).exit_code == 0
    again = relay_import(setup, "orders", str(f))
    assert again.exit_code == 0, again.output
    assert "2 rows read, 0 taken, 0 events queued, 2 imported before" in again.output
    assert len(outbox(setup)) == 2
    # A grown file: only the new rows are taken.
    f.write_text("order_id,amount,store\nA1,1,x\nA2,2,y\nA3,3,z\n")
    assert "1 taken" in relay_import(setup, "orders", str(f)).output
    assert [e["key"] for e in outbox(setup)] == ["A1", "A2", "A3"]


def test_without_id_column_a_row_is_its_own_id(tmp_path: Path) -> None:
    (tmp_path / "orders.toml").write_text(MAPPING)
    config = tmp_path / "relay.toml"
    source = SOURCE.replace('id_column = "order_id"\n', "")
    config.write_text(
        relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "relay.db", sources=source)
    )
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\nA1,1,x\nA1,1,x\nA1,2,x\n")
    result = relay_import(config, "orders", str(f))
    assert "3 rows read, 2 taken" in result.output and "1 imported before" in result.output
    assert len(outbox(config)) == 2


def test_bad_rows_are_named_by_line_and_the_others_go_on(setup: Path, tmp_path: Path) -> None:
    f = tmp_path / "orders.csv"
    f.write_text(
        "order_id,amount,store\n"  # line 1
        'A1,1,"a\nb"\n'  # lines 2-3
        ",5,x\n"  # line 4: no id
        "A2,1\n"  # line 5: too few fields
        "\n"  # line 6: blank, skipped
        "A3,1,x,extra\n"  # line 7: too many
        "A4,{{,x\n"  # line 8: fine (a value is data, not a template)
    )
    result = relay_import(setup, "orders", str(f))
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if ": line " in x]
    assert lines == [
        f"{f}: line 4: no value in the id column 'order_id'",
        f"{f}: line 5: 2 fields, the header has 3",
        f"{f}: line 7: 4 fields, the header has 3",
    ]
    assert "5 rows read, 2 taken, 2 events queued, 3 refused" in result.output
    assert [e["key"] for e in outbox(setup)] == ["A1", "A4"]


def test_jsonl_numbers_become_strings_as_the_api_casts_them(setup: Path, tmp_path: Path) -> None:
    f = tmp_path / "orders.jsonl"
    f.write_text(
        '{"order_id": "J1", "amount": 20.25, "store": true}\n'
        '{"order_id": 2, "amount": 3.0, "store": null}\n'
        "\n"
        '{"order_id": "J3", "amount": {"v": 1}}\n'
        "[1, 2]\n"
        '{"order_id": "J5", "amount": NaN}\n'
        "{oops\n"
    )
    result = relay_import(setup, "orders", str(f))
    assert result.exit_code == 1
    assert f"{f}: line 4: field 'amount' holds an object or array (rows are flat)" in result.output
    assert f"{f}: line 5: not a JSON object" in result.output
    assert f"{f}: line 6: not JSON" in result.output
    assert f"{f}: line 7: not JSON" in result.output
    assert [e["payload"] for e in outbox(setup)] == [
        {"order_id": "J1", "amount": "20.25", "store": "true"},
        {"order_id": "2", "amount": "3"},
    ]


def test_a_mapping_failure_refuses_the_row(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "orders.toml").write_text(MAPPING.replace("{{ amount }}", "{{ amount | cents }}"))
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\nA1,1250,x\nA2,lots,y\n")
    result = relay_import(setup, "orders", str(f))
    assert result.exit_code == 1
    assert f"{f}: line 3: mapping failed: events[0]" in result.output
    assert [e["payload"]["amount"] for e in outbox(setup)] == ["12.50"]  # type: ignore[index]


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuch", "{dir}/orders.csv"], "no source named 'nosuch'"),
        (["orders", "{dir}/missing.csv"], "{dir}/missing.csv: no such file"),
        (["orders", "{dir}/orders.txt"], "{dir}/orders.txt: cannot tell the format"),
        (["orders", "{dir}/dup.csv"], "{dir}/dup.csv: line 1: column 'a' appears twice"),
        (["orders", "{dir}/empty.csv"], "{dir}/empty.csv: line 1: no header"),
        (["stripe", "{dir}/orders.csv"], "source 'stripe' has provider 'stripe'"),
    ],
)
def test_an_unusable_file_or_source_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    from tests.conftest import MAPPINGS, STRIPE_SECRET

    (tmp_path / "orders.toml").write_text(MAPPING)
    stripe = (
        f'[sources.stripe]\nprovider = "stripe"\nsecret = "{STRIPE_SECRET}"\n'
        f'mapping = "{MAPPINGS / "stripe.toml"}"\n'
    )
    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "relay.db", sources=SOURCE + stripe)
    )
    (tmp_path / "orders.csv").write_text("order_id\nA1\n")
    (tmp_path / "orders.txt").write_text("order_id\nA1\n")
    (tmp_path / "dup.csv").write_text("a,b,a\n1,2,3\n")
    (tmp_path / "empty.csv").write_text("")
    result = relay_import(config, *[a.format(dir=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay import: ")
    assert message.format(dir=tmp_path) in lines[0]
    assert "Traceback" not in result.output


def test_format_option_and_relay_config(setup: Path, tmp_path: Path) -> None:
    f = tmp_path / "orders.txt"
    f.write_text('{"order_id": "J1", "amount": 1}\n')
    result = relay_import(setup, "orders", str(f), "--format", "jsonl")
    assert result.exit_code == 0, result.output
    g = tmp_path / "more.txt"
    g.write_text("order_id,amount,store\nC1,1,x\n")
    result = CliRunner().invoke(
        main, ["import", "--format", "csv", "orders", str(g)], env={"RELAY_CONFIG": str(setup)}
    )
    assert result.exit_code == 0, result.output
    assert len(outbox(setup)) == 2


def test_progress_plain_lines_and_a_bar(
    setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\n" + "".join(f"A{i},1,x\n" for i in range(3000)))
    monkeypatch.setattr(importing, "PLAIN_EVERY", 0.0)
    plain = relay_import(setup, "orders", str(f))
    assert plain.exit_code == 0
    progress = [x for x in plain.output.splitlines() if "rows read (" in x]
    assert progress and "rows/s" in progress[-1] and "s left" in progress[-1]
    assert "\r" not in plain.output
    f.write_text("order_id,amount,store\n" + "".join(f"B{i},1,x\n" for i in range(3000)))
    bar = relay_import(setup, "orders", str(f), "--progress")
    assert bar.exit_code == 0
    assert "\r" in bar.output and "rows/s" in bar.output and "100%" in bar.output


def test_a_chunk_stored_but_not_mapped_is_mapped_by_the_next_import(
    setup: Path, tmp_path: Path
) -> None:
    """What a crash between a chunk's two writes leaves behind."""
    from relay.providers.importer import stored_body

    config = load_config(setup)
    rows = [("A1", 2, {"order_id": "A1", "amount": "1", "store": "x"})]
    item = Incoming("orders", time.time(), "application/json", "{}", stored_body(rows), ["A1"], 0.0)

    async def store_chunk(store):  # type: ignore[no-untyped-def]
        await store.import_rows(item)

    run_with(open_store(config.relay.database), store_chunk)
    assert outbox(setup) == []
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\nA1,1,x\nA2,2,y\n")
    result = relay_import(setup, "orders", str(f))
    assert result.exit_code == 0, result.output
    assert sorted(e["key"] for e in outbox(setup)) == ["A1", "A2"]  # type: ignore[type-var]


@pytest.mark.slow
def test_an_interrupted_import_run_again_finishes_without_duplicates(
    setup: Path, tmp_path: Path
) -> None:
    n = 200_000
    f = tmp_path / "orders.csv"
    with f.open("w") as out:
        out.write("order_id,amount,store\n")
        for i in range(n):
            out.write(f"O{i},{i % 97}.5,store {i % 13}\n")
    cmd = [sys.executable, "-m", "relay", "import", "--config", str(setup), "orders", str(f)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until some rows are in
        time.sleep(0.2)
        db = tmp_path / "relay.db"
        if db.exists():
            try:
                conn = sqlite3.connect(db)
                count = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                continue
            if count >= 20_000:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(outbox(setup))
    assert 0 < first < n
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = [e["key"] for e in outbox(setup)]
    assert len(keys) == n and len(set(keys)) == n


def test_rows_are_forwarded_by_a_serving_relay(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    """`relay import` beside `relay serve` on one database: the server forwards the rows."""
    relay = relay_factory(
        sandbox, sources=SOURCE.replace("orders.toml", str(tmp_path / "orders.toml")), start=False
    )
    (tmp_path / "orders.toml").write_text(MAPPING)
    relay.start()
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,store\n" + "".join(f"A{i},{i}.25,x\n" for i in range(60)))
    env = {**os.environ}
    result = relay_import(relay.config_path, "orders", str(f), env=env)
    assert result.exit_code == 0, result.output
    events = sandbox.wait_for(60, timeout=15)
    assert sorted(e["payload"]["order_id"] for e in events) == sorted(f"A{i}" for i in range(60))
    time.sleep(1.0)
    assert len(sandbox.events()) == 60


def _toml_blocks(doc: Path) -> list[str]:
    import re

    return re.findall(r"```toml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)


def test_the_docs_config_and_mapping_work(tmp_path: Path) -> None:
    """docs/import.md's source and mapping, as written, import a file."""
    from tests.conftest import ROOT

    source, mapping = _toml_blocks(ROOT / "docs" / "import.md")
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "orders.toml").write_text(mapping)
    config = tmp_path / "relay.toml"
    config.write_text(
        relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "relay.db", sources=source)
    )
    f = tmp_path / "orders.csv"
    f.write_text("order_id,amount,status\nP1,9.50,paid\nP2,3,cancelled\n")
    result = relay_import(config, "orders", str(f))
    assert result.exit_code == 0, result.output
    [event] = outbox(config)
    assert event["payload"] == {"order_id": "P1", "amount": "9.50", "channel": "phone"}


def test_relay_map_takes_a_row(setup: Path, tmp_path: Path) -> None:
    row = tmp_path / "row.json"
    row.write_text('{"order_id": "A1", "amount": 20.25, "store": "x", "status": "paid"}')
    result = CliRunner().invoke(main, ["map", "--config", str(setup), "orders", str(row)])
    assert result.exit_code == 0, result.output
    [event] = json.loads(result.output)
    assert event["events"][0]["track"]["payload"] == {
        "order_id": "A1",
        "amount": "20.25",
        "store": "x",
    }
