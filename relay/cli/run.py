"""Running things: serve, dev, sandbox, send-test."""

from __future__ import annotations

import sys

import click

from relay.cli import main
from relay.cli.common import (
    config_option,
    fail,
    load,
    open_database,
    setup_logs,
    source_named,
    with_log_options,
)


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


@main.command()
@config_option
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
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, 64),
    envvar="RELAY_WORKERS",
    show_envvar=True,
    help="Worker processes receiving webhooks (default: [relay] workers, 1).",
)
@with_log_options
def serve(
    config_file: str | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    log_format: str,
    log_level: str,
) -> None:
    """Run the gateway. SIGTERM drains and exits 0; SIGHUP reloads the mappings."""
    import dataclasses

    from relay.mapping import load_mappings
    from relay.server import serve as run_server

    # Config, mappings and database first: a mistake in them is one line on stderr, exit 1.
    config = load(config_file)
    load_mappings(config)
    if workers is not None:
        config = dataclasses.replace(
            config, relay=dataclasses.replace(config.relay, workers=workers)
        )
    host, port = host or config.relay.host, port or config.relay.port
    if config.console is not None:
        from relay.console.auth import start_problem

        problem = start_problem(config.console.enabled, config.console.token, host)
        if problem:
            fail(f"{config.path}: {problem}")
    setup_logs(log_format, log_level)
    open_database(config)
    if not run_server(config, host, port, log_format=log_format, log_level=log_level):
        if config.relay.workers > 1:
            fail("a worker failed (see the log above)")
        fail("the gateway could not start (see the log above)")


@main.command()
@click.option(
    "--port", default=8000, show_default=True, type=int, help="Port for gateway and sandbox."
)
@with_log_options
def dev(port: int, log_format: str, log_level: str) -> None:
    """Gateway plus a local sandbox track API, with generated dev secrets: try the relay now."""
    from starlette.routing import Mount

    from relay import devmode
    from relay import sandbox as sb
    from relay.config import load_config
    from relay.server import serve as run_server

    setup_logs(log_format, log_level)
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
  console: {base}/console

Next, in another terminal:
  relay send-test stripe                         # a signed checkout.session.completed
  curl -s -H 'Authorization: Bearer {key}' {base}{devmode.SANDBOX_PREFIX}/api/v1/websites/1/events
  relay status
""",
        err=True,
    )
    try:
        ok = run_server(
            config,
            "127.0.0.1",
            port,
            mounts=[Mount(devmode.SANDBOX_PREFIX, app=sandbox_app)],
            log_format=log_format,
            log_level=log_level,
        )
    finally:
        sandbox_app.state.sandbox.close()
    if not ok:
        fail("the gateway could not start (see the log above)")


@main.command("send-test")
@click.argument("source")
@click.argument("event_type", required=False)
@click.option("--url", default=None, help="Where to POST (default: this config's gateway).")
@config_option
def send_test(
    source: str, event_type: str | None, url: str | None, config_file: str | None
) -> None:
    """Sign a realistic sample webhook with SOURCE's secret and POST it to a running relay."""
    import time

    import httpx

    config = load(config_file, dev_fallback=True)
    src = source_named(config, source)
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
