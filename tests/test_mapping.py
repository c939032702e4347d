"""Mappings: matching, rendering, filters, fitting, load errors and the sandbox."""

from __future__ import annotations

import functools
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import ConfigError
from relay.fitting import TrackEvent
from relay.mapping import Mapping, MapResult, load_mapping
from relay.providers.base import ProviderEvent

VID = "550e8400-e29b-41d4-a716-446655440000"

MakeMapping = Callable[[str], Mapping]


@pytest.fixture
def make_mapping(tmp_path: Path) -> MakeMapping:
    def make(text: str) -> Mapping:
        path = tmp_path / "m.toml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return load_mapping(path)

    return make


def ev(type_: str, data: dict[str, Any] | None = None) -> ProviderEvent:
    body = {"id": "evt_1", "type": type_} if data is None else data
    return ProviderEvent(key="evt_1", type=type_, data=body)


def apply(
    mapping: Mapping,
    event: ProviderEvent,
    source: str = "stripe",
    headers: dict[str, str] | None = None,
) -> MapResult:
    return mapping.apply(event, source, headers or {})


def names(result: MapResult) -> list[str]:
    return [m.event.name for m in result.outputs]


def only(result: MapResult) -> TrackEvent:
    assert not result.failures, result.failures
    assert len(result.outputs) == 1, result.outputs
    return result.outputs[0].event


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "event_type", "matches"),
    [
        ('"invoice.paid"', "invoice.paid", True),
        ('"invoice.paid"', "invoice.paid.extra", False),
        ('"invoice.paid"', "Invoice.Paid", False),  # case-sensitive
        ('"customer.subscription.*"', "customer.subscription.created", True),
        ('"customer.subscription.*"', "customer.subscription.deleted", True),
        ('"customer.subscription.*"', "customer.created", False),
        ('"customer.Subscription.*"', "customer.subscription.created", False),
        ('"*"', "anything.at.all", True),
        ('"invoice.pa?d"', "invoice.paid", True),
        ('"invoice.[op]*"', "invoice.paid", True),
        ('"invoice.[!p]*"', "invoice.paid", False),
        ('["invoice.paid", "charge.*"]', "charge.refunded", True),
        ('["invoice.paid", "charge.*"]', "invoice.paid", True),
        ('["invoice.paid", "charge.*"]', "invoice.created", False),
    ],
)
def test_on_globs(make_mapping: MakeMapping, on: str, event_type: str, matches: bool) -> None:
    m = make_mapping(f'[[events]]\non = {on}\nname = "hit"\n')
    result = apply(m, ev(event_type))
    assert names(result) == (["hit"] if matches else [])
    assert result.ignored is not matches


def test_every_matching_rule_emits_in_file_order(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "invoice.*"
        name = "first"
        [[events]]
        on = "charge.refunded"
        name = "never"
        [[events]]
        on = ["invoice.paid"]
        name = "second"
        [[events]]
        on = "*"
        name = "third"
        """
    )
    result = apply(m, ev("invoice.paid"))
    assert names(result) == ["first", "second", "third"]
    assert [o.rule for o in result.outputs] == [0, 2, 3]
    assert m.rule_label(2) == 'events[2] (on "invoice.paid")'


@pytest.mark.parametrize(
    ("condition", "emitted"),
    [
        ("data.object.payment_status == 'paid'", True),
        ("data.object.payment_status == 'unpaid'", False),
        ("data.object.amount_total > 1000", True),
        ("data.object.missing", False),  # undefined is falsy
        ("data.object.missing.deeper", False),
        ("data.object.metadata", False),  # empty object
        ("source == 'shop'", True),
        ("headers['x-env'] == 'live'", True),
        ("type.startswith('checkout.')", True),
        ("'plan' in data.object", False),
    ],
)
def test_if_selects(make_mapping: MakeMapping, condition: str, emitted: bool) -> None:
    m = make_mapping(
        f"""
        [[events]]
        on = "checkout.session.completed"
        if = "{condition}"
        name = "purchase"
        """
    )
    data = {"data": {"object": {"payment_status": "paid", "amount_total": 4999, "metadata": {}}}}
    result = apply(m, ev("checkout.session.completed", data), "shop", {"X-Env": "live"})
    assert names(result) == (["purchase"] if emitted else [])
    assert not result.failures


def test_rule_attributes_and_provider(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        provider = "stripe"
        [[events]]
        on = ["a.*", "b"]
        name = "{{ type | replace('.', '_') }}"
        """
    )
    assert m.provider == "stripe"
    (rule,) = m.rules
    assert (rule.index, rule.on) == (0, ("a.*", "b"))
    assert rule.name_field.source == "{{ type | replace('.', '_') }}"
    assert m.rule_label(0) == 'events[0] (on "a.*", "b")'
    assert only(apply(m, ev("a.x"))).name == "a_x"


# --- rendering --------------------------------------------------------------------------------

CHECKOUT = """
[[events]]
on = "checkout.session.completed"
name = "purchase"
visitor_id = "{{ data.object.metadata.visitor_id }}"
url = "{{ data.object.metadata.page_url }}"
referrer = "{{ data.object.metadata.referrer }}"
[events.payload]
order_id = "{{ data.object.id }}"
amount = "{{ data.object.amount_total | cents }}"
currency = "{{ data.object.currency | upper }}"
plan = "{{ data.object.metadata.plan }}"
note = "{{ data.object.note }}   "
"""


def checkout(**obj: Any) -> ProviderEvent:
    base = {"id": "cs_test_1", "amount_total": 4999, "currency": "usd"}
    return ev(
        "checkout.session.completed",
        {"type": "checkout.session.completed", "data": {"object": {**base, **obj}}},
    )


def test_fields_render_from_the_event(make_mapping: MakeMapping) -> None:
    m = make_mapping(CHECKOUT)
    meta = {
        "visitor_id": VID,
        "page_url": "https://example.com/pricing",
        "plan": "pro",
        "referrer": "https://news.example/",
    }
    event = only(apply(m, checkout(metadata=meta, note="gift")))
    assert event == TrackEvent(
        "purchase",
        {
            "order_id": "cs_test_1",
            "amount": "49.99",
            "currency": "USD",
            "plan": "pro",
            "note": "gift",
        },
        VID,
        "https://example.com/pricing",
        "https://news.example/",
    )


def test_missing_and_empty_fields_are_dropped(make_mapping: MakeMapping) -> None:
    m = make_mapping(CHECKOUT)
    # no metadata at all: nested lookups render empty instead of failing
    event = only(apply(m, checkout(note="  ")))
    payload = {"order_id": "cs_test_1", "amount": "49.99", "currency": "USD"}
    assert event == TrackEvent("purchase", payload)
    assert event.to_json() == {"name": "purchase", "payload": payload}


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (None, None),  # JSON null is absent, not "None"
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (12.5, "12.5"),
        ({"a": [1, "b"]}, '{"a":[1,"b"]}'),
        ([], "[]"),
        ("", None),
        ("  padded  ", "padded"),
    ],
)
def test_json_values_render_as_json_would(
    make_mapping: MakeMapping, value: Any, rendered: str | None
) -> None:
    m = make_mapping('[[events]]\non = "t"\nname = "n"\npayload = { v = "{{ data.v }}" }\n')
    event = only(apply(m, ev("t", {"data": {"v": value}})))
    assert event.payload.get("v") == rendered


def test_json_keys_win_over_dict_methods(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "t"
        name = "n"
        [events.payload]
        items = "{{ sub.items.data[0].price.nickname }}"
        keys = "{{ sub.keys }}"
        values = "{{ sub['values'] }}"
        get = "{{ sub.get('keys') }}"
        """
    )
    items = {"data": [{"price": {"nickname": "pro"}}]}
    data = {"sub": {"items": items, "keys": "k", "values": "v"}}
    assert only(apply(m, ev("t", data))).payload == {
        "items": "pro",
        "keys": "k",
        "values": "v",
        "get": "k",
    }


def test_templates_see_event_type_source_and_headers(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "*"
        name = "{{ type }}"
        [events.payload]
        top = "{{ id }}"
        whole = "{{ event.id }}"
        source = "{{ source }}"
        header = "{{ headers['webhook-id'] }}"
        auth = "{{ headers.authorization }}{{ headers['proxy-authorization'] }}{{ headers.cookie }}"
        shadowed = "{{ event is mapping }}"
        """
    )
    data = {"id": "evt_9", "event": "delivered", "source": "spoofed"}
    headers = {
        "Webhook-ID": "msg_1",
        "Authorization": "Basic c2VjcmV0",
        "Cookie": "s=1",
        "Proxy-Authorization": "Basic eA==",
    }
    event = only(apply(m, ev("email.delivered", data), "mail", headers))
    assert event.name == "email.delivered"
    # the four names of the context win over event fields; credentials are not shown
    assert event.payload == {
        "top": "evt_9",
        "whole": "evt_9",
        "source": "mail",
        "header": "msg_1",
        "shadowed": "true",
    }


def test_everything_jinja_offers_still_works(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "t"
        name = "{{ data.kind | lower | replace('-', '_') }}"
        [events.payload]
        default = "{{ data.missing | default('none') }}"
        tags = "{{ data.tags | join(',') }}"
        block = '''
          {% if data.count > 1 %}many{% else %}one{% endif %}
        '''
        set = "{% set n = data.count * 2 %}{{ n }}"
        after_set = "{{ n }}"
        """
    )
    data = {"kind": "Order-Placed", "tags": ["a", "b"], "count": 3}
    event = only(apply(m, ev("t", {"data": data})))
    assert event.name == "order_placed"
    # a {% set %} stays inside its own field
    assert event.payload == {"default": "none", "tags": "a,b", "block": "many", "set": "6"}


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "value", "rendered"),
    [
        ("{{ v | cents }}", 4999, "49.99"),
        ("{{ v | cents }}", "4999", "49.99"),
        ("{{ v | cents }}", " 4999 ", "49.99"),
        ("{{ v | cents }}", 5, "0.05"),
        ("{{ v | cents }}", 0, "0.00"),
        ("{{ v | cents }}", -1250, "-12.50"),
        ("{{ v | cents }}", 123456789012345678, "1234567890123456.78"),
        ("{{ v | cents(0) }}", 4900, "4900"),
        ("{{ v | cents(3) }}", 5124, "5.124"),
        ("{{ v | cents('jpy') }}", 4900, "4900"),
        ("{{ v | cents('KWD') }}", 5124, "5.124"),
        ("{{ v | cents('usd') }}", 4999, "49.99"),
        ("{{ v | cents(nothing) }}", 4999, "49.99"),
        ("{{ v | cents }}", None, None),
        ("{{ nothing | cents }}", None, None),
        (
            "{{ v | sha256 }}",
            "jenny@example.com",
            "2bb1c62d1d1a1eb20e95be953a9c86c30a50f38d297efa475d636d580ed7f696",
        ),
        (
            "{{ v | sha256(normalize=true) }}",
            "  Jenny@Example.COM ",
            "2bb1c62d1d1a1eb20e95be953a9c86c30a50f38d297efa475d636d580ed7f696",
        ),
        ("{{ v | sha256(normalize=true) }}", "   ", None),
        ("{{ nothing | sha256 }}", None, None),
        ("{{ v | iso8601 }}", 1714564800, "2024-05-01T12:00:00Z"),
        ("{{ v | iso8601 }}", 1714564800000, "2024-05-01T12:00:00Z"),
        ("{{ v | iso8601 }}", 1714564800123, "2024-05-01T12:00:00.123Z"),
        ("{{ v | iso8601 }}", "1714564800", "2024-05-01T12:00:00Z"),
        ("{{ v | iso8601 }}", 1714564800.5, "2024-05-01T12:00:00.500Z"),
        ("{{ v | iso8601 }}", 0, "1970-01-01T00:00:00Z"),
        ("{{ nothing | iso8601 }}", None, None),
        ("{{ v | truncate_to(5) }}", "abcdefgh", "abcde"),
        ("{{ v | truncate_to(50) }}", "abc", "abc"),
        ("{{ v | truncate_to(2) }}", 12345, "12"),
    ],
)
def test_filters(
    make_mapping: MakeMapping, template: str, value: Any, rendered: str | None
) -> None:
    m = make_mapping(f'[[events]]\non = "t"\nname = "n"\npayload = {{ out = "{template}" }}\n')
    assert only(apply(m, ev("t", {"v": value}))).payload.get("out") == rendered


def test_sha256_is_the_plain_hex_digest() -> None:
    import hashlib

    from relay.filters import sha256

    assert sha256("jenny@example.com") == hashlib.sha256(b"jenny@example.com").hexdigest()
    assert sha256("  Jenny@Example.COM ", normalize=True) == sha256("jenny@example.com")
    assert sha256("  Jenny@Example.COM ") != sha256("jenny@example.com")


@pytest.mark.parametrize(
    ("template", "value", "reason"),
    [
        ("{{ v | cents }}", "abc", "payload.out: cents: 'abc' is not a number"),
        ("{{ v | cents }}", "12.5", "payload.out: cents: '12.5' is not a whole number"),
        ("{{ v | cents }}", True, "payload.out: cents: True is not a number"),
        ("{{ v | cents }}", [1], "payload.out: cents: [1] is not a number"),
        ("{{ v | cents }}", "nan", "payload.out: cents: 'nan' is not a finite number"),
        ("{{ v | cents(-1) }}", 1, "payload.out: cents: digits must be"),
        ("{{ v | iso8601 }}", "yesterday", "payload.out: iso8601: 'yesterday' is not a number"),
        ("{{ v | iso8601 }}", 10**30, "payload.out: iso8601: 10000000000000000000000"),
        ("{{ v | iso8601 }}", 10**16, "payload.out: iso8601: 10000000000000000 is out of range"),
        ("{{ v | truncate_to(-1) }}", "abc", "payload.out: truncate_to: length must be"),
    ],
)
def test_filter_errors_fail_the_rule_with_a_clear_reason(
    make_mapping: MakeMapping, template: str, value: Any, reason: str
) -> None:
    m = make_mapping(f'[[events]]\non = "t"\nname = "n"\npayload = {{ out = "{template}" }}\n')
    result = apply(m, ev("t", {"v": value}))
    assert result.outputs == ()
    (failure,) = result.failures
    assert failure.rule == 0
    assert failure.reason.startswith(reason)


# --- failures are per rule and apply never raises ---------------------------------------------

ISOLATION = """
[[events]]
on = "*"
name = "ok_before"
[[events]]
on = "*"
name = "bad"
payload = { amount = "{{ data.amount | cents }}" }
[[events]]
on = "*"
name = "{{ data.name }}"
[[events]]
on = "*"
if = "data.amount + 1"
name = "bad_if"
[[events]]
on = "*"
name = "ok_after"
payload = { raw = "{{ data.amount }}" }
"""


def test_a_failing_rule_does_not_stop_the_others(make_mapping: MakeMapping) -> None:
    m = make_mapping(ISOLATION)
    result = apply(m, ev("t", {"data": {"amount": "abc"}}))
    assert names(result) == ["ok_before", "ok_after"]
    assert [o.rule for o in result.outputs] == [0, 4]
    assert [(f.rule, f.reason) for f in result.failures] == [
        (1, "payload.amount: cents: 'abc' is not a number"),
        (2, "name is empty: event dropped"),
        (3, 'if: TypeError: can only concatenate str (not "int") to str'),
    ]
    assert not result.ignored


def test_the_same_rules_work_on_good_data(make_mapping: MakeMapping) -> None:
    m = make_mapping(ISOLATION)
    result = apply(m, ev("t", {"data": {"amount": 250, "name": "named"}}))
    assert names(result) == ["ok_before", "bad", "named", "bad_if", "ok_after"]
    assert result.outputs[1].event.payload == {"amount": "2.50"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@functools.cache
def stripe_mapping() -> Mapping:
    return load_mapping(Path(__file__).parent.parent / "mappings" / "stripe.toml")


FIELDS = [
    "id",
    "amount_total",
    "amount_paid",
    "currency",
    "metadata",
    "items",
    "data",
    "price",
    "payment_status",
    "visitor_id",
    "canceled_at",
    "refunded",
    "parent",
    "status",
    "0",
]
objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


@settings(max_examples=200, deadline=None)
@given(obj=objects, top=objects, type_index=st.integers(0, 20))
def test_apply_never_raises_whatever_the_data(
    obj: dict[str, Any], top: dict[str, Any], type_index: int
) -> None:
    mapping = stripe_mapping()
    types = [p for rule in mapping.rules for p in rule.on]
    body = {**top, "data": {"object": obj, "previous_attributes": obj}}
    mapping.apply(ev(types[type_index % len(types)], body), "stripe", {"x": "y"})  # no raise


@pytest.mark.parametrize(
    ("data", "payload"),
    [
        ([1, {"a": 2}], {"e": '[1,{"a":2}]'}),
        ("text", {"e": "text"}),
        (7, {"e": "7"}),
        (None, {}),
        ({1: "int key", "b": 2}, {"e": '{"1":"int key","b":2}', "b": "2"}),
    ],
)
def test_event_data_of_any_shape_is_mapped(
    make_mapping: MakeMapping, data: Any, payload: dict[str, str]
) -> None:
    fields = 'payload = { e = "{{ event }}", b = "{{ b }}" }'
    m = make_mapping(f'[[events]]\non = "*"\nname = "n"\n{fields}\n')
    assert only(m.apply(ProviderEvent("k", "t", data), "s", {})).payload == payload


# --- webhook data is only data ----------------------------------------------------------------


def test_webhook_data_is_never_evaluated_as_a_template(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "*"
        name = "{{ data.name }}"
        visitor_id = "{{ data.vid }}"
        payload = { a = "{{ data.a }}", b = "{{ data.b }}", c = "{{ data.c }}" }
        """
    )
    data = {
        "name": "{{ 7*7 }}",
        "a": "{% for i in range(3) %}{{ i }}{% endfor %}",
        "b": "{{ ''.__class__.__mro__ }}",
        "c": "{#",
        "vid": "{{ '" + VID + "' }}",
    }
    result = apply(m, ev("t", {"data": data}))
    event = only(result)
    assert event.name == "{{ 7*7 }}"
    assert event.payload == {"a": data["a"], "b": data["b"], "c": "{#"}
    assert event.visitor_id is None  # the literal text is not a UUID
    assert result.outputs[0].notes == ("visitor_id is not a UUID: dropped",)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ data['__class__'] }}",
        "{% if true %}{{ self.__init__ }}{% endif %}",
        "{{ (data|attr('x')).__class__ }}",
    ],
)
def test_reaching_python_internals_is_refused_at_load(tmp_path: Path, template: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        f'[[events]]\non = "*"\nname = "n"\n[events.payload]\nx = {json.dumps(template)}\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping(path)
    assert caught.value.key == "events[0].payload.x"
    assert caught.value.line == 5
    assert "unsafe" in caught.value.reason


@pytest.mark.parametrize(
    ("template", "data"),
    [
        # attribute names chosen by the webhook body reach the sandbox at render time
        ("{{ source[data.attr] }}", {"attr": "__class__"}),
        ("{{ source | attr(data.attr) }}", {"attr": "__class__"}),
        ("{{ data[data.attr] }}", {"attr": "__init__"}),
        ("{{ data.fmt.format(1) }}", {"fmt": "{0.__class__.__mro__}"}),
        ("{{ data.fmt.format_map(data) }}", {"fmt": "{fmt.__class__}"}),
        ("{{ data.update({'attr': 'changed'}) }}", {"attr": "x"}),
        ("{{ data.tags.append('x') }}", {"tags": []}),
    ],
)
def test_sandbox_refusals_at_render_are_failures_that_leak_nothing(
    make_mapping: MakeMapping, template: str, data: dict[str, Any]
) -> None:
    m = make_mapping(
        f"""
        [[events]]
        on = "*"
        name = "bad"
        payload = {{ x = {json.dumps(template)} }}
        [[events]]
        on = "*"
        name = "after"
        payload = {{ attr = "{{{{ data.attr }}}}", tags = "{{{{ data.tags | length }}}}" }}
        """
    )
    result = apply(m, ev("t", {"data": dict(data)}))
    (failure,) = result.failures
    assert failure.rule == 0
    assert "sandbox" in failure.reason or "unsafe" in failure.reason
    assert "<class" not in failure.reason
    # the refused rule changed nothing the next rule sees
    (after,) = result.outputs
    assert after.event.name == "after"
    assert after.event.payload.get("attr") == data.get("attr")
    assert after.event.payload.get("tags") == "0"


# --- fitting is applied -----------------------------------------------------------------------


def test_outputs_are_fitted_and_the_cuts_noted(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        """
        [[events]]
        on = "t"
        name = "{{ data.name }}"
        visitor_id = "{{ data.vid }}"
        [events.payload]
        description = "{{ data.text }}"
        """
    )
    result = apply(m, ev("t", {"data": {"name": "n" * 200, "vid": "cus_1", "text": "x" * 300}}))
    (out,) = result.outputs
    assert out.event == TrackEvent("n" * 128, {"description": "x" * 255})
    assert out.notes == (
        "name cut to 128 characters",
        "payload.description cut to 255 characters",
        "visitor_id is not a UUID: dropped",
    )


# --- load errors ------------------------------------------------------------------------------

LOAD_ERRORS: list[tuple[str, str, str | None, int | None, str]] = [
    # (id, file text, key, line, reason contains)
    ("toml", '[[events]]\non = "a"\nname = "n\n', None, 3, "invalid TOML"),
    ("top key", 'provider = "stripe"\nrules = []\n', "rules", 2, "unknown key"),
    ("provider", 'provider = "square"\n', "provider", 1, "must be one of"),
    ("events type", 'events = "x"\n', "events", 1, "array of tables"),
    (
        "rule key",
        '[[events]]\non = "a"\nname = "n"\n[[events]]\non = "b"\nnmae = "n"\n',
        "events[1].nmae",
        6,
        "unknown key",
    ),
    ("missing on", '[[events]]\nname = "n"\n', "events[0]", 1, "needs `on`"),
    ("missing name", '[[events]]\non = "a"\n', "events[0]", 1, "needs `name`"),
    ("on type", '[[events]]\non = 5\nname = "n"\n', "events[0].on", 2, "glob"),
    ("on empty list", '[[events]]\non = []\nname = "n"\n', "events[0].on", 2, "glob"),
    ("on empty", '[[events]]\non = ["a", ""]\nname = "n"\n', "events[0].on", 2, "non-empty"),
    ("name type", '[[events]]\non = "a"\nname = 5\n', "events[0].name", 3, "must be a string"),
    ("if type", '[[events]]\non = "a"\nif = true\nname = "n"\n', "events[0].if", 3, "expression"),
    (
        "if syntax",
        '[[events]]\non = "a"\nif = "a ==="\nname = "n"\n',
        "events[0].if",
        3,
        "expression error",
    ),
    (
        "if two",
        '[[events]]\non = "a"\nif = "a b"\nname = "n"\n',
        "events[0].if",
        3,
        "expression error",
    ),
    (
        "payload type",
        '[[events]]\non = "a"\nname = "n"\npayload = "x"\n',
        "events[0].payload",
        4,
        "table",
    ),
    (
        "payload value",
        '[[events]]\non = "a"\nname = "n"\n[events.payload]\nok = "1"\namount = 5\n',
        "events[0].payload.amount",
        6,
        "must be a string",
    ),
    (
        "syntax",
        '[[events]]\non = "a"\nname = "n"\n[events.payload]\nid = "{{ data.id }"\n',
        "events[0].payload.id",
        5,
        "template error",
    ),
    (
        "unknown filter",
        '[[events]]\non = "a"\nname = "{{ x | centz }}"\n',
        "events[0].name",
        3,
        "no filter named 'centz'",
    ),
    (
        "unknown filter in if",
        '[[events]]\non = "a"\nname = "n"\nurl = "{% if x %}{{ x | nope }}{% endif %}"\n',
        "events[0].url",
        4,
        "no filter named 'nope'",
    ),
    (
        "unknown filter in cond",
        '[[events]]\non = "a"\nif = "x | nope"\nname = "n"\n',
        "events[0].if",
        3,
        "no filter named 'nope'",
    ),
    (
        "unknown test",
        '[[events]]\non = "a"\nname = "{{ x is nope }}"\n',
        "events[0].name",
        3,
        "no test named 'nope'",
    ),
    (
        "example key",
        '[[examples]]\ninput = "in.json"\nexpect = []\nfoo = 1\n',
        "examples[0].foo",
        4,
        "unknown key",
    ),
    (
        "example input",
        '[[examples]]\ninput = "missing.json"\nexpect = []\n',
        "examples[0].input",
        2,
        "not found",
    ),
    ("example expect", '[[examples]]\ninput = "in.json"\n', "examples[0]", 1, "needs `expect`"),
    (
        "expect payload",
        '[[examples]]\ninput = "in.json"\nexpect = [{ name = "n", payload = { a = 1 } }]\n',
        "examples[0].expect[0].payload.a",
        3,
        "must be a string",
    ),
    (
        "expect name",
        '[[examples]]\ninput = "in.json"\nexpect = [{ payload = {} }]\n',
        "examples[0].expect[0].name",
        3,
        "required",
    ),
    (
        "expect key",
        '[[examples]]\ninput = "in.json"\nexpect = [{ name = "n", nam = "x" }]\n',
        "examples[0].expect[0].nam",
        3,
        "unknown key",
    ),
    (
        "headers",
        '[[examples]]\ninput = "in.json"\nheaders = { a = 1 }\nexpect = []\n',
        "examples[0].headers",
        3,
        "table",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "line", "reason"), [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS]
)
def test_load_errors_name_file_key_and_line(
    tmp_path: Path, text: str, key: str | None, line: int | None, reason: str
) -> None:
    (tmp_path / "in.json").write_text("{}")
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_mapping(path)
    error = caught.value
    assert error.file == str(path)
    assert error.key == key
    assert error.line == line
    assert reason in error.reason
    assert error.message.startswith(f"{path}:{line}: ")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_mapping(tmp_path / "nope.toml")


def test_lines_are_found_in_a_longer_file(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        # comment
        provider = "stripe"

        [[events]]
        on = "a"
        name = "one"
        description = '''
        name = "not a key"
        '''

        [[events]]
        on = "b"
        name = "two"
        [events.payload]
        a = "{{ x }}"
        b = "{{ x | bogus }}"
        """
    )
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_mapping(path)
    assert (caught.value.key, caught.value.line) == ("events[0].description", 7)
    path.write_text(text.replace("description = '''\nname = \"not a key\"\n'''\n", ""))
    with pytest.raises(ConfigError) as caught:
        load_mapping(path)
    assert (caught.value.key, caught.value.line) == ("events[1].payload.b", 13)


# --- lint -------------------------------------------------------------------------------------


def test_lint_finds_rules_that_can_never_fit(make_mapping: MakeMapping) -> None:
    many = "\n".join(f'k{i} = "{{{{ data.k{i} }}}}"' for i in range(11))
    m = make_mapping(
        f"""
        [[events]]
        on = "a"
        name = ""
        [[events]]
        on = "b"
        name = "{"n" * 129}"
        visitor_id = "visitor-1"
        url = "{"u" * 2049}"
        [events.payload]
        long = "{"x" * 256}"
        [[events]]
        on = "c"
        name = "fine"
        [events.payload]
{textwrap.indent(many, " " * 8)}
        [[events]]
        on = "d"
        name = "{"n" * 128}"
        visitor_id = "{VID}"
        payload = {{ ok = "{"x" * 255}" }}
        """
    )
    problems = m.lint()
    found = [(p.key, p.line) for p in problems]
    assert found == [
        ("events[0].name", 4),
        ("events[1].name", 7),
        ("events[1].payload.long", 11),
        ("events[1].visitor_id", 8),
        ("events[1].url", 9),
        ("events[2].payload", 15),
    ]
    assert all(p.file == str(m.path) for p in problems)
    assert "at most 10" in problems[-1].reason


def test_lint_leaves_templates_alone(make_mapping: MakeMapping) -> None:
    m = make_mapping(
        '[[events]]\non = "a"\nname = "{{ data.name }}"\nvisitor_id = "{{ data.vid }}"\n'
    )
    assert m.lint() == []
