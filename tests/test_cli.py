"""The command tree: every command has --help, the README's commands exist, and mistakes are
one line on stderr with exit 1."""

from __future__ import annotations

import re
import shlex
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from relay import __version__
from relay.cli import main
from tests.conftest import MAPPINGS, ROOT


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(main))


def resolve(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def test_the_tree_has_the_documented_commands() -> None:
    names = {" ".join(p) for p in COMMANDS}
    for expected in [
        "serve", "dev", "sandbox", "check", "map", "send-test", "status",
        "dead-letters", "dead-letters list", "dead-letters show", "dead-letters replay",
    ]:  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "relay" for p in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(main, [*path, flag])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: "), result.stdout
    command = resolve(path)
    assert command.help and command.help.strip(), "a command needs a docstring: its --help"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr


# -- the README's commands ----------------------------------------------------------------


def readme_commands(text: str) -> list[str]:
    """The `relay ...` commands of fenced code blocks (also after `$ ` or `&&`)."""
    commands = []
    in_block = False
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_block = not in_block
            pending = ""
            continue
        if not in_block:
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        for part in re.split(r"&&|\|\||;", line.removeprefix("$ ")):
            # The same commands run inside the container (docs/docker.md).
            part = re.sub(r"^\s*docker (compose exec relay|run .* webhook-relay) ", "", part)
            part = part.strip()
            if part == "relay" or part.startswith("relay "):
                commands.append(part)
    return commands


def check_command_line(line: str) -> str | None:
    """None if `line` names an existing command with options it has; else what is wrong."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|;&<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if word and all(c in "|;&<>" for c in word):
            break  # a pipe or a second command: the rest is not ours
        words.append(word)
    command: click.Command = main
    path = ["relay"]
    args = words[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return f"{' '.join(path)} has no command {args[0]!r}"
        command, path, args = sub, [*path, args[0]], args[1:]
    known = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            known.update(param.opts, param.secondary_opts)
    if command is main:
        known.add("--version")
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-") and not re.fullmatch(r"-\d+", arg):
            name = arg.split("=", 1)[0]
            if name not in known:
                return f"{' '.join(path)} has no option {name}"
    return None


def test_the_checker_refuses_what_does_not_exist() -> None:
    assert check_command_line("relay status --json") is None
    assert check_command_line("relay dead-letters replay --all --remap  # all of them") is None
    assert check_command_line("relay status --json | jq .dead_letters") is None
    assert check_command_line("relay map stripe body.json --headers=h.json") is None
    assert check_command_line("relay statuz") == "relay has no command 'statuz'"
    assert check_command_line("relay status --jsn") == "relay status has no option --jsn"
    assert check_command_line("relay dead-letters purge") is not None
    text = (
        "Intro\n```sh\n$ relay check \\\n    --config x.toml\nrelay nope\n"
        "pip install . && relay dev  # run\nrelayed\ndocker compose exec relay relay status\n"
        "docker run --rm -v a:/b webhook-relay relay check\n```\nrelay outside\n"
    )
    assert readme_commands(text) == [
        "relay check --config x.toml",
        "relay nope",
        "relay dev  # run",
        "relay status",
        "relay check",
    ]


def test_every_relay_command_in_the_readme_exists() -> None:
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet")
    commands = readme_commands(readme.read_text(encoding="utf-8"))
    if not commands:
        pytest.skip("README.md shows no `relay ...` command yet")
    problems = [f"{line!r}: {p}" for line in commands if (p := check_command_line(line))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/docker.md"])
def test_every_relay_command_in_the_operator_docs_exists(doc: str) -> None:
    commands = readme_commands((ROOT / doc).read_text(encoding="utf-8"))
    assert commands
    problems = [f"{line!r}: {p}" for line in commands if (p := check_command_line(line))]
    assert not problems, "\n".join(problems)


# -- a bad config: one line, exit 1, for every command that reads one ------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["check"],
        ["serve"],
        ["status"],
        ["status", "--json"],
        ["map", "stripe", str(MAPPINGS / "examples/stripe/charge.refunded.json")],
        ["send-test", "stripe"],
        ["dead-letters", "list"],
        ["dead-letters", "show", "1"],
        ["dead-letters", "replay", "--all"],
    ],
    ids=" ".join,
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path: Path, args: list[str]) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[track]\nbase_url = "http://127.0.0.1:9"\napi_key = "sk_x"\nwebsite_id = "1x"\n'
    )
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr == f"relay: {config}:4: track.website_id: must be an integer, not a string\n"
    )
    assert result.stdout == ""


def test_read_commands_do_not_create_a_database(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "relay.db"\n[track]\nbase_url = "http://127.0.0.1:9"\n'
        f'api_key = "sk_x"\nwebsite_id = 1\n[sources.stripe]\nprovider = "stripe"\n'
        f'secret = "whsec_x"\nmapping = "{MAPPINGS / "stripe.toml"}"\n'
    )
    for args in (
        ["status"],
        ["dead-letters", "list"],
        ["dead-letters", "show", "1"],
        ["dead-letters", "replay", "1"],
        ["map", "stripe", "--webhook", "1"],
    ):
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert result.exit_code == 1, (args, result.output)
        assert (
            result.stderr
            == f"relay: no database at {tmp_path / 'relay.db'} yet (has the relay run?)\n"
        )
    assert not (tmp_path / "relay.db").exists()


def test_a_damaged_database_is_one_line_too(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "relay.db"\n[track]\nbase_url = "http://127.0.0.1:9"\n'
        f'api_key = "sk_x"\nwebsite_id = 1\n[sources.stripe]\nprovider = "stripe"\n'
        f'secret = "whsec_x"\nmapping = "{MAPPINGS / "stripe.toml"}"\n'
    )
    (tmp_path / "relay.db").write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"relay: {config}:2: relay.database: {tmp_path / 'relay.db'} is not a SQLite database\n"
    )
    # A database whose first page is garbage past a sound header: SQLite says so on opening.
    good = tmp_path / "good.db"
    conn = sqlite3.connect(good)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    (tmp_path / "relay.db").write_bytes(good.read_bytes()[:100] + b"\xff" * 8000)
    for args in (["status"], ["dead-letters", "list"]):
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"relay: cannot open the database {tmp_path / 'relay.db'}: "
        )
        assert result.stderr.count("\n") == 1
