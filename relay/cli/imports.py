"""`relay import`: offline rows as events of an import source."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from relay.cli import main
from relay.cli.common import config_option, with_store
from relay.errors import ConfigError


@main.command("import")
@config_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="The file's format (default: from its extension, .csv or .jsonl).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar (default: on a terminal; plain lines otherwise).",
)
@click.argument("source")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def import_(
    config_file: str | None, fmt: str | None, progress: bool | None, source: str, file: Path
) -> None:
    """Take the rows of FILE (CSV with a header line, or JSON lines) as events of SOURCE.

    Exit 0 when every row was taken (or imported before), 1 when any row was refused, 2 when
    the file or the source cannot be used.
    """
    from relay.config import load_config
    from relay.importing import Line, Unusable, import_source, run_import

    def unusable(message: str) -> None:
        click.echo(f"relay import: {message}", err=True)
        sys.exit(2)

    try:
        config = load_config(config_file)
    except ConfigError as e:
        unusable(e.message)
    try:
        import_source(config, source)
    except Unusable as e:
        unusable(str(e))
    if not file.is_file():
        unusable(f"{file}: no such file")

    def report(line: Line) -> None:
        click.echo(f"{file}: line {line.number}: {line.error}", err=True)

    try:
        summary = with_store(
            config,
            lambda store: run_import(store, config, source, file, fmt, report, bar=progress),
            create=True,
        )
    except Unusable as e:
        unusable(str(e))
    except KeyboardInterrupt:
        click.echo(
            "relay import: interrupted; the rows stored so far are kept, and running the same "
            "import again takes the rest",
            err=True,
        )
        sys.exit(130)
    parts = [f"{summary.rows:,} rows read", f"{summary.taken:,} taken"]
    parts.append(f"{summary.events:,} events queued")
    if summary.duplicates:
        parts.append(f"{summary.duplicates:,} imported before")
    if summary.refused:
        parts.append(f"{summary.refused:,} refused")
    click.echo(f"{file}: {', '.join(parts)}")
    sys.exit(summary.exit_code)
