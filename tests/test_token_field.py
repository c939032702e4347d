"""A shared token carried in the body is a credential: never stored, shown or templated."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from click.testing import CliRunner

from relay.cli import main
from tests.conftest import Relay, Sandbox

TOKEN = "tok_BODYFIELD_5f4e3d2c1b0a99887766"

# Every rule tries to read the token, straight and through the whole event.
MAPPING = """
provider = "hmac"

[[events]]
on = "lead.created"
name = "lead_created"
[events.payload]
lead_id = "{{ lead_id }}"
token = "{{ auth.token }}"
auth = "{{ auth }}"
everything = "{{ event }}"

[[events]]
on = "form.sent"
name = "form_sent"
[events.payload]
token = "{{ token }}"
raw = "{{ body }}"
"""


def sources(tmp_path: Path) -> str:
    mapping = tmp_path / "token-mapping.toml"
    mapping.write_text(MAPPING)
    return f"""
[sources.leads]
provider = "hmac"
verify = "token"
token = "{TOKEN}"
token_field = "auth.token"
type = "lead.created"
id_field = "lead_id"
mapping = "{mapping}"

[sources.forms]
provider = "hmac"
verify = "token"
token = "{TOKEN}"
token_field = "token"
type = "form.sent"
mapping = "{mapping}"
"""


def everything_written(db: Path) -> bytes:
    """The database with its WAL: every byte the relay wrote, committed or not."""
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def test_a_body_token_is_removed_before_it_is_stored_shown_or_mapped(
    tmp_path: Path, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=400, count=3)  # the batch, then each half: two dead letters to show
    relay = relay_factory(sandbox, sources=sources(tmp_path))
    lead = {"lead_id": "L-1", "auth": {"token": TOKEN, "scheme": "shared"}, "note": "héllo"}
    answer = relay.post("leads", json.dumps(lead).encode(), {"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    form = urlencode({"name": "Jenny Rosen", "token": TOKEN, "plan": "pro"}).encode()
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    assert relay.post("forms", form, form_type).status_code == 200
    # A wrong or missing token is still refused.
    wrong = {**lead, "lead_id": "L-2", "auth": {"token": TOKEN + "x"}}
    refused = relay.post("leads", json.dumps(wrong).encode(), {"content-type": "application/json"})
    assert refused.status_code == 401

    deadline = time.monotonic() + 20
    while True:
        listed = CliRunner().invoke(
            main, ["dead-letters", "list", "--json", "--config", str(relay.config_path)]
        )
        assert listed.exit_code == 0, listed.output
        dead = json.loads(listed.stdout)
        if len(dead) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(dead) == 2, dead
    assert TOKEN not in listed.stdout

    conn = sqlite3.connect(relay.db)
    try:
        bodies = dict(conn.execute("SELECT source, body FROM webhooks").fetchall())
        outbox = [r[0] for r in conn.execute("SELECT body FROM outbox")]
    finally:
        conn.close()
    assert json.loads(bodies["leads"]) == {
        "lead_id": "L-1",
        "auth": {"scheme": "shared"},
        "note": "héllo",
    }
    assert bytes(bodies["forms"]) == b"name=Jenny+Rosen&plan=pro"  # the rest byte for byte

    tracked = [json.loads(body) for body in outbox]
    by_name = {t["name"]: t["payload"] for t in tracked}
    assert by_name["lead_created"]["lead_id"] == "L-1"
    assert "token" not in by_name["lead_created"]  # read nothing: an empty field is dropped
    assert json.loads(by_name["lead_created"]["auth"]) == {"scheme": "shared"}
    assert json.loads(by_name["lead_created"]["everything"])["note"] == "héllo"
    assert "token" not in by_name["form_sent"]
    assert by_name["form_sent"]["raw"] == "name=Jenny+Rosen&plan=pro"

    for dl in dead:
        shown = CliRunner().invoke(
            main, ["dead-letters", "show", str(dl["id"]), "--config", str(relay.config_path)]
        )
        assert shown.exit_code == 0, shown.output
        assert "  body:\n" in shown.stdout
        assert TOKEN not in shown.stdout
    assert TOKEN.encode() not in everything_written(relay.db)

    replayed = CliRunner().invoke(
        main, ["dead-letters", "replay", "--all", "--remap", "--config", str(relay.config_path)]
    )
    assert replayed.exit_code == 0, replayed.output
    arrived = sandbox.wait_for(2)
    assert sorted(e["name"] for e in arrived) == ["form_sent", "lead_created"]
    assert TOKEN not in json.dumps(arrived)
