"""Every shipped mapping loads, lints clean and makes exactly the events its examples expect.

The first test runs over whatever mappings/*.toml holds, so a new provider's mapping is checked
as soon as it lands. The others show that the example runner really catches differences.
"""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from pathlib import Path

import pytest

from relay.config import ConfigTable
from relay.examples import ExampleProblem, run_examples
from relay.mapping import Mapping, load_mapping
from relay.providers import PROVIDERS, provider_class
from relay.providers.base import Provider, WebhookRequest

MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
SHIPPED = sorted(MAPPINGS.glob("*.toml"))


def provider_for(mapping: Mapping) -> Provider:
    """The provider the mapping names (else the one its file is named after), unsigned."""
    kind = mapping.provider or mapping.path.stem
    assert kind in PROVIDERS, f"{mapping.path}: no provider {kind!r}; set `provider = ...`"
    module = PROVIDERS[kind].partition(":")[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"provider module {module} does not exist yet")
    cls = provider_class(kind)
    assert cls is not None
    return cls.from_config(ConfigTable({}, mapping.path), signed=False)


def test_mappings_are_shipped() -> None:
    assert MAPPINGS / "stripe.toml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_mapping(path: Path) -> None:
    mapping = load_mapping(path)
    assert [str(p) for p in mapping.lint()] == []
    assert mapping.rules, "a shipped mapping maps something"
    assert mapping.examples, "every shipped mapping has examples"
    provider = provider_for(mapping)
    problems = run_examples(mapping, provider, source=path.stem)
    assert [str(p) for p in problems] == []


def test_every_stripe_rule_has_an_example() -> None:
    mapping = load_mapping(MAPPINGS / "stripe.toml")
    provider = provider_for(mapping)
    used: set[int] = set()
    for example in mapping.examples:
        request = WebhookRequest(
            "POST",
            "https://example.com/webhooks/stripe",
            {"content-type": "application/json"},
            example.path.read_bytes(),
            0.0,
        )
        for event in provider.parse(request):
            used.update(m.rule for m in mapping.apply(event, "stripe", {}).outputs)
    assert used == set(range(len(mapping.rules)))


# --- the runner catches what differs ----------------------------------------------------------

RULES = """\
provider = "stripe"

[[events]]
on = "checkout.session.completed"
name = "purchase"
visitor_id = "{{ data.object.metadata.visitor_id }}"
url = "{{ data.object.metadata.page_url }}"
[events.payload]
order_id = "{{ data.object.id }}"
amount = "{{ data.object.amount_total | cents }}"

[[events]]
on = "checkout.session.*"
if = "data.object.mode == 'subscription'"
name = "subscribed"

"""

CHECKOUT_EXPECT = (
    '{ name = "purchase", visitor_id = "550e8400-e29b-41d4-a716-446655440000", '
    'url = "https://example.com/pricing", payload = { order_id = "cs_test_1", amount = "49.99" } }'
)


@pytest.fixture
def stripe() -> Provider:
    cls = provider_class("stripe")
    assert cls is not None
    return cls.from_config(ConfigTable({}, Path("relay.toml")), signed=False)


def example_mapping(tmp_path: Path, examples: str, rules: str = RULES) -> Mapping:
    folder = tmp_path / "examples" / "stripe"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MAPPINGS / "examples/stripe/checkout.session.completed.json", folder)
    (folder / "broken.json").write_text('{"id": "evt_1"')
    path = tmp_path / "stripe.toml"
    path.write_text(rules + textwrap.dedent(examples))
    return load_mapping(path)


def line_of(path: Path, text: str, nth: int = 1) -> int:
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line == text]
    return lines[nth - 1]


def problems_of(tmp_path: Path, stripe: Provider, expect: str) -> list[ExampleProblem]:
    mapping = example_mapping(
        tmp_path,
        f"""
        [[examples]]
        input = "examples/stripe/checkout.session.completed.json"
        expect = [{expect}]
        """,
    )
    return run_examples(mapping, stripe)


def test_a_matching_example_has_no_problems(tmp_path: Path, stripe: Provider) -> None:
    assert problems_of(tmp_path, stripe, CHECKOUT_EXPECT) == []
    # fields left out of an expectation are not checked...
    assert problems_of(tmp_path, stripe, '{ name = "purchase" }') == []


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ('{ name = "order" }', "name: expected 'order', got 'purchase'"),
        (
            '{ name = "purchase", payload = { order_id = "cs_test_1" } }',
            "payload.amount: not expected, got '49.99'",
        ),  # ...but a payload is compared exactly
        (
            '{ name = "purchase", payload = { order_id = "cs_test_1", amount = "4999" } }',
            "payload.amount: expected '4999', got '49.99'",
        ),
        (
            '{ name = "purchase", payload = { order_id = "cs_test_1", amount = "49.99", '
            'plan = "pro" } }',
            "payload.plan: expected 'pro', got nothing",
        ),
        (
            '{ name = "purchase", visitor_id = "7c9e6679-7425-40de-944b-e07fc1f90ae7" }',
            "visitor_id: expected '7c9e6679-7425-40de-944b-e07fc1f90ae7', "
            "got '550e8400-e29b-41d4-a716-446655440000'",
        ),
        (
            '{ name = "purchase", url = "" }',
            "url: expected nothing, got 'https://example.com/pricing'",
        ),
        (
            '{ name = "purchase", referrer = "https://r.example/" }',
            "referrer: expected 'https://r.example/', got nothing",
        ),
    ],
)
def test_a_differing_event_is_reported(
    tmp_path: Path, stripe: Provider, expect: str, message: str
) -> None:
    (problem,) = problems_of(tmp_path, stripe, expect)
    assert problem.index == 0
    assert problem.rule == 'events[0] (on "checkout.session.completed")'
    assert problem.message == f"event 0 (purchase): {message}"
    line = line_of(tmp_path / "stripe.toml", "[[examples]]")
    assert problem.line == line
    assert str(problem) == (
        f"{tmp_path / 'stripe.toml'}:{line}: examples[0] (input "
        "examples/stripe/checkout.session.completed.json): "
        f'events[0] (on "checkout.session.completed"): event 0 (purchase): {message}'
    )


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        (
            "",
            "expected 0 event(s) [], got 1 [purchase from events[0] "
            '(on "checkout.session.completed")]',
        ),
        (
            f'{CHECKOUT_EXPECT}, {{ name = "subscribed" }}',
            "expected 2 event(s) [purchase, subscribed], got 1 [purchase from events[0] "
            '(on "checkout.session.completed")]',
        ),
    ],
)
def test_a_different_number_of_events_is_reported(
    tmp_path: Path, stripe: Provider, expect: str, message: str
) -> None:
    (problem,) = problems_of(tmp_path, stripe, expect)
    assert problem.rule is None
    assert problem.message == message


def test_a_failing_rule_is_reported(tmp_path: Path, stripe: Provider) -> None:
    rules = RULES.replace("amount_total | cents", "customer_email | cents")
    mapping = example_mapping(
        tmp_path,
        f"""
        [[examples]]
        input = "examples/stripe/checkout.session.completed.json"
        expect = [{CHECKOUT_EXPECT}]
        """,
        rules,
    )
    (problem,) = run_examples(mapping, stripe)
    assert problem.rule == 'events[0] (on "checkout.session.completed")'
    assert problem.message == (
        "failed: payload.amount: cents: 'jenny.rosen@example.com' is not a number"
    )


def test_a_body_the_provider_refuses_is_reported(tmp_path: Path, stripe: Provider) -> None:
    mapping = example_mapping(
        tmp_path,
        """
        [[examples]]
        input = "examples/stripe/checkout.session.completed.json"
        expect = []

        [[examples]]
        input = "examples/stripe/broken.json"
        headers = { "Stripe-Signature" = "t=1,v1=00" }
        expect = []
        """,
    )
    problems = run_examples(mapping, stripe)
    assert [(p.index, p.rule) for p in problems] == [(0, None), (1, None)]
    assert problems[1].message.startswith("the stripe provider refused the body: body is not JSON")
    line = line_of(mapping.path, "[[examples]]", 2)
    assert str(problems[1]).startswith(f"{mapping.path}:{line}: examples[1] (input examples/")


def test_examples_see_their_headers_and_source(tmp_path: Path, stripe: Provider) -> None:
    rules = RULES + textwrap.dedent(
        """\
        [[events]]
        on = "*"
        name = "seen"
        payload = { id = "{{ headers['webhook-id'] }}", source = "{{ source }}" }

        """
    )
    mapping = example_mapping(
        tmp_path,
        f"""
        [[examples]]
        input = "examples/stripe/checkout.session.completed.json"
        headers = {{ "Webhook-Id" = "msg_1" }}
        expect = [
          {CHECKOUT_EXPECT},
          {{ name = "seen", payload = {{ id = "msg_1", source = "shop" }} }},
        ]
        """,
        rules,
    )
    assert mapping.examples[0].content_type == "application/json"
    assert run_examples(mapping, stripe, source="shop") == []
