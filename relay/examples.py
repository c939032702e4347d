"""Mapping examples: webhook bodies with the events a mapping must make from them.

Each ``[[examples]]`` entry of a mapping file names a body as the sender posts it and the list
of track events expected from it. ``relay check`` and the tests run them through the provider's
parser (no signature check) and the mapping, so a shipped mapping cannot silently drift.
"""

from __future__ import annotations

import collections.abc as cabc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from relay.errors import InvalidBody
from relay.fitting import TrackEvent
from relay.providers.base import Provider, WebhookRequest

if TYPE_CHECKING:
    from relay.mapping import Mapping

_EXAMPLE_KEYS = ("input", "content_type", "headers", "expect")
_EXPECT_KEYS = ("name", "payload", "visitor_id", "url", "referrer")
_CONTENT_TYPES = {
    ".json": "application/json",
    ".form": "application/x-www-form-urlencoded",
    ".txt": "application/x-www-form-urlencoded",
}


@dataclass(frozen=True)
class Expected:
    """One expected event. None means "not checked"; an empty string means "absent"."""

    name: str
    payload: dict[str, str] | None = None
    visitor_id: str | None = None
    url: str | None = None
    referrer: str | None = None


@dataclass(frozen=True)
class Example:
    index: int
    input: str  # as written in the mapping file
    path: Path  # resolved against the mapping file's folder
    content_type: str
    headers: dict[str, str]  # lower-cased names
    expect: tuple[Expected, ...]
    line: int | None = None


def parse_examples(
    raw: Any,
    mapping_path: Path,
    fail: cabc.Callable[[str | None, str], NoReturn],
    line_of: cabc.Callable[[str], int | None],
) -> tuple[Example, ...]:
    """Check the ``[[examples]]`` of a mapping file; ``fail`` raises the ConfigError."""
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        fail("examples", "must be an array of tables ([[examples]])")
    examples = []
    for index, table in enumerate(raw):
        at = f"examples[{index}]"
        for key in table:
            if key not in _EXAMPLE_KEYS:
                fail(f"{at}.{key}", f"unknown key (an example holds {', '.join(_EXAMPLE_KEYS)})")
        given = table.get("input")
        if not isinstance(given, str) or not given:
            fail(f"{at}.input", "must name a webhook body file, relative to the mapping file")
        path = mapping_path.parent / given
        if not path.is_file():
            fail(f"{at}.input", f"file {path} not found")
        content_type = table.get("content_type", _CONTENT_TYPES.get(path.suffix.lower()))
        if content_type is None:
            content_type = "application/octet-stream"
        if not isinstance(content_type, str):
            fail(f"{at}.content_type", "must be a string")
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            fail(f"{at}.headers", "must be a table of header names to strings")
        if "expect" not in table:
            fail(at, "needs `expect`: the list of events the input must make ([] for none)")
        expect = table["expect"]
        if not isinstance(expect, list):
            fail(f"{at}.expect", "must be a list of expected events")
        examples.append(
            Example(
                index=index,
                input=given,
                path=path,
                content_type=content_type,
                headers={k.lower(): v for k, v in headers.items()},
                expect=tuple(_expected(f"{at}.expect[{i}]", e, fail) for i, e in enumerate(expect)),
                line=line_of(at),
            )
        )
    return tuple(examples)


def _expected(at: str, raw: Any, fail: cabc.Callable[[str | None, str], NoReturn]) -> Expected:
    if not isinstance(raw, dict):
        fail(at, 'must be a table such as { name = "purchase", payload = { ... } }')
    for key in raw:
        if key not in _EXPECT_KEYS:
            fail(f"{at}.{key}", f"unknown key (an expected event holds {', '.join(_EXPECT_KEYS)})")
    if not isinstance(raw.get("name"), str):
        fail(f"{at}.name", "is required, as a string")
    payload = raw.get("payload")
    if payload is not None:
        if not isinstance(payload, dict):
            fail(f"{at}.payload", "must be a table")
        for k, v in payload.items():
            if not isinstance(v, str):
                fail(f"{at}.payload.{k}", "must be a string (payload values are strings)")
    for key in ("visitor_id", "url", "referrer"):
        if key in raw and not isinstance(raw[key], str):
            fail(f"{at}.{key}", "must be a string")
    return Expected(
        raw["name"], payload, raw.get("visitor_id"), raw.get("url"), raw.get("referrer")
    )


@dataclass(frozen=True)
class ExampleProblem:
    """An example whose events differ from what the mapping made."""

    file: Path
    index: int
    rule: str | None  # the label of the rule concerned, when one is
    message: str
    line: int | None = None
    input: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        what = f"examples[{self.index}]"
        if self.input is not None:
            what += f" (input {self.input})"
        rule = f"{self.rule}: " if self.rule else ""
        return f"{where}: {what}: {rule}{self.message}"


def run_examples(
    mapping: Mapping, provider: Provider, source: str = "example"
) -> list[ExampleProblem]:
    """Run every example of the mapping; an empty list means they all hold."""
    problems: list[ExampleProblem] = []
    for example in mapping.examples:

        def problem(message: str, rule: str | None = None, ex: Example = example) -> None:
            problems.append(
                ExampleProblem(mapping.path, ex.index, rule, message, ex.line, ex.input)
            )

        try:
            body = example.path.read_bytes()
        except OSError as e:
            problem(f"cannot read the input: {e.strerror or e}")
            continue
        request = WebhookRequest(
            method="POST",
            url=f"https://example.com/webhooks/{source}",
            headers={"content-type": example.content_type, **example.headers},
            body=body,
            received_at=time.time(),
        )
        try:
            events = provider.parse(request)
        except InvalidBody as e:
            problem(f"the {provider.kind} provider refused the body: {e.reason}")
            continue
        except Exception as e:  # a provider bug: report it with the example that shows it
            problem(f"the {provider.kind} provider failed on the body: {type(e).__name__}: {e}")
            continue
        produced: list[tuple[int, TrackEvent]] = []
        failed = False
        for event in events:
            result = mapping.apply(event, source, request.headers)
            for failure in result.failures:
                problem(f"failed: {failure.reason}", mapping.rule_label(failure.rule))
                failed = True
            produced.extend((m.rule, m.event) for m in result.outputs)
        if failed:
            continue
        if len(produced) != len(example.expect):
            got = ", ".join(f"{e.name} from {mapping.rule_label(r)}" for r, e in produced)
            want = ", ".join(e.name for e in example.expect)
            problem(
                f"expected {len(example.expect)} event(s) [{want}], got {len(produced)} [{got}]"
            )
            continue
        for position, ((rule, got_event), want_event) in enumerate(
            zip(produced, example.expect, strict=True)
        ):
            differences = compare(want_event, got_event)
            if differences:
                problem(
                    f"event {position} ({got_event.name}): {'; '.join(differences)}",
                    mapping.rule_label(rule),
                )
    return problems


def compare(want: Expected, got: TrackEvent) -> list[str]:
    """The differences between an expected and a produced event, one short line each."""
    out: list[str] = []
    if want.name != got.name:
        out.append(f"name: expected {want.name!r}, got {got.name!r}")
    if want.payload is not None:
        for key, value in want.payload.items():
            if key not in got.payload:
                out.append(f"payload.{key}: expected {value!r}, got nothing")
            elif got.payload[key] != value:
                out.append(f"payload.{key}: expected {value!r}, got {got.payload[key]!r}")
        for key, value in got.payload.items():
            if key not in want.payload:
                out.append(f"payload.{key}: not expected, got {value!r}")
    for key in ("visitor_id", "url", "referrer"):
        expected: str | None = getattr(want, key)
        actual: str | None = getattr(got, key)
        if expected is None or expected == (actual or ""):
            continue
        wanted = repr(expected) if expected else "nothing"
        shown = repr(actual) if actual is not None else "nothing"
        out.append(f"{key}: expected {wanted}, got {shown}")
    return out
