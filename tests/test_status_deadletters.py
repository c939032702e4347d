"""`relay status` and `relay dead-letters`, against a running relay and the sandbox track API."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from tests.conftest import (
    API_KEY,
    STRIPE_SECRET,
    Relay,
    Sandbox,
    stripe_event,
    stripe_post,
    wait_mapped,
)


def cli(relay: Relay, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(relay.config_path)])


def status_json(relay: Relay) -> dict[str, Any]:
    result = cli(relay, "status", "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def post_refund(relay: Relay, **overrides: Any) -> dict[str, Any]:
    event = stripe_event("charge.refunded", **overrides)
    answer = relay.post("stripe", *stripe_post(event))
    assert answer.json()["accepted"] == 1, answer.text
    return event


def dead_letters(relay: Relay) -> list[dict[str, Any]]:
    result = cli(relay, "dead-letters", "list", "--json")
    assert result.exit_code == 0, result.output
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


# -- status -------------------------------------------------------------------------------


def test_status_after_deliveries(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(sandbox)
    events = [post_refund(relay) for _ in range(2)]
    relay.post("stripe", *stripe_post(events[0]))  # a duplicate
    wait_until(lambda: status_json(relay)["destinations"][0]["delivered"] == 2)

    st = status_json(relay)
    [dest] = st["destinations"]
    name = relay.config.sources["stripe"].destination.name
    assert dest["name"] == name and dest["sources"] == ["stripe"] and dest["website_id"] == 1
    assert (dest["pending"], dest["in_flight"], dest["dead"]) == (0, 0, 0)
    assert dest["oldest_pending_age"] is None
    assert time.time() - 10 < dest["last_success_at"] <= time.time()
    assert dest["paused"] is None and dest["last_error"] is None
    assert (st["dead_letters"], st["dedupe_keys"], st["webhooks"]) == (0, 2, 2)

    result = cli(relay, "status")
    assert result.exit_code == 0
    header, row, footer = result.stdout.splitlines()
    assert header.split() == [
        "DESTINATION", "SOURCES", "PENDING", "IN", "FLIGHT", "OLDEST", "DELIVERED", "DEAD",
        "LAST", "SUCCESS", "STATE",
    ]  # fmt: skip
    cells = row.split()
    assert cells[:7] == [name, "stripe", "0", "0", "-", "2", "0"]
    assert cells[-3].endswith("s") and cells[-2:] == ["ago", "ok"]  # last success: "0s ago"
    assert footer == "dead letters: 0   dedupe keys: 2   stored webhooks: 2"
    assert API_KEY not in result.output and STRIPE_SECRET not in result.output


def test_status_shows_a_paused_destination(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=401)
    relay = relay_factory(sandbox)
    post_refund(relay)
    wait_until(lambda: status_json(relay)["destinations"][0]["paused"] is not None)

    [dest] = status_json(relay)["destinations"]
    assert dest["paused"] == "HTTP 401 unauthorized"
    assert dest["last_error"] == "HTTP 401 unauthorized"
    assert dest["pending"] + dest["in_flight"] == 1 and dest["delivered"] == 0
    assert dest["oldest_pending_age"] > 0

    result = cli(relay, "status")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[1].endswith("PAUSED: HTTP 401 unauthorized"), lines[1]
    assert lines[1].split()[5] != "-"  # the oldest pending event has an age
    assert lines[2].startswith(f"last error {dest['name']}: HTTP 401 unauthorized (")
    assert API_KEY not in result.output


# -- dead letters ---------------------------------------------------------------------------


def test_refused_event_list_show_replay(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    sandbox.fault(status=400, count=1)  # the track API refuses the first request
    relay = relay_factory(sandbox)
    event = post_refund(relay)
    wait_until(lambda: len(dead_letters(relay)) == 1)
    [dl] = dead_letters(relay)
    assert dl["source"] == "stripe" and dl["event_key"] == event["id"]
    assert dl["event_type"] == "charge.refunded" and dl["attempts"] == 1
    assert dl["reason"].startswith("validation_error: ")
    assert json.loads(dl["body"])["name"] == "refund_issued"
    assert status_json(relay)["dead_letters"] == 1

    listed = cli(relay, "dead-letters", "list")
    assert listed.exit_code == 0
    [line] = listed.stdout.splitlines()
    assert line.split()[:4] == [str(dl["id"]), "stripe", "charge.refunded", "attempts=1"]
    assert "validation_error" in line

    shown = cli(relay, "dead-letters", "show", str(dl["id"]))
    assert shown.exit_code == 0
    text = shown.stdout
    assert text.startswith(f"dead letter {dl['id']}\n")
    assert "  reason: validation_error: " in text
    assert '  track event: {"name":"refund_issued"' in text
    assert f"  webhook {dl['webhook_id']}: received " in text
    assert f'"id": "{event["id"]}"' in text  # the webhook body, pretty-printed
    assert "stripe-signature" in text  # headers are shown...
    assert STRIPE_SECRET not in text and API_KEY not in text  # ...but never a secret

    assert sandbox.events() == []
    replayed = cli(relay, "dead-letters", "replay", str(dl["id"]))
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout == f"1 dead letter(s) queued again: {dl['id']}\n"
    [arrived] = sandbox.wait_for(1)
    assert arrived["name"] == "refund_issued"
    assert arrived["payload"]["charge_id"] == event["data"]["object"]["id"]
    assert dead_letters(relay) == []


FAILING = """
[[events]]
on = "charge.refunded"
name = "refund_issued"
[events.payload]
charge_id = "{{ data.object.id }}"
amount = "{{ data.object.currency | cents }}"
"""


def test_failed_mapping_then_fixed_and_replayed_with_remap(
    tmp_path: Path, sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    mapping = tmp_path / "stripe.toml"
    mapping.write_text(FAILING)
    sources = (
        f'[sources.stripe]\nprovider = "stripe"\nsecret = "{STRIPE_SECRET}"\n'
        f'mapping = "{mapping}"\n'
    )
    relay = relay_factory(sandbox, sources=sources)
    first, second = post_refund(relay), post_refund(relay)
    wait_mapped(relay.db)  # dead as soon as the mapper took the webhook
    items = dead_letters(relay)
    assert [i["event_key"] for i in items] == [second["id"], first["id"]]  # newest first
    for item in items:
        assert item["reason"].startswith("mapping failed: payload.amount: cents: 'usd'")
        assert item["body"] is None
    id2, id1 = (i["id"] for i in items)
    shown = cli(relay, "dead-letters", "show", str(id1))
    assert "  track event: (none: the mapping failed)" in shown.stdout

    # Replaying without a fix cannot work: the mapping still fails.
    result = cli(relay, "dead-letters", "replay", str(id1))
    assert result.exit_code == 1
    assert f"dead letter {id1}: the mapping still fails: payload.amount" in result.stderr
    assert result.stdout == "0 dead letter(s) queued again\n"

    mapping.write_text(FAILING.replace("currency | cents", "amount_refunded | cents"))
    result = cli(relay, "dead-letters", "replay", "--remap", str(id1))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"1 dead letter(s) queued again: {id1}\n"
    [arrived] = sandbox.wait_for(1)
    assert arrived["payload"] == {"charge_id": first["data"]["object"]["id"], "amount": "49.99"}

    result = cli(relay, "dead-letters", "replay", "--all")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"1 dead letter(s) queued again: {id2}\n"
    assert len(sandbox.wait_for(2)) == 2
    assert dead_letters(relay) == []
    assert cli(relay, "dead-letters", "list").stdout == "no dead letters\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "relay: give dead-letter IDs or --all (one of them)\n"),
        (["replay", "1", "--all"], "relay: give dead-letter IDs or --all (one of them)\n"),
        (["replay", "999"], "no dead letter with id 999\n"),
        (["show", "999"], "relay: no dead letter with id 999\n"),
    ],
)
def test_dead_letter_mistakes(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], args: list[str], message: str
) -> None:
    relay = relay_factory(sandbox)
    result = cli(relay, "dead-letters", *args)
    assert result.exit_code == 1
    assert result.stderr == message


def test_replay_all_with_nothing_dead(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay = relay_factory(sandbox)
    result = cli(relay, "dead-letters", "replay", "--all")
    assert result.exit_code == 0
    assert result.stdout == "0 dead letter(s) queued again\n"


def one_dead_letter(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> tuple[Relay, str]:
    sandbox.fault(status=400, count=1)  # the track API refuses the first request
    relay = relay_factory(sandbox)
    post_refund(relay)
    wait_until(lambda: len(dead_letters(relay)) == 1)
    return relay, str(dead_letters(relay)[0]["id"])


def test_replaying_an_id_given_twice_queues_it_once(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay, dead = one_dead_letter(sandbox, relay_factory)
    result = cli(relay, "dead-letters", "replay", dead, dead)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"1 dead letter(s) queued again: {dead}\n"
    assert result.stderr == ""
    assert len(sandbox.wait_for(1)) == 1
    time.sleep(0.6)  # two flush intervals: a second copy would have arrived
    assert len(sandbox.events()) == 1
    assert dead_letters(relay) == []


def test_replay_names_every_id_that_is_not_a_dead_letter_and_queues_nothing(
    sandbox: Sandbox, relay_factory: Callable[..., Relay]
) -> None:
    relay, dead = one_dead_letter(sandbox, relay_factory)
    result = cli(relay, "dead-letters", "replay", dead, "998", dead, "999")
    assert result.exit_code == 1
    assert result.stderr == "no dead letter with id 998\nno dead letter with id 999\n"
    assert result.stdout == "0 dead letter(s) queued again\n"
    assert [d["id"] for d in dead_letters(relay)] == [int(dead)]

    assert cli(relay, "dead-letters", "replay", dead).exit_code == 0
    wait_until(lambda: status_json(relay)["destinations"][0]["delivered"] == 1)
    # Replayed and delivered: no longer a dead letter, and the message says what it is.
    result = cli(relay, "dead-letters", "replay", dead)
    assert result.exit_code == 1
    assert result.stderr == f"no dead letter with id {dead}: that event is delivered, not dead\n"
    assert result.stdout == "0 dead letter(s) queued again\n"
