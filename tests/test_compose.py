"""docs/compose.replicas.yml (PostgreSQL and two relays) stays true: what it passes to the
relays is what the relay accepts, and the config it mounts opens a real PostgreSQL store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from relay.cli import main
from relay.config import load_config
from tests.conftest import MAPPINGS, ROOT
from tests.pgserver import PASSWORD, USER

COMPOSE = ROOT / "docs" / "compose.replicas.yml"
VARIABLE = re.compile(r"\$\{(\w+)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def relays(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("relay")}


def mounted_config(service: dict[str, Any]) -> Path:
    """The file the service mounts as the image's config (RELAY_CONFIG in the Dockerfile)."""
    dockerfile = (COMPOSE.parent / service["build"] / "Dockerfile").read_text()
    config = re.search(r"RELAY_CONFIG=(\S+)", dockerfile)
    assert config is not None
    for volume in service["volumes"]:
        src, dst, *_ = volume.split(":")
        if dst == config.group(1):
            return (COMPOSE.parent / src).resolve()
    raise AssertionError(f"no volume mounts {config.group(1)}")


def test_postgres_and_two_relays_on_one_database(compose: dict[str, Any]) -> None:
    services = relays(compose)
    assert len(services) == 2 and "postgres" in compose["services"]
    pg = compose["services"]["postgres"]["environment"]
    urls = {s["environment"]["DATABASE_URL"] for s in services.values()}
    assert len(urls) == 1  # one database
    url = urlsplit(urls.pop())
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert url.username == pg["POSTGRES_USER"] and url.path == "/" + pg["POSTGRES_DB"]
    assert url.password == pg["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD}"  # from .env
    assert {mounted_config(s) for s in services.values()} == {
        (ROOT / "docs" / "relay.replicas.toml").resolve()
    }
    for s in services.values():
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
    ports = [p for s in services.values() for p in s["ports"]]
    assert len(set(ports)) == len(ports)


def test_the_image_has_the_postgres_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "[postgres]" in dockerfile


def test_the_mounted_config_opens_a_real_database(
    compose: dict[str, Any], tmp_path: Path, pg_url: str
) -> None:
    """The relay's config with the service's environment, its database moved to the test
    server: it loads, `relay check` migrates nothing and says so, the store opens."""
    (service,) = list(relays(compose).values())[:1]
    etc = tmp_path / "etc" / "relay"  # as in the image: the config beside the mappings
    etc.mkdir(parents=True)
    shutil.copy(mounted_config(service), etc / "relay.toml")
    shutil.copytree(MAPPINGS, etc / "mappings")
    values = {"POSTGRES_PASSWORD": PASSWORD, "WEBANALYZER_API_KEY": "wa_" + "k" * 29,
              "STRIPE_WEBHOOK_SECRET": "whsec_compose"}  # fmt: skip
    env = {k: VARIABLE.sub(lambda m: values[m.group(1)], str(v))
           for k, v in service["environment"].items()}  # fmt: skip
    test_db = urlsplit(pg_url)
    server = test_db.netloc.split("@")[1] + test_db.path
    env["DATABASE_URL"] = env["DATABASE_URL"].replace("@postgres:5432/relay", f"@{server}")
    assert urlsplit(env["DATABASE_URL"]).username == USER
    config = load_config(etc / "relay.toml", env=env)
    assert config.relay.database == env["DATABASE_URL"]

    import os

    old = dict(os.environ)
    os.environ.update(env)
    try:
        result = CliRunner().invoke(main, ["check", "--config", str(etc / "relay.toml")])
        assert result.exit_code == 1 and "not migrated" in result.output  # a fresh database
        from relay.cli.common import open_database

        open_database(load_config(etc / "relay.toml"))  # what `relay serve` does first
        result = CliRunner().invoke(main, ["check", "--config", str(etc / "relay.toml")])
        assert result.exit_code == 0, result.output
        assert PASSWORD not in result.output
    finally:
        os.environ.clear()
        os.environ.update(old)
