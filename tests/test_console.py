"""The console over HTTP: access, sign-in, CSRF, the CSP, refusal reasons, no secrets shown."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from relay.cli import main
from tests.conftest import API_KEY, STRIPE_SECRET, Relay, Sandbox, stripe_event, stripe_post
from tests.consoles import OTHER_SECRET, TOKEN, console_relay, csrf_of, signed_in, wait_until

PAGES = ["/console/", "/console/webhooks", "/console/refused", "/console/dead", "/console/mappings"]
CONSOLE = Path(__file__).resolve().parent.parent / "relay" / "console"


def test_without_a_console_table_console_is_404(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    for table in (None, "enabled = false"):
        relay = console_relay(relay_factory, sandbox, console=table)  # type: ignore[arg-type]
        for path in ("/console", "/console/", "/console/webhooks", "/console/static/console.css"):
            assert httpx.get(relay.url + path).status_code == 404, (table, path)


def test_every_console_response_has_a_csp_without_inline_script(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    relay = console_relay(relay_factory, sandbox, console=f'enabled = true\ntoken = "{TOKEN}"')
    client = signed_in(relay)
    anonymous = httpx.Client(base_url=relay.url)
    responses = [client.get(p) for p in PAGES]
    responses += [
        anonymous.get("/console/signin"),
        anonymous.get("/console/webhooks"),  # the redirect to the sign-in
        client.get("/console/webhooks/999"),  # a 404
        client.get("/console/static/htmx.min.js"),
        anonymous.post("/console/dead/replay"),  # a 403
    ]
    for r in responses:
        csp = r.headers.get("content-security-policy")
        assert csp, r.url
        policy = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
        assert policy["script-src"] == ["'self'"] and policy["default-src"] == ["'self'"]
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    for r in responses[: len(PAGES)]:
        assert r.status_code == 200
        # no inline script, no inline handler, nothing from another host
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text)
        assert not re.search(r"\son[a-z]+=", r.text)
        assert not re.search(r"(src|href|action)=\"(https?:)?//", r.text)


def test_sign_in_with_the_token(relay_factory: Callable[..., Relay], sandbox: Sandbox) -> None:
    relay = console_relay(relay_factory, sandbox, console=f'enabled = true\ntoken = "{TOKEN}"')
    body, headers = stripe_post(stripe_event())
    assert relay.post("stripe", body, headers).status_code == 200
    client = httpx.Client(base_url=relay.url)
    for path in [*PAGES, "/console/webhooks/1", "/console/webhooks/rows?after=0"]:
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/console/signin", path
    page = client.get("/console/signin")
    assert 'type="password"' in page.text and 'name="token"' in page.text
    wrong = client.post("/console/signin", data={"csrf": csrf_of(page.text), "token": "nope"})
    assert wrong.status_code == 401 and 'type="password"' in wrong.text
    assert "Wrong token" in wrong.text and "session" not in wrong.headers.get("set-cookie", "")
    assert client.get("/console/webhooks").status_code == 303
    r = client.post("/console/signin", data={"csrf": csrf_of(page.text), "token": TOKEN})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert "secure" not in cookie  # plain http here
    detail = client.get("/console/webhooks/1")
    assert detail.status_code == 200 and "checkout.session.completed" in detail.text


def test_a_session_cookie_cannot_be_forged(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    relay = console_relay(relay_factory, sandbox, console=f'enabled = true\ntoken = "{TOKEN}"')
    client = httpx.Client(base_url=relay.url)
    client.get("/console/signin")  # a signed session, not signed in
    raw = client.cookies["relay_console"]
    sid, expires, _, mac = raw.split(".")
    client.cookies.set("relay_console", f"{sid}.{expires}.1.{mac}", path="/console")
    assert client.get("/console/webhooks").status_code == 303


def dead_letter(relay: Relay, sandbox: Sandbox) -> int:
    sandbox.fault(status=400, count=1)
    body, headers = stripe_post(stripe_event())
    assert relay.post("stripe", body, headers).status_code == 200
    found: list[int] = []

    def dead() -> bool:
        page = httpx.get(relay.url + "/console/dead").text
        found[:] = [int(i) for i in re.findall(r'name="one" value="(\d+)"', page)]
        return bool(found)

    wait_until(dead)
    return found[0]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"origin": "http://127.0.0.1"},
        {"referer": "http://127.0.0.1/console/dead"},
        {"x-csrf-token": "0" * 40},
    ],
)
def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, headers: dict[str, str]
) -> None:
    relay = console_relay(relay_factory, sandbox)
    dead_id = dead_letter(relay, sandbox)
    client = httpx.Client(base_url=relay.url)
    page = client.get("/console/dead")
    for data in ({"one": str(dead_id)}, {"one": str(dead_id), "csrf": "wrong"}):
        r = client.post("/console/dead/replay", data=data, headers=headers)
        assert r.status_code == 403
    # another session's token does not do either
    other = httpx.Client(base_url=relay.url)
    other.get("/console/dead")
    r = other.post("/console/dead/replay", data={"one": dead_id, "csrf": csrf_of(page.text)})
    assert r.status_code == 403
    time.sleep(0.5)
    assert f'name="one" value="{dead_id}"' in client.get("/console/dead").text
    assert len(sandbox.events()) == 0
    # with its token, the same POST replays it
    r = client.post("/console/dead/replay", data={"one": dead_id, "csrf": csrf_of(page.text)})
    assert r.status_code == 303
    assert len(sandbox.wait_for(1)) == 1


def test_replay_all_matching_says_how_many_first(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    relay = console_relay(relay_factory, sandbox)
    dead_letter(relay, sandbox)
    client = httpx.Client(base_url=relay.url)
    page = client.get("/console/dead").text
    assert "Replay all matching (1)" in page
    csrf = csrf_of(page)
    # the count changed since the page was shown: it asks again, and acts on nothing yet
    r = client.post("/console/dead/replay", data={"csrf": csrf, "all": "1", "expected": "5"})
    assert r.status_code == 200 and "Replay all matching (1)" in r.text
    time.sleep(0.5)
    assert sandbox.events() == []
    r = client.post("/console/dead/replay", data={"csrf": csrf, "all": "1", "expected": "1"})
    assert r.status_code == 303
    assert len(sandbox.wait_for(1)) == 1


def test_refused_shows_the_exact_reason_and_no_signature(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    relay = console_relay(relay_factory, sandbox, console="enabled = true")
    event = stripe_event()
    old_body, old = stripe_post(event, timestamp=int(time.time()) - 412)
    bad_body, bad = stripe_post(event, secret="whsec_not_one_of_them")
    assert relay.post("stripe", old_body, old).status_code == 401
    assert relay.post("stripe", bad_body, bad).status_code == 401
    assert relay.post("stripe", b"{}", {"content-type": "application/json"}).status_code == 401
    assert relay.post("nosuch", b"{}", {}).status_code == 404
    huge = b"x" * (relay.config.relay.max_body_bytes + 1)
    assert relay.post("stripe", huge, {}).status_code == 413
    page = httpx.get(relay.url + "/console/refused").text
    reasons = re.findall(r'<td class="reason">([^<]*)</td>', page)
    assert reasons == [
        f"body over {relay.config.relay.max_body_bytes} bytes",
        "no source named &#39;nosuch&#39;",
        "missing Stripe-Signature header",
        "no signature matched, 2 secrets tried",
        "timestamp 412 s old, tolerance 300 s",
    ]
    assert "413 payload_too_large" in page and "127.0.0.1" in page
    for header in (old, bad):
        signature = header["stripe-signature"].split("v1=")[1]
        assert signature not in page
    assert STRIPE_SECRET not in page and OTHER_SECRET not in page


def test_no_page_holds_a_configured_secret(
    relay_factory: Callable[..., Relay], sandbox: Sandbox
) -> None:
    relay = console_relay(relay_factory, sandbox, console=f'enabled = true\ntoken = "{TOKEN}"')
    # a webhook that carries the secrets in its body (a sender's mistake, or an attacker's)
    event = stripe_event(description=f"{STRIPE_SECRET} {API_KEY} {TOKEN} {OTHER_SECRET}")
    body, headers = stripe_post(event)
    assert relay.post("stripe", body, headers).status_code == 200
    sandbox.wait_for(1)
    client = signed_in(relay)
    texts = [client.get(p).text for p in [*PAGES, "/console/webhooks/1"]]
    try_page = client.get("/console/mappings").text
    r = client.post(
        "/console/mappings",
        data={"csrf": csrf_of(try_page), "source": "stripe", "webhook": "1", "body": ""},
    )
    texts.append(r.text)
    assert "**********" in texts[-2]  # the body was shown, redacted
    for text in texts:
        for secret in (STRIPE_SECRET, API_KEY, TOKEN, OTHER_SECRET):
            assert secret not in text


def test_htmx_is_the_pinned_release() -> None:
    readme = (CONSOLE / "README.md").read_text()
    digest = hashlib.sha256((CONSOLE / "static" / "htmx.min.js").read_bytes()).hexdigest()
    assert f"sha256 `{digest}`" in readme and "htmx 2.0.11" in readme


@pytest.mark.parametrize(
    ("host", "token", "refused"),
    [("0.0.0.0", None, True), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False)],
)
def test_serve_beyond_loopback_needs_a_console_token(
    tmp_path: Path, host: str, token: str | None, refused: bool, sandbox: Sandbox
) -> None:
    from tests.conftest import relay_toml

    table = "\n[console]\nenabled = true\n" + (f'token = "{token}"\n' if token else "")
    config = tmp_path / "relay.toml"
    config.write_text(relay_toml(sandbox.base_url, tmp_path / "r.db") + table)
    if not refused:
        from relay.console import start_problem
        from relay.settings import Secret

        assert start_problem(True, Secret(token) if token else None, host) is None
        return
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--host", host])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "console" in lines[0] and "token" in lines[0]
    assert not (tmp_path / "r.db").exists()  # refused before anything started
