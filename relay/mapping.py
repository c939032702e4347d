"""Mappings: declarative rules that turn one provider event into track-API events.

A mapping file (``mappings/*.toml``) holds ``[[events]]`` rules and ``[[examples]]``. Each rule
whose ``on`` glob (and optional ``if`` expression) matches the event type emits one event, in
file order. Every template is compiled once, at load, in Jinja's immutable sandbox; webhook data
is only ever passed to templates as values, never compiled. Templates see the event's fields at
top level plus ``event`` (the whole event), ``type``, ``source`` and ``headers`` (lower-cased
names, credentials removed); these four names win over event fields of the same name.

Rendering rules, chosen so that JSON webhooks read naturally:

* a missing field renders empty (ChainableUndefined), and an empty result drops that field;
* ``null`` renders empty, booleans as ``true``/``false``, objects and lists as compact JSON;
* on a JSON object, ``x.items`` (or ``keys``, ``values``...) reads the field, not the method.
"""

from __future__ import annotations

import collections.abc as cabc
import fnmatch
import json
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import ChainableUndefined, Template, TemplateAssertionError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, new_context

from relay import bounds, templating
from relay.bounds import MAX_FIELD, TooLarge, TooSlow
from relay.config import PASSTHROUGH, type_name
from relay.errors import ConfigError
from relay.examples import Example, parse_examples
from relay.filters import FILTERS, FilterError
from relay.fitting import MAX_NAME, MAX_PAYLOAD_KEYS, MAX_URL, MAX_VALUE, TrackEvent, fit, is_uuid
from relay.providers.base import CREDENTIAL_HEADERS, ProviderEvent, WebhookRequest
from relay.tomllines import KeyLines

if TYPE_CHECKING:
    from relay.config import Config

_TOP_KEYS = ("provider", "events", "examples")
_RULE_KEYS = ("on", "if", "name", "visitor_id", "url", "referrer", "payload")
_OPTIONAL = ("visitor_id", "url", "referrer")
_MAX_REASON = 300

Fail = cabc.Callable[[str | None, str], NoReturn]


def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return value


class _Sandbox(templating.BoundedSandbox):
    """The sandbox, made to read JSON keys before dict methods and to refuse loudly."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The stock sandbox returns an Undefined that raises only when printed; with
        # ChainableUndefined it would print nothing. Refusing at once makes the attempt visible.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def make_environment() -> templating.BoundedSandbox:
    """The one environment every mapping compiles in (filters of relay.filters added)."""
    env = _Sandbox(undefined=ChainableUndefined, autoescape=False, finalize=_finalize)
    env.filters.update(FILTERS)
    env.bound_filters()
    return env


_ENV = make_environment()


@dataclass(frozen=True)
class _Field:
    """One value of a rule: a constant, or a template compiled at load."""

    key: str  # where it is in the rule, for messages: "name", "payload.amount", "if"
    out: str  # the output key: "name", "amount"
    source: str
    template: Template | None  # None: the source is a constant
    pure: bool = True  # writes nothing to its context ({% set %}, macros...): may share one
    repeats: bool = False  # has loops, macros or blocks: its output can be of any length

    def render(self, context: Context) -> str:
        if self.template is None:
            return self.source
        t = self.template
        if not self.pure:
            context = t.new_context(context.parent, shared=True)
        # root_render_func on a context is what Template.render does, minus a copy of every
        # variable per field and the traceback rewriting: about 6x faster.
        if not self.repeats:  # a few parts, each a bounded value
            return "".join(t.root_render_func(context))[:MAX_FIELD].strip()
        # Output past MAX_FIELD is not rendered: fitting would cut it anyway.
        parts = []
        size = 0
        for part in t.root_render_func(context):
            parts.append(part)
            size += len(part)
            if size >= MAX_FIELD:
                break
        return "".join(parts)[:MAX_FIELD].strip()


class _RenderError(Exception):
    pass


@dataclass(frozen=True)
class Rule:
    """One compiled ``[[events]]`` rule."""

    index: int
    on: tuple[str, ...]
    line: int | None
    if_field: _Field | None
    name_field: _Field
    optional: tuple[_Field, ...]  # visitor_id, url, referrer when set
    payload: tuple[_Field, ...]
    exact: frozenset[str]
    glob: re.Pattern[str] | None

    def matches(self, event_type: str) -> bool:
        if event_type in self.exact:
            return True
        return self.glob is not None and self.glob.match(event_type) is not None

    @property
    def label(self) -> str:
        return f"events[{self.index}] (on {', '.join(json.dumps(p) for p in self.on)})"

    def render(self, parent: dict[str, Any]) -> tuple[TrackEvent | None, list[str]] | None:
        """The fitted event and its notes, or None when `if` is false. Raises _RenderError."""
        # One context for all of the rule's (pure) templates: creating it is most of the cost
        # of rendering a short template.
        context = new_context(_ENV, None, {}, parent, shared=True)
        field = self.if_field or self.name_field
        try:
            if self.if_field is not None and not self.if_field.render(context):
                return None
            field = self.name_field
            name = field.render(context)
            values: dict[str, str | None] = dict.fromkeys(_OPTIONAL)
            for field in self.optional:
                values[field.out] = field.render(context)
            payload: dict[str, str] = {}
            for field in self.payload:
                payload[field.out] = field.render(context)
        except Exception as e:  # anything webhook data can provoke fails this rule only
            raise _RenderError(f"{field.key}: {_reason(e)}") from None
        return fit(name, payload, values["visitor_id"], values["url"], values["referrer"])


def _reason(e: Exception) -> str:
    if isinstance(e, FilterError | TooLarge | TooSlow):
        text = str(e)
    elif isinstance(e, SecurityError):
        text = f"refused by the sandbox: {e}"
    else:
        text = f"{type(e).__name__}: {e}"
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


@dataclass(frozen=True)
class Mapped:
    """One output event of a rule."""

    rule: int
    event: TrackEvent
    notes: tuple[str, ...]


@dataclass(frozen=True)
class MapFailure:
    """A rule that matched but could not make its event; the other rules still ran."""

    rule: int
    reason: str


@dataclass(frozen=True)
class MapResult:
    outputs: tuple[Mapped, ...]
    failures: tuple[MapFailure, ...]

    @property
    def ignored(self) -> bool:
        """No rule matched this event."""
        return not self.outputs and not self.failures


class Mapping:
    """A loaded mapping file: compiled rules and their examples."""

    def __init__(
        self,
        path: Path,
        provider: str | None,
        rules: tuple[Rule, ...],
        examples: tuple[Example, ...],
        lines: KeyLines | None = None,
        text: str = "",
    ):
        self.path = path
        self.text = text  # the file as it was loaded
        self.provider = provider
        self.rules = rules
        self.examples = examples
        self._lines = lines or KeyLines("")
        self._globals = dict(_ENV.globals)

    def __repr__(self) -> str:
        return f"<Mapping {self.path} rules={len(self.rules)}>"

    def rule_label(self, index: int) -> str:
        return self.rules[index].label

    def apply(
        self, event: ProviderEvent, source: str, headers: cabc.Mapping[str, str]
    ) -> MapResult:
        """Map one provider event. Never raises for anything in the webhook data.

        The event's rules may use bounds.DEADLINE seconds of CPU; a rule still rendering then
        fails.
        """
        saved = bounds.start()
        try:
            return self._apply(event, source, headers)
        finally:
            bounds.stop(saved)

    def _apply(
        self, event: ProviderEvent, source: str, headers: cabc.Mapping[str, str]
    ) -> MapResult:
        outputs: list[Mapped] = []
        failures: list[MapFailure] = []
        parent: dict[str, Any] | None = None
        for rule in self.rules:
            if not rule.matches(event.type):
                continue
            if parent is None:
                parent = self._variables(event, source, headers)
            try:
                result = rule.render(parent)
            except _RenderError as e:
                failures.append(MapFailure(rule.index, str(e)))
                continue
            if result is None:
                continue
            track_event, notes = result
            if track_event is None:
                failures.append(MapFailure(rule.index, "; ".join(notes)))
            else:
                outputs.append(Mapped(rule.index, track_event, tuple(notes)))
        return MapResult(tuple(outputs), tuple(failures))

    def _variables(
        self, event: ProviderEvent, source: str, headers: cabc.Mapping[str, str]
    ) -> dict[str, Any]:
        data = event.data
        shown = {k.lower(): v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
        return {
            **self._globals,
            **(data if isinstance(data, cabc.Mapping) else {}),  # a generic body may be a list
            "event": data,
            "type": event.type,
            "source": source,
            "headers": shown,
        }

    def lint(self) -> list[ConfigError]:
        """Rules that could never make an event the track API accepts, as written."""
        problems: list[ConfigError] = []

        def problem(key: str, reason: str) -> None:
            problems.append(ConfigError(self.path, key, reason, self._lines.line(key)))

        for rule in self.rules:
            at = f"events[{rule.index}]"
            name = rule.name_field
            if name.template is None and not name.source:
                problem(f"{at}.name", "is empty: the track API needs a name")
            elif name.template is None and len(name.source) > MAX_NAME:
                problem(f"{at}.name", f"is longer than the track API's {MAX_NAME} characters")
            if len(rule.payload) > MAX_PAYLOAD_KEYS:
                problem(
                    f"{at}.payload",
                    f"declares {len(rule.payload)} keys; the track API takes at most "
                    f"{MAX_PAYLOAD_KEYS}, so the last ones would always be dropped",
                )
            for f in rule.payload:
                if f.template is None and len(f.source) > MAX_VALUE:
                    problem(f"{at}.{f.key}", f"is longer than the API's {MAX_VALUE} characters")
            for f in rule.optional:
                if f.template is not None or not f.source:
                    continue
                if f.key == "visitor_id" and not is_uuid(f.source):
                    problem(f"{at}.visitor_id", "is a constant that is not a UUID")
                elif f.key != "visitor_id" and len(f.source) > MAX_URL:
                    problem(f"{at}.{f.key}", f"is longer than {MAX_URL} characters")
        return problems


def try_body(
    mapping: Mapping, provider: Any, source: str, headers: dict[str, str], body: bytes
) -> list[tuple[ProviderEvent, MapResult]]:
    """What `mapping` makes of a webhook body, event by event, nothing verified, stored or
    sent (`relay map` and the console's playground). Raises WebhookError when `provider`
    cannot read the body."""
    request = WebhookRequest(
        "POST", f"http://localhost/webhooks/{source}", headers, body, time.time()
    )
    return [(ev, mapping.apply(ev, source, headers)) for ev in provider.parse(request)]


def load_mappings(
    config: Config, texts: cabc.Mapping[str, str] | None = None
) -> dict[str, Mapping]:
    """Every source's mapping, each file loaded once. `texts`: the files' contents by path,
    as another process loaded them (else they are read). Raises ConfigError."""
    by_file: dict[Path, Mapping] = {}
    out: dict[str, Mapping] = {}
    for name, source in config.sources.items():
        path = source.mapping
        if path not in by_file:
            by_file[path] = load_mapping(path, None if texts is None else texts.get(str(path)))
        out[name] = by_file[path]
    return out


def load_mapping(path: Path, text: str | None = None) -> Mapping:
    """Read (unless `text` is given), check and compile a mapping file. Raises ConfigError
    naming file, key and line."""
    path = Path(path)
    if path == PASSTHROUGH:
        from relay.providers.track import Passthrough

        return Passthrough(path)
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "mapping file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, f"cannot read: {e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, None, f"invalid TOML: {e}", line) from None
    lines = KeyLines(text)

    def fail(key: str | None, reason: str) -> NoReturn:
        raise ConfigError(path, key, reason, lines.line(key) if key else None)

    for key in doc:
        if key not in _TOP_KEYS:
            fail(key, f"unknown key (a mapping file holds {', '.join(_TOP_KEYS)})")
    provider = doc.get("provider")
    if provider is not None:
        from relay.providers import PROVIDERS

        if not isinstance(provider, str) or provider not in PROVIDERS:
            fail("provider", f"must be one of {', '.join(sorted(PROVIDERS))}, not {provider!r}")
    events = doc.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        fail("events", "must be an array of tables ([[events]])")
    rules = tuple(_compile_rule(i, raw, fail, lines) for i, raw in enumerate(events))
    examples = parse_examples(doc.get("examples", []), path, fail, lines.line)
    return Mapping(path, provider, rules, examples, lines, text)


def _compile_rule(index: int, raw: dict[str, Any], fail: Fail, lines: KeyLines) -> Rule:
    at = f"events[{index}]"
    for key in raw:
        if key not in _RULE_KEYS:
            fail(f"{at}.{key}", f"unknown key (a rule holds {', '.join(_RULE_KEYS)})")
    if "on" not in raw:
        fail(at, "needs `on`: the event type (or glob, or list of them) it maps")
    on = raw["on"]
    patterns = [on] if isinstance(on, str) else on
    if not isinstance(patterns, list) or not patterns:
        fail(f"{at}.on", "must be an event type glob or a non-empty list of them")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            fail(f"{at}.on", f"must hold non-empty strings, not {p!r}")
    if "name" not in raw:
        fail(at, "needs `name`: the track event's name")

    def field(key: str, value: Any) -> _Field:
        if not isinstance(value, str):
            fail(f"{at}.{key}", f"must be a string (a template), not {type_name(value)}")
        return _compile(f"{at}.{key}", key.removeprefix("payload."), value, fail)

    condition = raw.get("if")
    if_field = None
    if condition is not None:
        if not isinstance(condition, str) or not condition.strip():
            fail(f"{at}.if", "must be a Jinja expression in a string")
        if_field = _compile_condition(f"{at}.if", condition, fail)
    name_field = field("name", raw["name"])
    optional = tuple(field(k, raw[k]) for k in _OPTIONAL if k in raw)
    payload = raw.get("payload", {})
    if not isinstance(payload, dict):
        fail(f"{at}.payload", f"must be a table of templates, not {type_name(payload)}")
    if "" in payload:
        fail(f"{at}.payload", "holds an empty key")
    payload_fields = tuple(field(f"payload.{k}", v) for k, v in payload.items())
    globs = [p for p in patterns if any(c in p for c in "*?[")]
    return Rule(
        index=index,
        on=tuple(patterns),
        line=lines.line(at),
        if_field=if_field,
        name_field=name_field,
        optional=optional,
        payload=payload_fields,
        exact=frozenset(p for p in patterns if p not in globs),
        glob=re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None,
    )


def _compile(key: str, out: str, source: str, fail: Fail) -> _Field:
    if not any(mark in source for mark in ("{{", "{%", "{#")):
        return _Field(_local(key), out, source.strip(), None)
    try:
        tree = _ENV.parse(source)
        _check_tree(tree)
        templating.check_constants(tree, _ENV)
        pure = next(tree.find_all(_WRITES), None) is None
        repeats = templating.instrument(tree)
        template = _ENV.from_string(tree)
    except TemplateSyntaxError as e:
        fail(key, f"template error: {e.message}")
    except (_Unsafe, TooLarge) as e:
        fail(key, str(e))
    except RecursionError:
        fail(key, "template error: nested too deeply")
    except Exception as e:  # Jinja's own limits (an integer too long to print...): one line
        fail(key, f"template error: {type(e).__name__}: {e}")
    return _Field(_local(key), out, source, template, pure, repeats)


def _local(key: str) -> str:
    """'events[3].payload.amount' -> 'payload.amount' (the rule is named apart)."""
    return key.split(".", 1)[1]


def _compile_condition(key: str, source: str, fail: Fail) -> _Field:
    try:
        _ENV.compile_expression(source)  # checks that it is exactly one expression
    except TemplateAssertionError:
        pass  # an unknown filter or test: _compile names it as for any template
    except TemplateSyntaxError as e:
        fail(key, f"expression error: {e.message}")
    except Exception:  # compiled again below, which names the problem
        pass
    # Evaluated as a one-line template so that it takes the same fast path as the fields.
    return _compile(key, "if", "{% if (" + source + ") %}1{% endif %}", fail)


class _Unsafe(Exception):
    pass


# Statements that write to a template's context; a template holding one gets its own.
_WRITES = (
    nodes.Assign,
    nodes.AssignBlock,
    nodes.Macro,
    nodes.CallBlock,
    nodes.Block,
    nodes.Extends,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
)


def _check_tree(tree: nodes.Template) -> None:
    """Refuse at load what the sandbox would refuse at render, and the unknown filters and
    tests that Jinja only reports when it reaches them (inside `if` blocks)."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Test)):
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value if isinstance(node.arg.value, str) else None
        if name is not None and name.startswith("__"):
            raise _Unsafe(f"{name!r} is unsafe: templates cannot reach Python internals")
        if isinstance(node, nodes.Filter) and node.name not in _ENV.filters:
            raise _Unsafe(f"template error: no filter named {node.name!r}")
        if isinstance(node, nodes.Test) and node.name not in _ENV.tests:
            raise _Unsafe(f"template error: no test named {node.name!r}")
