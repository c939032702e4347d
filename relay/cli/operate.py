"""Operating a relay: status and dead letters."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from relay.cli import main
from relay.cli.common import (
    RelayGroup,
    config_option,
    fail,
    load,
    with_store,
)

if TYPE_CHECKING:
    from relay.deadletters import DeadLetter
    from relay.storage import Store, StoredWebhook


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _when(ts: float | None) -> str:
    import time

    if ts is None:
        return "never"
    return f"{_age(time.time() - ts)} ago"


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_file: str | None, as_json: bool) -> None:
    """Queues per destination, pauses, dead letters and dedupe size."""
    import json

    from relay.status import read_status

    config = load(config_file, dev_fallback=True)
    sources = list(config.sources.values())
    st = with_store(config, lambda store: read_status(store, sources))
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
        return
    header = (
        "DESTINATION",
        "SOURCES",
        "PENDING",
        "IN FLIGHT",
        "OLDEST",
        "DELIVERED",
        "DEAD",
        "LAST SUCCESS",
        "STATE",
    )
    rows = [header]
    for d in st.destinations:
        rows.append(
            (
                d.name,
                ",".join(d.sources) or "-",
                str(d.pending),
                str(d.in_flight),
                _age(d.oldest_pending_age),
                str(d.delivered),
                str(d.dead),
                _when(d.last_success_at),
                f"PAUSED: {d.paused}" if d.paused else "ok",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for d in st.destinations:
        if d.last_error:
            click.echo(f"last error {d.name}: {d.last_error} ({_when(d.last_error_at)})")
    click.echo(
        f"dead letters: {st.dead_letters}   dedupe keys: {st.dedupe_keys}   "
        f"stored webhooks: {st.webhooks}"
        + (f"   not mapped yet: {st.unmapped}" if st.unmapped else "")
    )


@main.group("dead-letters", cls=RelayGroup)
def dead_letters() -> None:
    """Inspect and re-queue events the track API refused or that could not be delivered."""


@dead_letters.command("list")
@config_option
@click.option(
    "--limit", default=100, show_default=True, type=int, help="Newest first, at most this many."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dl_list(config_file: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, newest first."""
    import json
    from dataclasses import asdict

    from relay import deadletters

    config = load(config_file, dev_fallback=True)
    items = with_store(config, lambda store: deadletters.list_dead(store, limit))
    if as_json:
        click.echo(json.dumps([asdict(i) for i in items], indent=2))
        return
    if not items:
        click.echo("no dead letters")
        return
    for i in items:
        reason = (i.reason or "").replace("\n", " ")
        click.echo(
            f"{i.id:>8}  {i.source or '-'}  {i.event_type or '-'}  attempts={i.attempts}  "
            f"{_when(i.dead_at)}  {reason[:100]}"
        )


@dead_letters.command("show")
@click.argument("dead_id", type=int)
@config_option
def dl_show(dead_id: int, config_file: str | None) -> None:
    """Show one dead letter: event, reason, attempts, and the webhook it came from."""
    import json

    from relay import deadletters

    config = load(config_file, dev_fallback=True)

    async def read(store: Store) -> tuple[DeadLetter | None, StoredWebhook | None]:
        dl = await deadletters.get_dead(store, dead_id)
        hook = await store.webhook(dl.webhook_id) if dl and dl.webhook_id else None
        return dl, hook

    dl, hook = with_store(config, read)
    if dl is None:
        fail(f"no dead letter with id {dead_id}")
    click.echo(f"dead letter {dl.id}")
    click.echo(f"  destination: {dl.destination}")
    click.echo(
        f"  source: {dl.source}   event: {dl.event_key}   type: {dl.event_type}   rule: {dl.rule}"
    )
    click.echo(
        f"  attempts: {dl.attempts}   queued: {_when(dl.created_at)}   dead: {_when(dl.dead_at)}"
    )
    click.echo(f"  reason: {dl.reason}")
    click.echo("  track event: " + (dl.body if dl.body else "(none: the mapping failed)"))
    if hook is None:
        click.echo("  webhook: not stored (pruned)")
        return
    click.echo(f"  webhook {hook.id}: received {_when(hook.received_at)}, {hook.content_type}")
    click.echo("  headers: " + json.dumps(hook.headers))
    text = hook.body.decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    click.echo("  body:\n" + "\n".join("    " + line for line in text.splitlines()))


@dead_letters.command("replay")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.option("--remap", is_flag=True, help="Map the events again with the current mapping first.")
@config_option
def dl_replay(ids: tuple[int, ...], replay_all: bool, remap: bool, config_file: str | None) -> None:
    """Put dead letters back into the outbox (a running relay sends them within seconds)."""
    from relay import deadletters

    if bool(ids) == replay_all:
        fail("give dead-letter IDs or --all (one of them)")
    config = load(config_file, dev_fallback=True)
    targets = None if replay_all else list(ids)
    done, problems = with_store(
        config, lambda store: deadletters.replay(store, config, targets, remap)
    )
    for p in problems:
        click.echo(p, err=True)
    click.echo(
        f"{len(done)} dead letter(s) queued again"
        + (f": {', '.join(map(str, done))}" if done else "")
    )
    if problems:
        sys.exit(1)
