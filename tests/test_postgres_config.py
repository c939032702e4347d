"""`[relay] database` as a PostgreSQL URL: the config, `relay check`, `relay status`, the relay
on start, and a password that shows nowhere."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.config import load_config
from relay.errors import ConfigError
from tests.conftest import Relay, Sandbox, relay_toml, settled, stripe_event, stripe_post
from tests.pgserver import PASSWORD


def write(tmp_path: Path, database: str) -> Path:
    path = tmp_path / "relay.toml"
    text = relay_toml("http://127.0.0.1:9/api/v1", tmp_path / "unused.db")
    path.write_text(text.replace(f'"{tmp_path / "unused.db"}"', f'"{database}"', 1))
    return path


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgres_url_is_the_database_not_a_file(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}://relay:{PASSWORD}@127.0.0.1:5432/relay"
    config = load_config(write(tmp_path, url))
    assert config.relay.database == url
    assert not any(p.name.startswith(scheme) for p in tmp_path.iterdir())


def test_the_url_may_come_from_the_environment(tmp_path: Path) -> None:
    url = f"postgresql://relay:{PASSWORD}@db:5432/relay"
    config = load_config(write(tmp_path, "${DATABASE_URL}"), env={"DATABASE_URL": url})
    assert config.relay.database == url


@pytest.mark.parametrize(
    "value, reason",
    [
        ("mysql://u:p@host/db", "unknown database URL scheme mysql://"),
        ("sqlite:///tmp/x.db", "unknown database URL scheme sqlite://"),
        ("postgresql://u:p@host:notaport/db", "not a valid postgresql:// URL"),
    ],
)
def test_other_urls_are_a_config_error(tmp_path: Path, value: str, reason: str) -> None:
    path = write(tmp_path, value)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == "relay.database" and reason in e.value.reason
    assert str(path) in e.value.message and "\n" not in e.value.message
    assert ":p@" not in e.value.message
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "relay.database" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.toml"]


def test_check_says_unreachable_or_not_migrated_in_one_line(
    tmp_path: Path, pg_url: str, pg_server: Any
) -> None:
    down = pg_url.replace(f":{pg_server.port}/", ":1/")
    result = CliRunner().invoke(main, ["check", "--config", str(write(tmp_path, down))])
    assert result.exit_code == 1, result.output
    first = result.output.splitlines()[0]
    assert "relay.database: cannot connect to the database" in first
    assert PASSWORD not in result.output and "***" in first

    path = write(tmp_path, pg_url)
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1
    assert "relay.database: the database" in result.output and "not migrated" in result.output
    assert PASSWORD not in result.output
    result = CliRunner().invoke(main, ["status", "--config", str(path)])  # reads, never migrates
    assert result.exit_code == 1 and "not migrated" in result.output
    assert result.output.count("\n") == 1 and PASSWORD not in result.output


def test_the_relay_migrates_on_start_and_reports_from_the_database(
    tmp_path: Path,
    pg_url: str,
    sandbox: Sandbox,
    relay_factory: Callable[..., Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    r = relay_factory(sandbox, relay=f'database = "{pg_url}"')
    assert httpx.get(f"{r.url}/readyz").status_code == 200
    body, headers = stripe_post(stripe_event(id="evt_pg_1"))
    assert r.post("stripe", body, headers).status_code == 200
    assert len(settled(sandbox, 1)) == 1
    result = CliRunner().invoke(main, ["check", "--config", str(r.config_path)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["status", "--config", str(r.config_path)])
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert PASSWORD not in caplog.text and PASSWORD not in httpx.get(f"{r.url}/readyz").text
    assert "postgresql://relay:***@127.0.0.1" in caplog.text
