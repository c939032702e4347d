"""Fitting mapped events to the track API's limits (track-api.md sections 3 and 10)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.fitting import MAX_NAME, MAX_PAYLOAD_KEYS, MAX_URL, MAX_VALUE, TrackEvent, fit, is_uuid

VID = "550e8400-e29b-41d4-a716-446655440000"


def fit_payload(payload: dict[str, str]) -> tuple[TrackEvent, list[str]]:
    event, notes = fit("purchase", payload, None, None, None)
    assert event is not None
    return event, notes


def test_limits_are_the_track_apis() -> None:
    assert (MAX_NAME, MAX_PAYLOAD_KEYS, MAX_VALUE, MAX_URL) == (128, 10, 255, 2048)


def test_an_event_that_fits_is_kept_whole_without_notes() -> None:
    payload = {"order_id": "cs_1", "amount": "49.99"}
    event, notes = fit("purchase", payload, VID, "https://example.com/a", "https://ref.example/")
    assert notes == []
    assert event == TrackEvent(
        "purchase", payload, VID, "https://example.com/a", "https://ref.example/"
    )


@pytest.mark.parametrize(
    ("name", "expected", "notes"),
    [
        ("a", "a", []),
        ("n" * 128, "n" * 128, []),
        ("n" * 129, "n" * 128, ["name cut to 128 characters"]),
        ("é" * 300, "é" * 128, ["name cut to 128 characters"]),
    ],
)
def test_name_is_cut_to_128(name: str, expected: str, notes: list[str]) -> None:
    event, got = fit(name, {}, None, None, None)
    assert event is not None and event.name == expected
    assert got == notes


def test_an_empty_name_drops_the_event() -> None:
    event, notes = fit("", {"a": "b"}, VID, None, None)
    assert event is None
    assert notes == ["name is empty: event dropped"]


def test_ten_payload_keys_fit() -> None:
    payload = {f"k{i}": "v" for i in range(10)}
    event, notes = fit_payload(payload)
    assert event.payload == payload and notes == []


def test_extra_payload_keys_are_dropped_in_rule_order_and_named() -> None:
    payload = {f"k{i:02d}": str(i) for i in range(13)}
    event, notes = fit_payload(payload)
    assert list(event.payload) == [f"k{i:02d}" for i in range(10)]
    assert notes == ["payload has more than 10 keys: dropped k10, k11, k12"]


def test_empty_values_are_dropped_silently_and_do_not_count() -> None:
    payload = {"empty": "", **{f"k{i}": "v" for i in range(10)}, "also_empty": ""}
    event, notes = fit_payload(payload)
    assert list(event.payload) == [f"k{i}" for i in range(10)]
    assert notes == []


@pytest.mark.parametrize(
    ("length", "cut"), [(254, False), (255, False), (256, True), (10_000, True)]
)
def test_values_are_cut_to_255(length: int, cut: bool) -> None:
    event, notes = fit_payload({"description": "x" * length, "id": "1"})
    assert event.payload["description"] == "x" * min(length, 255)
    assert event.payload["id"] == "1"
    assert notes == (["payload.description cut to 255 characters"] if cut else [])


def test_notes_add_up() -> None:
    payload = {"a": "x" * 300, "b": "y" * 300, **{f"k{i}": "v" for i in range(10)}}
    event, notes = fit("n" * 200, payload, "not-a-uuid", "u" * 3000, None)
    assert event is not None
    assert notes == [
        "name cut to 128 characters",
        "payload.a cut to 255 characters",
        "payload.b cut to 255 characters",
        "payload has more than 10 keys: dropped k8, k9",
        "visitor_id is not a UUID: dropped",
        "url cut to 2048 characters",
    ]


@pytest.mark.parametrize(
    ("visitor_id", "kept"),
    [
        (VID, True),
        (VID.upper(), True),
        ("7c9e6679-7425-40de-944b-e07fc1f90ae7", True),
        ("550e8400e29b41d4a716446655440000", False),  # no hyphens: not what ot_vid holds
        ("{550e8400-e29b-41d4-a716-446655440000}", False),
        (VID + "0", False),
        (VID[:-1], False),
        (VID + "\n", False),
        ("550e8400-e29b-41d4-a716-44665544000g", False),
        ("cus_123", False),
    ],
)
def test_visitor_id_is_kept_only_if_a_uuid(visitor_id: str, kept: bool) -> None:
    event, notes = fit("purchase", {}, visitor_id, None, None)
    assert event is not None
    assert is_uuid(visitor_id) is kept
    if kept:
        assert event.visitor_id == visitor_id and notes == []
    else:
        assert event.visitor_id is None
        assert notes == ["visitor_id is not a UUID: dropped"]
        assert visitor_id.strip() not in " ".join(notes)  # the value itself is not logged


@pytest.mark.parametrize("empty", [None, ""])
def test_absent_optional_fields_are_none_without_notes(empty: str | None) -> None:
    event, notes = fit("purchase", {}, empty, empty, empty)
    assert event == TrackEvent("purchase", {}, None, None, None)
    assert notes == []


@pytest.mark.parametrize("key", ["url", "referrer"])
@pytest.mark.parametrize(("length", "cut"), [(2048, False), (2049, True)])
def test_urls_are_cut_to_2048(key: str, length: int, cut: bool) -> None:
    value = "https://example.com/" + "p" * (length - 20)
    args = {"url": None, "referrer": None, key: value}
    event, notes = fit("purchase", {}, None, args["url"], args["referrer"])
    assert event is not None
    assert getattr(event, key) == value[:2048]
    assert notes == ([f"{key} cut to 2048 characters"] if cut else [])


def test_to_json_leaves_out_absent_fields_and_an_empty_payload() -> None:
    assert TrackEvent("signup", {}).to_json() == {"name": "signup"}
    full = TrackEvent("purchase", {"a": "1"}, VID, "https://e.com/", "https://r.com/")
    assert full.to_json() == {
        "name": "purchase",
        "payload": {"a": "1"},
        "visitor_id": VID,
        "url": "https://e.com/",
        "referrer": "https://r.com/",
    }


def test_from_json_inverts_to_json() -> None:
    for event in (
        TrackEvent("signup", {}),
        TrackEvent("purchase", {"a": "1", "b": "2"}, VID, "https://e.com/", None),
        TrackEvent("x", {}, None, None, "https://r.com/"),
    ):
        assert TrackEvent.from_json(event.to_json()) == event


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {},
        {"name": 5},
        {"name": "a", "payload": []},
        {"name": "a", "payload": {"k": 1}},
        {"name": "a", "visitor_id": 7},
        {"name": "a", "url": ["x"]},
    ],
)
def test_from_json_refuses_malformed_objects(bad: object) -> None:
    with pytest.raises(ValueError):
        TrackEvent.from_json(bad)  # type: ignore[arg-type]


text = st.text(max_size=400)


@given(
    name=text,
    payload=st.dictionaries(st.text(min_size=1, max_size=20), text, max_size=20),
    visitor_id=st.one_of(st.none(), st.uuids().map(str), text),
    url=st.one_of(st.none(), st.text(max_size=3000)),
)
def test_whatever_comes_in_the_result_fits(
    name: str, payload: dict[str, str], visitor_id: str | None, url: str | None
) -> None:
    event, notes = fit(name, payload, visitor_id, url, url)
    if event is None:
        assert name == "" and notes
        return
    assert 1 <= len(event.name) <= 128
    assert len(event.payload) <= 10
    assert all(v and len(v) <= 255 for v in event.payload.values())
    assert event.visitor_id is None or is_uuid(event.visitor_id)
    assert event.url is None or 0 < len(event.url) <= 2048
    # what fitted unchanged went through unchanged, and only changes are noted
    changed = event.name != name or event.visitor_id != (visitor_id or None)
    changed |= event.payload != {k: v for k, v in payload.items() if v}
    changed |= event.url != (url or None)
    assert bool(notes) == changed
