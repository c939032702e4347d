"""`relay check` (config, mappings, their examples) and `relay map` (a dry run of a mapping)."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from tests.conftest import MAPPINGS, ROOT, Relay, Sandbox, stripe_event, stripe_post

REFUND = MAPPINGS / "examples" / "stripe" / "charge.refunded.json"
CONTACT = MAPPINGS / "examples" / "standard" / "contact.created.json"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def config_for(folder: Path, mapping: Path, provider: str = "stripe", extra: str = "") -> Path:
    """A config with one source `src` of `provider` using `mapping`."""
    secret = 'secret = "whsec_check"' if provider == "stripe" else "verify = false"
    path = folder / "relay.toml"
    path.write_text(
        f'[relay]\ndatabase = "relay.db"\n'
        f'[track]\nbase_url = "http://127.0.0.1:9/api/v1"\napi_key = "sk_check"\nwebsite_id = 1\n'
        f'[sources.src]\nprovider = "{provider}"\n{secret}\nmapping = "{mapping}"\n{extra}'
    )
    return path


def mapping_file(folder: Path, text: str, name: str = "m.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


REFUND_RULE = """
provider = "stripe"

[[events]]
on = "charge.refunded"
name = "refund_issued"
visitor_id = "{{ data.object.metadata.visitor_id }}"
[events.payload]
amount = "{{ data.object.amount_refunded | cents(data.object.currency) }}"
"""


# -- relay check ----------------------------------------------------------------------------


def test_check_passes_on_a_good_config_and_counts_the_examples(tmp_path: Path) -> None:
    config = config_for(tmp_path, MAPPINGS / "stripe.toml")
    result = run("check", "--config", str(config))
    assert result.exit_code == 0, result.output
    examples = (MAPPINGS / "stripe.toml").read_text().count("[[examples]]")
    assert examples > 0
    assert result.stdout == (
        f"{config}: ok (1 source(s), 1 mapping(s), {examples} example(s) passed)\n"
    )
    assert result.stderr == ""


def sendgrid_public_key() -> str:
    """A real P-256 public key as SendGrid shows it: base64 DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def test_check_passes_on_the_shipped_relay_toml() -> None:
    env = {
        "WEBANALYZER_API_KEY": "sk_live_" + "a1" * 16,
        "STRIPE_WEBHOOK_SECRET": "whsec_" + "b2" * 16,
        "MAILGUN_WEBHOOK_SIGNING_KEY": "c3" * 16,
        "SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid_public_key(),
        "HUBSPOT_CLIENT_SECRET": str(uuid.uuid4()),
        "RELAY_CONFIG": "",
    }
    result = run("check", "--config", str(ROOT / "relay.toml"), env=env)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r".*relay\.toml: ok \((\d+) source\(s\), (\d+) mapping\(s\), (\d+) example\(s\) passed\)\n",
        result.stdout,
    ), result.stdout
    for value in env.values():
        assert not value or value not in result.output


def test_an_example_that_fails_names_file_example_and_rule(tmp_path: Path) -> None:
    mapping = mapping_file(
        tmp_path,
        REFUND_RULE
        + f"""
[[examples]]
input = "{REFUND}"
expect = [{{ name = "refund_issued", payload = {{ amount = "1.00" }} }}]
""",
    )
    result = run("check", "--config", str(config_for(tmp_path, mapping)))
    assert result.exit_code == 1
    first, last = result.stderr.splitlines()
    line = mapping.read_text().splitlines().index("[[examples]]") + 1
    assert first.startswith(f"{mapping}:{line}: examples[0] (input {REFUND}): ")
    assert 'events[0] (on "charge.refunded")' in first
    assert "payload.amount: expected '1.00', got '49.99'" in first
    assert last == "relay: 1 problem(s) found"
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("rule_change", "key", "reason"),
    [
        (
            ("| cents(data.object.currency)", "| no_such_filter"),
            "events[0].payload.amount",
            "template error: no filter named 'no_such_filter'",
        ),
        (('}}"\n[events', '"\n[events'), "events[0].visitor_id", "template error"),
        (
            ('name = "refund_issued"', 'name = "refund_issued"\ncolour = "red"'),
            "events[0].colour",
            "unknown key",
        ),
        (('on = "charge.refunded"\n', ""), "events[0]", "needs `on`"),
        (
            ("| cents(data.object.currency)", "~ 10**5000"),
            "events[0].payload.amount",
            "'**' would make an integer of about 5001 digits; a mapping makes at most 1000",
        ),
        (
            ("| cents(data.object.currency)", "~ 'a' * 10**8"),
            "events[0].payload.amount",
            "'*' would make 100000000 characters; a mapping makes at most 1048576",
        ),
    ],
    ids=["unknown filter", "template syntax", "unknown key", "no on", "10**5000", "'a' * 10**8"],
)
def test_a_broken_mapping_names_file_line_and_rule(
    tmp_path: Path, rule_change: tuple[str, str], key: str, reason: str
) -> None:
    assert rule_change[0] in REFUND_RULE
    mapping = mapping_file(tmp_path, REFUND_RULE.replace(rule_change[0], rule_change[1]))
    result = run("check", "--config", str(config_for(tmp_path, mapping)))
    assert result.exit_code == 1
    problem, summary = result.stderr.splitlines()
    assert re.match(rf"{re.escape(str(mapping))}:\d+: {re.escape(key)}: ", problem), problem
    assert reason in problem
    assert summary == "relay: 1 problem(s) found"


def test_rules_that_can_never_fit_the_track_api_are_problems(tmp_path: Path) -> None:
    payload = "\n".join(f'k{i} = "{{{{ data.object.id }}}}"' for i in range(11))
    mapping = mapping_file(
        tmp_path,
        f"""
[[events]]
on = "charge.refunded"
name = "{"x" * 129}"
visitor_id = "not-a-uuid"
[events.payload]
{payload}
""",
    )
    result = run("check", "--config", str(config_for(tmp_path, mapping)))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[-1] == "relay: 3 problem(s) found"
    assert any("events[0].name: is longer than" in line for line in lines)
    assert any("events[0].payload: declares 11 keys" in line for line in lines)
    assert any("events[0].visitor_id: is a constant that is not a UUID" in line for line in lines)
    assert all(line.startswith(f"{mapping}:") for line in lines[:-1])


def test_a_mapping_for_another_provider_is_a_problem(tmp_path: Path) -> None:
    result = run("check", "--config", str(config_for(tmp_path, MAPPINGS / "standard.toml")))
    assert result.exit_code == 1
    assert "written for provider 'standard', but source 'src' is 'stripe'" in result.stderr


def test_every_problem_of_every_mapping_is_printed(tmp_path: Path) -> None:
    good = mapping_file(tmp_path, REFUND_RULE, "good.toml")
    broken = mapping_file(tmp_path, REFUND_RULE.replace("cents(", "nope("), "broken.toml")
    failing = mapping_file(
        tmp_path,
        REFUND_RULE + f'\n[[examples]]\ninput = "{REFUND}"\nexpect = []\n',
        "failing.toml",
    )
    extra = "".join(
        f'[sources.s{i}]\nprovider = "stripe"\nsecret = "whsec_x"\nmapping = "{m}"\n'
        for i, m in enumerate([broken, failing])
    )
    result = run("check", "--config", str(config_for(tmp_path, good, extra=extra)))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[-1] == "relay: 2 problem(s) found"
    assert lines[0].startswith(f"{broken}:")
    assert lines[1].startswith(f"{failing}:") and "expected 0 event(s)" in lines[1]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("cents(", "nope("), "events[0].payload.amount: template error: no filter named 'nope'"),
        (
            ("| cents(data.object.currency)", "* 10**5000"),
            "events[0].payload.amount: '**' would make an integer of about 5001 digits",
        ),
    ],
    ids=["unknown filter", "10**5000"],
)
def test_serve_refuses_a_broken_mapping_with_one_line(
    tmp_path: Path, change: tuple[str, str], reason: str
) -> None:
    mapping = mapping_file(tmp_path, REFUND_RULE.replace(*change))
    result = run("serve", "--config", str(config_for(tmp_path, mapping)))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert re.match(rf"relay: {re.escape(str(mapping))}:\d+: {re.escape(reason)}", result.stderr)


def test_an_example_of_a_slow_rule_fails_at_the_deadline(tmp_path: Path) -> None:
    slow = "{% for i in range(40000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
    mapping = mapping_file(
        tmp_path,
        REFUND_RULE.replace('amount = "', f'slow = "{slow}"\namount = "')
        + f'\n[[examples]]\ninput = "{REFUND}"\nexpect = [{{ name = "refund_issued" }}]\n',
    )
    started = time.monotonic()
    result = run("check", "--config", str(config_for(tmp_path, mapping)))
    assert time.monotonic() - started < 5
    assert result.exit_code == 1
    problem, summary = result.stderr.splitlines()
    assert problem.startswith(f"{mapping}:")
    assert problem.endswith(
        ": examples[0] (input "
        f'{REFUND}): events[0] (on "charge.refunded"): failed: payload.slow: took more than '
        "50 ms of CPU, the most one event's mapping may take"
    ), problem
    assert summary == "relay: 1 problem(s) found"


# -- relay map ------------------------------------------------------------------------------


def mapped(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    out: list[dict[str, Any]] = json.loads(result.stdout)
    return out


def test_map_a_file(tmp_path: Path) -> None:
    config = config_for(tmp_path, MAPPINGS / "stripe.toml")
    out = mapped(run("map", "src", str(REFUND), "--config", str(config)))
    assert out == [
        {
            "event": "evt_test_10",
            "type": "charge.refunded",
            "ignored": False,
            "events": [
                {
                    "rule": 'events[1] (on "charge.refunded")',
                    "track": {
                        "name": "refund_issued",
                        "payload": {
                            "charge_id": "ch_test_1",
                            "payment_intent": "pi_test_1",
                            "amount": "49.99",
                            "currency": "USD",
                            "full_refund": "true",
                            "customer_id": "cus_test_1",
                        },
                        "visitor_id": "550e8400-e29b-41d4-a716-446655440000",
                    },
                    "notes": [],
                }
            ],
            "failures": [],
        }
    ]
    assert not (tmp_path / "relay.db").exists()  # nothing stored


def test_map_shows_fitting_notes_failures_and_ignored_events(tmp_path: Path) -> None:
    mapping = mapping_file(
        tmp_path,
        """
[[events]]
on = "charge.refunded"
name = "refund_issued"
visitor_id = "{{ data.object.id }}"
[events.payload]
note = "{{ data.object.description * 300 }}"

[[events]]
on = "charge.refunded"
name = "refund_amount"
[events.payload]
amount = "{{ data.object.currency | cents }}"
""",
    )
    config = config_for(tmp_path, mapping)
    event = json.loads(REFUND.read_text())
    event["data"]["object"]["description"] = "ab"
    body = tmp_path / "refund.json"
    body.write_text(json.dumps(event))
    [out] = mapped(run("map", "src", str(body), "--config", str(config)))
    [made] = out["events"]
    assert made["track"] == {"name": "refund_issued", "payload": {"note": "ab" * 127 + "a"}}
    assert made["notes"] == [
        "payload.note cut to 255 characters",
        "visitor_id is not a UUID: dropped",
    ]
    [failure] = out["failures"]
    assert failure["rule"] == 'events[1] (on "charge.refunded")'
    assert "cents" in failure["reason"] and "'usd' is not a number" in failure["reason"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**event, "id": "evt_2", "type": "customer.created"}))
    [out] = mapped(run("map", "src", str(other), "--config", str(config)))
    assert out == {
        "event": "evt_2",
        "type": "customer.created",
        "ignored": True,
        "events": [],
        "failures": [],
    }


def test_map_takes_headers_from_a_file(tmp_path: Path) -> None:
    config = config_for(tmp_path, MAPPINGS / "standard.toml", provider="standard")
    headers = tmp_path / "headers.json"
    headers.write_text(json.dumps({"Webhook-Id": "msg_from_headers"}))
    [out] = mapped(
        run("map", "src", str(CONTACT), "--headers", str(headers), "--config", str(config))
    )
    assert out["event"] == "msg_from_headers"
    assert [e["track"]["name"] for e in out["events"]] == ["lead_created"]

    result = run("map", "src", str(CONTACT), "--config", str(config))
    assert result.exit_code == 1
    assert result.stderr == (
        "relay: the standard provider cannot read this body: "
        "missing webhook-id header (the event id)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "nope", str(REFUND)], "relay: no source named 'nope' in "),
        (["map", "src"], "relay: give a WEBHOOK_FILE or --webhook ID (one of them)"),
        (["map", "src", str(REFUND), "--webhook", "1"], "relay: give a WEBHOOK_FILE or"),
        (["map", "src", "missing.json"], "relay: missing.json: No such file or directory"),
    ],
)
def test_map_mistakes(tmp_path: Path, args: list[str], message: str) -> None:
    config = config_for(tmp_path, MAPPINGS / "stripe.toml")
    result = run(*args, "--config", str(config))
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1


def test_map_a_stored_webhook(sandbox: Sandbox, relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(sandbox)
    event = stripe_event("charge.refunded")
    assert relay.post("stripe", *stripe_post(event)).json()["accepted"] == 1
    conn = sqlite3.connect(relay.config.relay.database)
    try:
        [(webhook_id,)] = conn.execute("SELECT id FROM webhooks").fetchall()
    finally:
        conn.close()
    config = str(relay.config_path)

    [out] = mapped(run("map", "stripe", "--webhook", str(webhook_id), "--config", config))
    assert out["event"] == event["id"]
    [made] = out["events"]
    assert made["track"]["name"] == "refund_issued"
    assert made["track"]["payload"]["charge_id"] == event["data"]["object"]["id"]

    result = run("map", "stripe", "--webhook", str(webhook_id + 1), "--config", config)
    assert result.exit_code == 1
    assert f"no stored webhook with id {webhook_id + 1}" in result.stderr
