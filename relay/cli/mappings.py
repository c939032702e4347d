"""Mappings: check and map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from relay.cli import main
from relay.cli.common import (
    config_option,
    fail,
    load,
    source_named,
    with_store,
)
from relay.errors import ConfigError


@main.command()
@config_option
def check(config_file: str | None) -> None:
    """Validate the config and every mapping, and run every mapping's examples."""
    from relay.config import load_config
    from relay.examples import run_examples
    from relay.mapping import load_mapping

    config = load_config(config_file)
    problems: list[str] = []
    checked: set[Any] = set()
    examples = 0
    for name, source in config.sources.items():
        try:
            mapping = load_mapping(source.mapping)
        except ConfigError as e:
            problems.append(e.message)
            continue
        if mapping.provider and mapping.provider != source.provider.kind:
            problems.append(
                f"{source.mapping}: written for provider {mapping.provider!r}, "
                f"but source {name!r} is {source.provider.kind!r}"
            )
        if source.mapping in checked:
            continue
        checked.add(source.mapping)
        problems += [e.message for e in mapping.lint()]
        problems += [str(p) for p in run_examples(mapping, source.provider, name)]
        examples += len(mapping.examples)
    problems += database_problems(config)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        fail(f"{len(problems)} problem(s) found")
    click.echo(
        f"{config.path}: ok ({len(config.sources)} source(s), {len(checked)} mapping(s), "
        f"{examples} example(s) passed)"
    )


def database_problems(config: Any) -> list[str]:
    """A PostgreSQL database that is unreachable or not migrated, in one line."""
    from relay.cli.common import database_problem_now
    from relay.storage import open_store

    if isinstance(config.relay.database, Path):
        return []
    problem = database_problem_now(open_store(config.relay.database))
    return [f"{config.path}: relay.database: {problem}"] if problem else []


@main.command("map")
@click.argument("source")
@click.argument("webhook_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--webhook",
    "webhook_id",
    type=int,
    default=None,
    help="Map a stored webhook instead of a file.",
)
@click.option(
    "--headers",
    "headers_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON object of request headers (some providers take the id or type from them).",
)
@click.option(
    "--content-type", default=None, help="Content type of the file (default: by extension)."
)
@config_option
def map_command(
    source: str,
    webhook_file: str | None,
    webhook_id: int | None,
    headers_file: str | None,
    content_type: str | None,
    config_file: str | None,
) -> None:
    """Show the events SOURCE's mapping makes from a webhook body (nothing verified or sent)."""
    import json
    from pathlib import Path

    from relay.errors import WebhookError
    from relay.mapping import load_mapping, try_body

    config = load(config_file, dev_fallback=True)
    src = source_named(config, source)
    if (webhook_file is None) == (webhook_id is None):
        fail("give a WEBHOOK_FILE or --webhook ID (one of them)")
    headers: dict[str, str] = {}
    if webhook_id is not None:
        wid = webhook_id
        hook = with_store(config, lambda store: store.webhook(wid))
        if hook is None:
            fail(f"no stored webhook with id {webhook_id} (pruned, or never stored)")
        if hook.source != source:
            fail(f"webhook {webhook_id} came to source {hook.source!r}, not {source!r}")
        body, headers = hook.body, dict(hook.headers)
        headers.setdefault("content-type", hook.content_type)
    else:
        assert webhook_file is not None
        try:
            body = Path(webhook_file).read_bytes()
        except OSError as e:
            fail(f"{webhook_file}: {e.strerror}")
        if headers_file:
            try:
                loaded = json.loads(Path(headers_file).read_text())
            except (OSError, ValueError) as e:
                fail(f"{headers_file}: not a JSON object of headers ({e})")
            if not isinstance(loaded, dict):
                fail(f"{headers_file}: not a JSON object of headers")
            headers = {str(k).lower(): str(v) for k, v in loaded.items()}
        if content_type is None and "content-type" not in headers:
            form = webhook_file.endswith((".form", ".txt"))
            content_type = "application/x-www-form-urlencoded" if form else "application/json"
        if content_type:
            headers["content-type"] = content_type
    mapping = load_mapping(src.mapping)
    try:
        mapped = try_body(mapping, src.provider, source, headers, body)
    except WebhookError as e:
        fail(f"the {src.provider.kind} provider cannot read this body: {e.reason}")
    out = []
    for ev, result in mapped:
        out.append(
            {
                "event": ev.key,
                "type": ev.type,
                "ignored": result.ignored,
                "events": [
                    {
                        "rule": mapping.rule_label(m.rule),
                        "track": m.event.to_json(),
                        "notes": list(m.notes),
                    }
                    for m in result.outputs
                ],
                "failures": [
                    {"rule": mapping.rule_label(f.rule), "reason": f.reason}
                    for f in result.failures
                ],
            }
        )
    click.echo(json.dumps(out, indent=2, ensure_ascii=False))
