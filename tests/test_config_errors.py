"""Config errors about values from the environment name the variable, never its value."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from relay.cli import main

SECRET = "sk_live_ENVLEAK_7a6b5c4d3e2f1a0b"

MAPPING = """
provider = "hmac"

[[events]]
on = "webhook"
name = "hook"
"""

CONFIG = """\
[relay]
database = "relay.db"
port = 8000

[track]
base_url = "http://127.0.0.1:9/api/v1"
api_key = "sk_x"
website_id = 1
flush_interval = "5s"

[sources.crm]
provider = "hmac"
verify = "signature"
secret = "whsec_x"
signature_header = "X-Signature"
algorithm = "sha256"
mapping = "hook.toml"
"""

# (case, line of CONFIG, the line with a variable, its value, key named)
CASES = [
    ("base_url", 'base_url = "http://127.0.0.1:9/api/v1"', "${V}", SECRET, "track.base_url"),
    (
        "base_url, trimmed",
        'base_url = "http://127.0.0.1:9/api/v1"',
        "${V}",
        SECRET + "//",
        "track.base_url",
    ),
    (
        "base_url, part",
        'base_url = "http://127.0.0.1:9/api/v1"',
        "ftp://${V}/x",
        SECRET,
        "track.base_url",
    ),
    ("website_id", "website_id = 1", "${V}", "99999999999999999999", "track.website_id"),
    ("website_id 0", "website_id = 1", "${V}", "0", "track.website_id"),
    ("port", "port = 8000", "${V}", "70000", "relay.port"),
    ("database", 'database = "relay.db"', "${V}", "/proc", "relay.database"),
    ("duration", 'flush_interval = "5s"', "${V}", f"5{SECRET}", "track.flush_interval"),
    ("a provider's URL", 'algorithm = "sha256"', None, SECRET, "sources.crm.public_url"),
    ("a provider's choice", 'algorithm = "sha256"', "${V}", SECRET, "sources.crm.algorithm"),
    ("a dotted path", 'algorithm = "sha256"', None, f"{SECRET}..id", "sources.crm.id_field"),
    ("verify", 'verify = "signature"', "${V}", SECRET, "sources.crm.verify"),
    ("mapping path", 'mapping = "hook.toml"', "maps/${V}.toml", SECRET, "sources.crm.mapping"),
    (
        "quotes in the value",
        'algorithm = "sha256"',
        "${V}",
        "it's\n" + SECRET,
        "sources.crm.algorithm",
    ),
]


def config_with(folder: Path, line: str, template: str | None, key: str) -> Path:
    leaf = key.rsplit(".", 1)[1]
    if template is None:  # a key CONFIG does not have: added after `line`
        text = CONFIG.replace(line, f'{line}\n{leaf} = "${{V}}"')
    else:
        text = CONFIG.replace(line, f'{leaf} = "{template}"')
    assert text != CONFIG
    (folder / "hook.toml").write_text(MAPPING)
    path = folder / "relay.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    ("line", "template", "value", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_error_names_the_variable_and_never_shows_its_value(
    tmp_path: Path, command: str, line: str, template: str | None, value: str, key: str
) -> None:
    path = config_with(tmp_path, line, template, key)
    result = CliRunner().invoke(main, [command, "--config", str(path)], env={"V": value})
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    [message] = result.stderr.splitlines()
    assert message.startswith(f"relay: {path}:") and f": {key}: " in message, message
    assert "${V}" in message, message
    shown = message.split(f": {key}: ", 1)[1]
    for piece in {value, value.strip("/"), value.splitlines()[-1], repr(value)[1:-1]}:
        assert piece not in shown, message
    if value == SECRET or SECRET in value:
        assert SECRET not in result.output


def test_values_written_in_the_file_are_still_shown(tmp_path: Path) -> None:
    path = config_with(tmp_path, 'algorithm = "sha256"', "md4", "sources.crm.algorithm")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.endswith(
        "sources.crm.algorithm: must be one of sha1, sha256, sha512, not 'md4'\n"
    )
