"""The `relay` command: a thin click layer over the library."""

from __future__ import annotations

import click

from relay import __version__
from relay.cli.common import RelayGroup


@click.group(cls=RelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """A self-hosted webhook relay: verify, dedupe, store, map, and forward in batches."""


# Each module adds its commands to `main`.
from relay.cli import imports, mappings, operate, run  # noqa: E402

__all__ = ["imports", "main", "mappings", "operate", "run"]
