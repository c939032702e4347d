"""The console in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Every request the browser makes to a host other than 127.0.0.1 is blocked and recorded, and
each test asserts there was none. With RELAY_SCREENSHOTS=docs/console the tests also write the
screenshots of docs/console.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Relay, Sandbox, stripe_event, stripe_post
from tests.consoles import TOKEN, console_relay, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("RELAY_SCREENSHOTS")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


class Browser:
    def __init__(self, page: Any, outside: list[str], problems: list[str]):
        self.page = page
        self.outside = outside  # requests to other hosts (blocked)
        self.problems = problems  # CSP violations, page errors, dialogs

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    outside: list[str] = []
    problems: list[str] = []

    def gate(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()

    def console_message(m: Any) -> None:
        # a page answered 401 (the wrong token) is expected; CSP violations and errors are not
        if m.type == "error" and "status of 401" not in m.text:
            problems.append(m.text)

    page.on("console", console_message)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    b = Browser(page, outside, problems)
    yield b
    context.close()
    assert outside == [], f"requests to other hosts: {outside}"
    assert problems == [], problems


def post_stripe(relay: Relay, event: dict[str, Any]) -> None:
    body, headers = stripe_post(event)
    r = relay.post("stripe", body, headers)
    assert r.status_code == 200, r.text


def test_a_webhook_appears_live_and_its_detail_shows_the_delivered_event(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox)
    page = browser.page
    page.goto(f"{relay.url}/console/webhooks")
    assert page.locator("tr.hook").count() == 0
    event = stripe_event()
    post_stripe(relay, event)
    row = page.locator("tr.hook").first
    row.wait_for(timeout=10_000)  # no reload: htmx asks for new rows every 2 s
    assert row.locator("td.source").inner_text() == "stripe"
    assert row.locator("td.type").inner_text() == "checkout.session.completed"
    delivered = sandbox.wait_for(1)
    wait_until(lambda: "delivered" in row_outcome(relay))
    browser.shot("webhooks")
    row.locator("a").click()
    page.wait_for_url("**/console/webhooks/*")
    assert event["id"] in page.locator("td.key").first.inner_text()
    section = page.locator("section.outbox").first
    assert section.locator(".state").inner_text() == "delivered"
    assert section.locator(".event-name").inner_text() == "purchase"
    assert section.locator(".track-id").inner_text() == str(delivered[0]["id"])
    assert '"order_id"' in section.locator("pre").inner_text()
    assert page.locator("text=(hidden)").count() == 1  # the Stripe-Signature value
    browser.shot("webhook")
    page.goto(f"{relay.url}/console/")
    assert page.locator("svg.chart rect.rx").count() == 60
    browser.shot("overview")


def row_outcome(relay: Relay) -> str:
    import httpx

    return httpx.get(f"{relay.url}/console/webhooks").text


def test_a_refused_request_shows_its_reason(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox)
    body, headers = stripe_post(stripe_event(), timestamp=int(time.time()) - 412)
    assert relay.post("stripe", body, headers).status_code == 401
    body, headers = stripe_post(stripe_event(), secret="whsec_someone_else")
    assert relay.post("stripe", body, headers).status_code == 401
    browser.page.goto(f"{relay.url}/console/")
    browser.page.get_by_role("link", name="Refused").click()
    reasons = browser.page.locator("td.reason").all_inner_texts()
    assert reasons == [
        "no signature matched, 2 secrets tried",
        "timestamp 412 s old, tolerance 300 s",
    ]
    browser.shot("refused")


def test_a_dead_letter_is_replayed_from_the_page_and_delivered(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox)
    sandbox.fault(status=400, count=1)  # the track API refuses the first request
    post_stripe(relay, stripe_event())
    page = browser.page
    page.goto(f"{relay.url}/console/dead")

    def shown() -> bool:
        page.reload()
        return page.locator("table.dead tbody tr").count() == 1

    wait_until(shown)
    assert "Replay all matching (1)" in page.content()
    browser.shot("dead-letters")
    page.locator("table.dead a").first.click()
    assert "validation_error" in page.locator("dd.reason").inner_text()  # the API's answer
    browser.shot("dead-letter")
    assert sandbox.events() == []
    page.get_by_role("button", name="Replay", exact=True).click()
    page.wait_for_url("**/console/dead?done=*")
    assert "1 dead letter(s) queued again." in page.locator("p.note").inner_text()
    assert len(sandbox.wait_for(1)) == 1
    assert page.locator("table.dead tbody tr").count() == 0


def test_sign_in_with_a_token(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox, console=f'enabled = true\ntoken = "{TOKEN}"')
    post_stripe(relay, stripe_event())
    page = browser.page
    page.goto(f"{relay.url}/console/webhooks")
    page.wait_for_url("**/console/signin")
    assert page.locator("tr.hook").count() == 0 and "stripe" not in page.content()
    browser.shot("signin")
    field = page.locator('input[type="password"]')
    field.fill("not the token")
    field.press("Enter")
    page.wait_for_load_state()
    assert page.locator(".problem").inner_text() == "Wrong token."
    page.locator('input[type="password"]').fill(TOKEN)
    page.locator('input[type="password"]').press("Enter")
    page.wait_for_url("**/console/")
    assert page.locator("h1").inner_text() == "Overview"
    cookie = next(c for c in page.context.cookies() if c["name"] == "relay_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.get_by_role("link", name="Webhooks").click()
    assert page.locator("tr.hook td.source").first.inner_text() == "stripe"


def test_the_playground_maps_a_pasted_body(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox)
    page = browser.page
    page.goto(f"{relay.url}/console/mappings")
    assert page.locator("section.mapping td").first.inner_text().startswith("events[0]")
    # the 24 h counts come after the page (htmx), a number per rule
    page.locator("td.count", has_text=re.compile(r"^\d+$")).first.wait_for(timeout=10_000)
    event = stripe_event()
    page.locator("textarea[name=body]").fill(json.dumps(event, indent=2))
    page.get_by_role("button", name="Map").click()
    result = page.locator("section.result")
    result.wait_for()
    assert result.locator(".event-name").first.inner_text() == "purchase"
    assert event["id"] in result.locator(".key").first.inner_text()
    track = json.loads(result.locator("pre.json").first.inner_text())
    assert track["payload"]["amount"] == "49.99"
    browser.shot("mappings")


def test_markup_in_webhook_fields_shows_as_text_and_runs_nothing(
    relay_factory: Callable[..., Relay], sandbox: Sandbox, browser: Browser
) -> None:
    relay = console_relay(relay_factory, sandbox)
    script = "<script>window.__pwned = 1</script>"
    img = '<img src=x onerror="window.__pwned = 2">'
    event = stripe_event(f"{img}.created")
    event["id"] = f"evt_{script}"
    event["data"]["object"]["metadata"] = {"note": f"{script} {img}"}
    post_stripe(relay, event)
    page = browser.page
    page.goto(f"{relay.url}/console/webhooks")
    row = page.locator("tr.hook").first
    assert row.locator("td.type").inner_text() == f"{img}.created"
    row.locator("a").click()
    page.wait_for_url("**/console/webhooks/*")
    assert page.locator("td.key").first.inner_text() == f"evt_{script}"
    assert script in page.locator("pre.body").inner_text()
    page.goto(f"{relay.url}/console/webhooks?q=__pwned")
    assert page.locator("tr.hook").count() == 1
    page.goto(f"{relay.url}/console/mappings")
    page.locator("select[name=source]").select_option("stripe")
    page.locator("textarea[name=body]").fill(json.dumps(event))
    page.get_by_role("button", name="Map").click()
    page.locator("section.result").wait_for()
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
