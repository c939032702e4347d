"""What reading relay.toml is made of, for the config and the providers alike: a typed reader
over one TOML table (:class:`ConfigTable`), secrets that never show (:class:`Secret`) and
durations.

It imports neither :mod:`relay.config` nor :mod:`relay.providers`: both import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from relay.errors import ConfigError
from relay.tomllines import KeyLines

REDACTED = "**********"

INT64_MAX = 2**63 - 1
_HEADER_TOKEN_RE = re.compile(r"[!-~]+")  # printable ASCII, no space: a whole header value part
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows itself in repr(), str() or logs."""

    value: str = field(repr=False)

    def reveal(self) -> str:
        return self.value

    def fingerprint(self) -> str:
        """A short, stable, non-reversible name for the secret (safe to store and show)."""
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Secret('{REDACTED}')"

    def __str__(self) -> str:
        return REDACTED


def parse_duration(text: str) -> float:
    """'5s', '48h', '1h30m', '250ms', '7d' -> seconds. Raises ValueError."""
    text = text.strip()
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration (use e.g. '250ms', '5s', '10m', '48h', '7d')")
    return total


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def _hide(reason: str, value: str, name: str) -> str:
    """`reason` with `value`, as a message may print it (quoted, trimmed, as a number), replaced
    by `name`."""
    forms = {value, value.strip(), value.rstrip("/"), value.strip().rstrip("/"), value.lower()}
    number = value.strip()
    if number.lstrip("-").isdigit():
        forms.add(str(int(number)))
    forms.discard("")
    ordered = sorted(forms, key=len, reverse=True)
    quoted = False
    for form in ordered:
        for shown in (repr(form), json.dumps(form, ensure_ascii=False)):
            if shown in reason:
                reason = reason.replace(shown, f"'{name}'")
                quoted = True
    if quoted:  # printed as a value: elsewhere the same letters are the message's own words
        return reason
    for form in ordered:
        for shown in {form, repr(form)[1:-1]}:
            before = r"(?<![A-Za-z0-9])" if shown[0].isalnum() else ""
            after = r"(?![A-Za-z0-9])" if shown[-1].isalnum() else ""
            reason = re.sub(before + re.escape(shown) + after, lambda _: name, reason)
    return reason


class ConfigTable:
    """A typed reader over one TOML table: each getter names file and key in its errors.

    Call :meth:`finish` once every key was read, to refuse the ones nobody knows.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        file: Path,
        prefix: str = "",
        text: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.data = dict(data)
        self.file = file
        self.prefix = prefix
        self.text = text
        self.env = os.environ if env is None else env
        self._seen: set[str] = set()

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str | None, reason: str) -> NoReturn:
        key = self.key(name) if name else (self.prefix or None)
        reason = self._hide_variables(name, reason)
        raise ConfigError(self.file, key, reason, line=line_of(self.text, key))

    def _hide_variables(self, name: str | None, reason: str) -> str:
        """The reason with each value the key took from ``${NAME}`` named, never shown.

        Every message of every reader (the providers' too) passes here, so none prints a secret
        it was given through the environment, whether it quotes, trims or converts the value.
        """
        raw = self.data.get(name) if name is not None else None
        texts = raw if isinstance(raw, list) else [raw]
        values: dict[str, str] = {}
        for text in texts:
            if not isinstance(text, str):
                continue
            for m in _ENV_RE.finditer(text):
                value = self.env.get(m.group(1), m.group(2))
                if value:
                    values.setdefault(value, "${" + m.group(1) + "}")
        for value in sorted(values, key=len, reverse=True):
            reason = _hide(reason, value, values[value])
        return reason

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def _raw(self, name: str, default: Any, required: bool) -> Any:
        self._seen.add(name)
        if name not in self.data:
            if required:
                self.fail(name, "is required")
            return default
        return self._expand(name, self.data[name])

    def _expand(self, name: str, value: Any) -> Any:
        if isinstance(value, str):

            def sub(m: re.Match[str]) -> str:
                var, default = m.group(1), m.group(2)
                if var in self.env:
                    return self.env[var]
                if default is not None:
                    return default
                self.fail(name, f"environment variable {var} is not set")

            return _ENV_RE.sub(sub, value)
        if isinstance(value, list):
            return [self._expand(name, v) for v in value]
        return value

    def _typed(self, name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(name, f"must be {what}, not a boolean")
        if not isinstance(value, kind):
            self.fail(name, f"must be {what}, not {type_name(value)}")
        return value

    def string(
        self, name: str, default: Any = ..., *, choices: tuple[str, ...] | None = None
    ) -> Any:
        value = self._raw(name, default, default is ...)
        if value is default and name not in self.data:
            return value
        value = self._typed(name, value, str, "a string")
        if choices is not None and value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def integer(
        self, name: str, default: Any = ..., *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # from an environment variable
        value = self._typed(name, value, int, "an integer")
        # TOML and int() take any size; the database and the track API take 64 bits.
        if max is None and value > INT64_MAX:
            max = INT64_MAX
        if min is None and value < -INT64_MAX - 1:
            min = -INT64_MAX - 1
        if (min is not None and value < min) or (max is not None and value > max):
            lo = "" if min is None else f"{min}"
            hi = "" if max is None else f"{max}"
            self.fail(
                name,
                f"must be between {lo} and {hi}, not {value}"
                if lo and hi
                else f"must be {'>= ' + lo if lo else '<= ' + hi}, not {value}",
            )
        return value

    def boolean(self, name: str, default: Any = ...) -> Any:
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return self._typed(name, value, bool, "true or false")

    def duration(self, name: str, default: Any = ..., *, positive: bool = True) -> Any:
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return parse_duration(value) if isinstance(value, str) else value
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            value = self._typed(name, value, str, 'a duration such as "5s" or "48h"')
            try:
                seconds = parse_duration(value)
            except ValueError as e:
                self.fail(name, str(e))
        if seconds < 0 or (positive and seconds == 0):
            self.fail(name, "must be a positive duration")
        return seconds

    def secret(self, name: str, default: Any = ..., *, header: bool = False) -> Any:
        """`header`: the secret is sent in an HTTP header, so it must be one printable token."""
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return value
        value = self._typed(name, value, str, "a string")
        if not value:
            self.fail(name, "is empty")
        if header and not _HEADER_TOKEN_RE.fullmatch(value):
            self.fail(
                name,
                "must be printable ASCII without spaces or line breaks (it is sent in an HTTP "
                "header)",
            )
        return Secret(value)

    def secrets(self, name: str, default: Any = ...) -> Any:
        """One secret or a list of them (for rotation)."""
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return value
        if isinstance(value, str):
            value = [value]
        self._typed(name, value, list, "a string or a list of strings")
        if not value:
            self.fail(name, "must name at least one secret")
        for v in value:
            if not isinstance(v, str):
                self.fail(name, f"must be a list of strings, not a list holding {type_name(v)}")
            if not v:
                self.fail(name, "holds an empty secret")
        return tuple(Secret(v) for v in value)

    def strings(self, name: str, default: Any = ...) -> Any:
        value = self._raw(name, default, default is ...)
        if name not in self.data:
            return value
        if isinstance(value, str):
            return (value,)
        self._typed(name, value, list, "a list of strings")
        for v in value:
            if not isinstance(v, str):
                self.fail(name, "must be a list of strings")
        return tuple(value)

    def path(self, name: str, default: Any = ...) -> Any:
        value = self._raw(name, default, default is ...)
        if value is None:
            return None
        value = self._typed(name, value, str, "a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def table(self, name: str, required: bool = False) -> ConfigTable:
        value = self._raw(name, {}, required)
        if not isinstance(value, dict):
            self.fail(name, f"must be a table, not {type_name(value)}")
        return ConfigTable(value, self.file, self.key(name), self.text, self.env)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            self.fail(unknown[0], "unknown key")


def type_name(value: Any) -> str:
    """How a TOML value's type is named in messages."""
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def line_of(text: str | None, key: str | None) -> int | None:
    """The line of `text` where a dotted key is set, for file:line messages, or None."""
    if not text or not key:
        return None
    return KeyLines(text).line(key)
