"""The `relay` command: a thin click layer over the library."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from relay import __version__
from relay.errors import ConfigError, StoreError

if TYPE_CHECKING:
    import sqlite3

    from relay.config import Config, Source


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


@click.group(cls=RelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """A self-hosted webhook relay: verify, dedupe, store, map, and forward in batches."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8001, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="An API key to accept (repeatable). Made up and printed when absent.",
)
@click.option(
    "--website-id",
    "website_ids",
    multiple=True,
    type=int,
    help="A website the keys own (repeatable). Default: 1.",
)
@click.option(
    "--requests-per-minute",
    default=60,
    show_default=True,
    type=int,
    help="Rate limit per API key (sliding 60 s window).",
)
@click.option(
    "--database", default="sandbox.db", show_default=True, help="SQLite file for accepted events."
)
@click.option(
    "--monthly-quota",
    type=int,
    default=None,
    help="Accepted events per key per month (402 beyond). Default: unlimited.",
)
@click.option(
    "--plan",
    type=click.Choice(["pro", "free"]),
    default="pro",
    show_default=True,
    help="'free' answers every track request 403 plan_required.",
)
def sandbox(
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    website_ids: tuple[int, ...],
    requests_per_minute: int,
    database: str,
    monthly_quota: int | None,
    plan: str,
) -> None:
    """Run the local track API alone (a faithful implementation of the reference)."""
    from relay import sandbox as sb

    sb.run(
        host=host,
        port=port,
        api_keys=list(api_keys),
        website_ids=list(website_ids) or [1],
        requests_per_minute=requests_per_minute,
        database=database,
        monthly_quota=monthly_quota,
        plan=plan,
    )


# -- shared options ---------------------------------------------------------------------------


def _config_option(f: Any) -> Any:
    return click.option(
        "--config",
        "config_file",
        default=None,
        metavar="FILE",
        help="Config file (default: $RELAY_CONFIG, else relay.toml).",
    )(f)


def _load(config_file: str | None, *, dev_fallback: bool = False) -> Config:
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


def _reader(config: Config) -> sqlite3.Connection:
    """A read connection to the relay's database; a read command never creates one."""
    from relay.store import Store

    if not config.relay.database.exists():
        fail(f"no database at {config.relay.database} yet (has the relay run?)")
    return Store.reader_of(config.relay.database)


def _source(config: Config, name: str) -> Source:
    src = config.sources.get(name)
    if src is None:
        fail(
            f"no source named {name!r} in {config.path} "
            f"(sources: {', '.join(config.sources) or 'none'})"
        )
    return src


def _setup_logs(log_format: str, log_level: str) -> None:
    from relay.logs import setup_logging

    setup_logging(log_format, log_level)


_log_options = [
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


def _with_log_options(f: Any) -> Any:
    for option in reversed(_log_options):
        f = option(f)
    return f


# -- serve and dev --------------------------------------------------------------------------


@main.command()
@_config_option
@click.option(
    "--host",
    default=None,
    envvar="RELAY_HOST",
    show_envvar=True,
    help="Interface to listen on (default: [relay] host).",
)
@click.option(
    "--port",
    default=None,
    type=int,
    envvar="RELAY_PORT",
    show_envvar=True,
    help="Port (default: [relay] port).",
)
@_with_log_options
def serve(
    config_file: str | None, host: str | None, port: int | None, log_format: str, log_level: str
) -> None:
    """Run the gateway. SIGTERM drains and exits 0; SIGHUP reloads the mappings."""
    from relay.ingest import load_mappings
    from relay.server import serve as run_server

    # Config and mappings first: a mistake in them is one line on stderr, exit 1.
    config = _load(config_file)
    load_mappings(config)
    _setup_logs(log_format, log_level)
    if not run_server(config, host or config.relay.host, port or config.relay.port):
        fail("the gateway could not start (see the log above)")


@main.command()
@click.option(
    "--port", default=8000, show_default=True, type=int, help="Port for gateway and sandbox."
)
@_with_log_options
def dev(port: int, log_format: str, log_level: str) -> None:
    """Gateway plus a local sandbox track API, with generated dev secrets: try the relay now."""
    from starlette.routing import Mount

    from relay import devmode
    from relay import sandbox as sb
    from relay.config import load_config
    from relay.server import serve as run_server

    _setup_logs(log_format, log_level)
    path = devmode.write_dev_config(port)
    config = load_config(path)
    key = devmode.api_key()
    sandbox_app = sb.create_app([key], [1], database=devmode.DEV_DIR / "sandbox.db")
    base = f"http://127.0.0.1:{port}"
    names = ", ".join(config.sources)
    click.echo(
        f"""
relay dev: gateway and sandbox track API on {base}
  config (with generated dev secrets): {path}
  sources: {names}
  webhook URL: {base}/webhooks/<source>   e.g. {base}/webhooks/stripe
  sandbox API key: {key}

Next, in another terminal:
  relay send-test stripe                         # a signed checkout.session.completed
  curl -s -H 'Authorization: Bearer {key}' {base}{devmode.SANDBOX_PREFIX}/api/v1/websites/1/events
  relay status
""",
        err=True,
    )
    try:
        ok = run_server(
            config, "127.0.0.1", port, mounts=[Mount(devmode.SANDBOX_PREFIX, app=sandbox_app)]
        )
    finally:
        sandbox_app.state.sandbox.close()
    if not ok:
        fail("the gateway could not start (see the log above)")


# -- send-test --------------------------------------------------------------------------------


@main.command("send-test")
@click.argument("source")
@click.argument("event_type", required=False)
@click.option("--url", default=None, help="Where to POST (default: this config's gateway).")
@_config_option
def send_test(
    source: str, event_type: str | None, url: str | None, config_file: str | None
) -> None:
    """Sign a realistic sample webhook with SOURCE's secret and POST it to a running relay."""
    import time

    import httpx

    config = _load(config_file, dev_fallback=True)
    src = _source(config, source)
    known = src.provider.sample_types
    if event_type is not None and known and event_type not in known:
        fail(f"{src.provider.kind} samples: {', '.join(known)} (not {event_type!r})")
    if url is None:
        host = config.relay.host if config.relay.host not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{host}:{config.relay.port}/webhooks/{source}"
    try:
        sample = src.provider.sample(event_type, url, time.time())
    except NotImplementedError as e:
        fail(str(e))
    try:
        response = httpx.post(url, content=sample.body, headers=sample.headers, timeout=10)
    except httpx.HTTPError as e:
        fail(f"cannot reach {url}: {e} (is `relay dev` or `relay serve` running?)")
    click.echo(
        f"POST {url} ({event_type or (known[0] if known else 'sample')}, {len(sample.body)} bytes)"
    )
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        sys.exit(1)


# -- check and map ----------------------------------------------------------------------------


@main.command()
@_config_option
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
    if problems:
        for p in problems:
            click.echo(p, err=True)
        fail(f"{len(problems)} problem(s) found")
    click.echo(
        f"{config.path}: ok ({len(config.sources)} source(s), {len(checked)} mapping(s), "
        f"{examples} example(s) passed)"
    )


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
@_config_option
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
    import time
    from pathlib import Path

    from relay import deadletters
    from relay.errors import WebhookError
    from relay.mapping import load_mapping
    from relay.providers.base import WebhookRequest

    config = _load(config_file, dev_fallback=True)
    src = _source(config, source)
    if (webhook_file is None) == (webhook_id is None):
        fail("give a WEBHOOK_FILE or --webhook ID (one of them)")
    headers: dict[str, str] = {}
    if webhook_id is not None:
        conn = _reader(config)
        try:
            hook = deadletters.webhook(conn, webhook_id)
        finally:
            conn.close()
        if hook is None:
            fail(f"no stored webhook with id {webhook_id} (pruned, or never stored)")
        if hook["source"] != source:
            fail(f"webhook {webhook_id} came to source {hook['source']!r}, not {source!r}")
        body, headers = hook["body"], dict(hook["headers"])
        headers.setdefault("content-type", hook["content_type"])
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
    url = f"http://localhost/webhooks/{source}"
    request = WebhookRequest("POST", url, headers, body, time.time())
    try:
        events = src.provider.parse(request)
    except WebhookError as e:
        fail(f"the {src.provider.kind} provider cannot read this body: {e.reason}")
    mapping = load_mapping(src.mapping)
    out = []
    for ev in events:
        result = mapping.apply(ev, source, headers)
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


# -- status and dead letters ------------------------------------------------------------------


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
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_file: str | None, as_json: bool) -> None:
    """Queues per destination, pauses, dead letters and dedupe size."""
    import json

    from relay.status import read_status

    config = _load(config_file, dev_fallback=True)
    conn = _reader(config)
    try:
        st = read_status(conn, list(config.sources.values()))
    finally:
        conn.close()
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
    )


@main.group("dead-letters", cls=RelayGroup)
def dead_letters() -> None:
    """Inspect and re-queue events the track API refused or that could not be delivered."""


@dead_letters.command("list")
@_config_option
@click.option(
    "--limit", default=100, show_default=True, type=int, help="Newest first, at most this many."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dl_list(config_file: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, newest first."""
    import json
    from dataclasses import asdict

    from relay import deadletters

    config = _load(config_file, dev_fallback=True)
    conn = _reader(config)
    try:
        items = deadletters.list_dead(conn, limit)
    finally:
        conn.close()
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
@_config_option
def dl_show(dead_id: int, config_file: str | None) -> None:
    """Show one dead letter: event, reason, attempts, and the webhook it came from."""
    import json

    from relay import deadletters

    config = _load(config_file, dev_fallback=True)
    conn = _reader(config)
    try:
        dl = deadletters.get_dead(conn, dead_id)
        hook = deadletters.webhook(conn, dl.webhook_id) if dl and dl.webhook_id else None
    finally:
        conn.close()
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
    click.echo(
        f"  webhook {hook['id']}: received {_when(hook['received_at'])}, {hook['content_type']}"
    )
    click.echo("  headers: " + json.dumps(hook["headers"]))
    text = hook["body"].decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    click.echo("  body:\n" + "\n".join("    " + line for line in text.splitlines()))


@dead_letters.command("replay")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.option("--remap", is_flag=True, help="Map the events again with the current mapping first.")
@_config_option
def dl_replay(ids: tuple[int, ...], replay_all: bool, remap: bool, config_file: str | None) -> None:
    """Put dead letters back into the outbox (a running relay sends them within seconds)."""
    from relay import deadletters
    from relay.store import Store

    if bool(ids) == replay_all:
        fail("give dead-letter IDs or --all (one of them)")
    config = _load(config_file, dev_fallback=True)
    if not config.relay.database.exists():
        fail(f"no database at {config.relay.database} yet (has the relay run?)")
    store = Store(config.relay.database)
    try:
        done, problems = store.writer.call(
            lambda c: deadletters.replay(c, config, None if replay_all else list(ids), remap)
        )
    finally:
        store.close()
    for p in problems:
        click.echo(p, err=True)
    click.echo(
        f"{len(done)} dead letter(s) queued again"
        + (f": {', '.join(map(str, done))}" if done else "")
    )
    if problems:
        sys.exit(1)
