"""relay.toml, parsed once into frozen, typed objects.

Every mistake is a ConfigError naming the file, the key and the reason. Values of the form
``${NAME}`` (or ``${NAME:-default}``) are taken from the environment; secrets are wrapped in
:class:`Secret` so that ``repr()`` and logs show ``**********``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.providers.base import Provider, Verifier

REDACTED = "**********"
DEFAULT_CONFIG = "relay.toml"

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


def _line_of(text: str | None, key: str | None) -> int | None:
    """Best effort: the line where a dotted key is set, for file:line messages."""
    if not text or not key:
        return None
    parts = key.split(".")
    lines = text.splitlines()
    start = 0
    if len(parts) > 1:
        header = re.compile(
            r"^\s*\[\[?\s*"
            + r"\s*\.\s*".join(re.escape(p) for p in parts[:-1])
            + r"\s*\]\]?\s*(#.*)?$"
        )
        for i, line in enumerate(lines):
            if header.match(line):
                start = i
                break
        else:
            return None
    leaf = re.compile(r'^\s*"?' + re.escape(parts[-1]) + r'"?\s*=')
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[") and len(parts) > 1:
            break
        if leaf.match(lines[i]):
            return i + 1
    return start + 1 if len(parts) > 1 else None


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
        raise ConfigError(self.file, key, reason, line=_line_of(self.text, key))

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


@dataclass(frozen=True)
class RelaySettings:
    database: Path
    max_body_bytes: int = 1_048_576
    dedupe_window: float = 48 * 3600
    retention: float = 7 * 86400
    shutdown_grace: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_header_bytes: int = 65536
    body_timeout: float = 30.0


@dataclass(frozen=True)
class TrackSettings:
    base_url: str
    api_key: Secret
    website_id: int
    batch_size: int = 25
    flush_interval: float = 5.0
    requests_per_minute: int = 60
    timeout: float = 10.0
    max_event_age: float = 72 * 3600
    max_backoff: float = 300.0


@dataclass(frozen=True)
class Destination:
    """Where a source's events go: one queue per (API key, website)."""

    base_url: str
    api_key: Secret
    website_id: int

    @property
    def key_id(self) -> str:
        return self.api_key.fingerprint()

    @property
    def name(self) -> str:
        return f"{self.key_id}/{self.website_id}"


@dataclass(frozen=True)
class Source:
    name: str
    provider: Provider
    verifier: Verifier | None  # None only with an explicit `verify = false`
    mapping: Path
    destination: Destination


@dataclass(frozen=True)
class Config:
    path: Path
    relay: RelaySettings
    track: TrackSettings
    sources: Mapping[str, Source]

    @property
    def destinations(self) -> list[Destination]:
        seen: dict[str, Destination] = {}
        for s in self.sources.values():
            seen.setdefault(s.destination.name, s.destination)
        return list(seen.values())


SQLITE_HEADER = b"SQLite format 3\x00"


def database_problem(path: Path) -> str | None:
    """Why the relay could not open or create its SQLite file at `path`, or None.

    Checked at load, so that `relay check` sees what `relay serve` would trip on. The CLI
    opens the file too before serving (see relay.cli.common.open_database).
    """
    if path.is_dir():
        return f"{path} is a directory, not a database file"
    if path.exists():
        try:
            with path.open("rb") as f:
                head = f.read(100)
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        if head and not _sqlite_header(head):  # an empty file is a new database
            return f"{path} is not a SQLite database"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{path.parent} is not writable (SQLite keeps its log beside the database)"
        return None
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot create {path}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create {path}: {folder} is not writable"
    return None


def _sqlite_header(head: bytes) -> bool:
    """Whether the first 100 bytes of a file are a SQLite header, as SQLite checks them on open
    (read here, without opening: opening leaves files behind and takes locks)."""
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        return False
    page_size = int.from_bytes(head[16:18], "big")
    return (
        (page_size == 1 or (512 <= page_size <= 32768 and page_size & (page_size - 1) == 0))
        and head[18] in (1, 2)
        and head[19] in (1, 2)
        and head[21:24] == b"\x40\x20\x20"
    )


def _url_problem(url: str) -> str | None:
    """Why requests to `url` would fail every time, or None."""
    if re.search(r"[\x00-\x20\x7f]", url):
        return "must not hold spaces, line breaks or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        return f"is not a valid URL: {e}"
    if not parts.hostname:
        return "must name a host"
    return None


def config_error(config: Config, key: str, reason: str) -> ConfigError:
    """A ConfigError about a loaded config's key (found out later than loading), with the key's
    line, and a value from ``${NAME}`` named as at load."""
    try:
        text: str | None = config.path.read_text(encoding="utf-8")
        doc: Any = tomllib.loads(text or "")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        text, doc = None, {}
    *parents, leaf = key.split(".")
    for part in parents:
        doc = doc.get(part) if isinstance(doc, dict) else None
    table = ConfigTable(doc if isinstance(doc, dict) else {}, config.path, ".".join(parents))
    reason = table._hide_variables(leaf, reason)
    return ConfigError(config.path, key, reason, line=_line_of(text, key))


def config_path(path: str | Path | None) -> Path:
    return Path(path or os.environ.get("RELAY_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate relay.toml. Raises ConfigError."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            file, None, "file not found (pass --config or set RELAY_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(file, None, f"cannot read: {e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, None, f"invalid TOML: {e}") from None
    return parse_config(doc, file.resolve(), text, env)


def parse_config(
    doc: Mapping[str, Any],
    file: Path,
    text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    from relay.providers import build_source_parts

    root = ConfigTable(doc, file, "", text, env)

    r = root.table("relay")
    relay = RelaySettings(
        database=r.path("database", "relay.db"),
        max_body_bytes=r.integer("max_body_bytes", 1_048_576, min=1024),
        dedupe_window=r.duration("dedupe_window", "48h"),
        retention=r.duration("retention", "7d"),
        shutdown_grace=r.duration("shutdown_grace", "10s"),
        host=r.string("host", "127.0.0.1"),
        port=r.integer("port", 8000, min=1, max=65535),
        workers=r.integer("workers", 1, min=1, max=64),
        max_header_bytes=r.integer("max_header_bytes", 65536, min=1024, max=16_777_216),
        body_timeout=r.duration("body_timeout", "30s"),
    )
    r.finish()
    problem = database_problem(relay.database)
    if problem:
        r.fail("database", problem)
    if relay.retention < relay.dedupe_window:
        r.fail(
            "retention", "must be at least dedupe_window, or retried events could be counted twice"
        )

    t = root.table("track", required=True)
    base_url = t.string("base_url").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        t.fail("base_url", f"must be an http:// or https:// URL, not {base_url!r}")
    problem = _url_problem(base_url)
    if problem:
        t.fail("base_url", problem)
    track = TrackSettings(
        base_url=base_url,
        api_key=t.secret("api_key", header=True),
        website_id=t.integer("website_id", min=1),
        batch_size=t.integer("batch_size", 25, min=1, max=25),
        flush_interval=t.duration("flush_interval", "5s"),
        requests_per_minute=t.integer("requests_per_minute", 60, min=1),
        timeout=t.duration("timeout", "10s"),
        max_event_age=t.duration("max_event_age", "72h"),
        max_backoff=t.duration("max_backoff", "5m"),
    )
    t.finish()

    s = root.table("sources")
    sources: dict[str, Source] = {}
    for name in list(s.data):
        table = s.table(name)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            s.fail(
                name,
                "a source name may hold only letters, digits, '-' and '_' (it is part of the URL)",
            )
        provider_name = table.string("provider")
        provider, verifier = build_source_parts(provider_name, table)
        mapping = table.path("mapping", f"mappings/{provider_name}.toml")
        if not mapping.is_file():
            table.fail("mapping", f"mapping file {mapping} not found")
        destination = Destination(
            base_url=track.base_url,
            api_key=table.secret("api_key", track.api_key, header=True),
            website_id=table.integer("website_id", track.website_id, min=1),
        )
        table.finish()
        sources[name] = Source(name, provider, verifier, mapping, destination)
    s.finish()
    root.finish()
    return Config(path=file, relay=relay, track=track, sources=sources)
