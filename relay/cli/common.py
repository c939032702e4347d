"""What every `relay` command shares: one-line failures, config loading, log options."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from relay.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from relay.config import Config, Source
    from relay.storage import Store

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    click.echo(f"relay: {message}", err=True)
    sys.exit(1)


class RelayGroup(click.Group):
    """Turns a config or database mistake into one clear line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import sqlite3

        try:
            return super().invoke(ctx)
        except ConfigError as e:
            fail(e.message)
        except StoreError as e:
            fail(str(e))
        except sqlite3.DatabaseError as e:
            fail(f"database error: {e}")


def config_option(f: Any) -> Any:
    return click.option(
        "--config",
        "config_file",
        default=None,
        metavar="FILE",
        help="Config file (default: $RELAY_CONFIG, else relay.toml).",
    )(f)


def load(config_file: str | None, *, dev_fallback: bool = False) -> Config:
    """Load the config. Client commands fall back to `relay dev`'s config when none is named
    and relay.toml does not load (it needs real secrets)."""
    import os

    from relay.config import load_config
    from relay.devmode import DEV_CONFIG

    if (
        dev_fallback
        and config_file is None
        and not os.environ.get("RELAY_CONFIG")
        and DEV_CONFIG.is_file()
    ):
        try:
            return load_config(None)
        except ConfigError:
            click.echo(f"relay: using {DEV_CONFIG} (written by relay dev)", err=True)
            return load_config(DEV_CONFIG)
    return load_config(config_file)


def open_database(config: Config) -> None:
    """Open (or create) the database and bring its schema up to date, before serving: a file
    the relay cannot use is one line naming file, key and reason, not a failed start-up."""
    from relay.config import config_error

    try:
        with_store(config, _nothing, create=True)
    except StoreError as e:
        raise config_error(config, "relay.database", str(e)) from None


async def _nothing(store: Store) -> None:
    return None


def with_store(config: Config, fn: Callable[[Store], Awaitable[T]], *, create: bool = False) -> T:
    """Run `fn` with the relay's store open (schema brought up to date first). Without
    `create`, a missing database is one line and exit 1: a read command never creates one."""
    from relay.storage import open_store, run_with

    database = config.relay.database
    if not create and isinstance(database, Path) and not database.exists():
        fail(f"no database at {database} yet (has the relay run?)")
    store = open_store(database)
    if not create:  # a read command never migrates a shared database either
        problem = database_problem_now(store)
        if problem is not None:
            fail(problem)
    return run_with(store, fn)


def database_problem_now(store: Store) -> str | None:
    """None when the store's database is reachable and migrated, else why not (one line,
    without a password)."""
    import asyncio

    return asyncio.run(store.schema_problem())


def source_named(config: Config, name: str) -> Source:
    src = config.sources.get(name)
    if src is None:
        fail(
            f"no source named {name!r} in {config.path} "
            f"(sources: {', '.join(config.sources) or 'none'})"
        )
    return src


def setup_logs(log_format: str, log_level: str) -> None:
    from relay.logs import setup_logging

    setup_logging(log_format, log_level)


LOG_OPTIONS = [
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines as text or one JSON object per line.",
    ),
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        help="Least severe level logged.",
    ),
]


def with_log_options(f: Any) -> Any:
    for option in reversed(LOG_OPTIONS):
        f = option(f)
    return f
