"""The `relay` command: a thin click layer over the library."""

from __future__ import annotations

import sys
from typing import Any

import click

from relay import __version__
from relay.errors import ConfigError


def fail(message: str) -> None:
    click.echo(f"relay: {message}", err=True)
    sys.exit(1)


class RelayGroup(click.Group):
    """Turns ConfigError into one clear line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            fail(e.message)


@click.group(cls=RelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """A self-hosted webhook relay: verify, dedupe, store, map, and forward in batches."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8001, show_default=True, type=int, help="Port to listen on.")
@click.option("--api-key", "api_keys", multiple=True, help="An API key to accept (repeatable). Made up and printed when absent.")
@click.option("--website-id", "website_ids", multiple=True, type=int, help="A website the keys own (repeatable). Default: 1.")
@click.option("--requests-per-minute", default=60, show_default=True, type=int, help="Rate limit per API key (sliding 60 s window).")
@click.option("--database", default="sandbox.db", show_default=True, help="SQLite file for accepted events.")
def sandbox(host: str, port: int, api_keys: tuple[str, ...], website_ids: tuple[int, ...],
            requests_per_minute: int, database: str) -> None:
    """Run the local track API alone (a faithful implementation of the reference)."""
    from relay import sandbox as sb

    sb.run(host=host, port=port, api_keys=list(api_keys), website_ids=list(website_ids) or [1],
           requests_per_minute=requests_per_minute, database=database)
