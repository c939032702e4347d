"""relay.toml, parsed once into frozen, typed objects.

Every mistake is a ConfigError naming the file, the key and the reason. Values of the form
``${NAME}`` (or ``${NAME:-default}``) are taken from the environment; secrets are wrapped in
:class:`~relay.settings.Secret` so that ``repr()`` and logs show ``**********``. The typed reader
of one table, the secrets and the durations live in :mod:`relay.settings`, which the providers
use too.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from relay.errors import ConfigError

# Each name imported as itself is kept importable from here, for the modules that take it from
# relay.config.
from relay.settings import REDACTED as REDACTED
from relay.settings import ConfigTable as ConfigTable
from relay.settings import Secret as Secret
from relay.settings import format_duration as format_duration
from relay.settings import line_of
from relay.settings import parse_duration as parse_duration
from relay.settings import type_name as type_name

if TYPE_CHECKING:
    from relay.providers.base import Provider, Verifier

DEFAULT_CONFIG = "relay.toml"
# The mapping of a track source that names none: its events go on unchanged.
PASSTHROUGH = Path("(passthrough)")
PACKAGE_DIR = Path(__file__).resolve().parent


def default_mappings() -> Path:
    """The folder of the default mappings shipped with the relay: relay/defaults in an installed
    package (the wheel takes it from mappings/, see pyproject.toml), or mappings/ itself when the
    package runs from a checkout."""
    installed = PACKAGE_DIR / "defaults"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "mappings"


@dataclass(frozen=True)
class RelaySettings:
    database: Path | str  # a SQLite file, or a postgresql:// URL (str)
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
class ConsoleSettings:
    """`[console]`: the web console at /console (see relay/console/)."""

    enabled: bool = False
    token: Secret | None = None  # sign-in; required unless the gateway listens on loopback only


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

    @property
    def destinations(self) -> list[Destination]:
        """Where its events may go: its destination, and for a track source one per website
        it may send to."""
        websites: tuple[int, ...] | None = getattr(self.provider, "websites", None)
        if not websites:
            return [self.destination]
        d = self.destination
        return [Destination(d.base_url, d.api_key, w) for w in websites]

    def website_destination(self, website_id: int | None) -> Destination:
        """The destination of an event for `website_id` (a track source's), else the
        source's own."""
        for d in self.destinations:
            if d.website_id == website_id:
                return d
        return self.destination


@dataclass(frozen=True)
class Config:
    path: Path
    relay: RelaySettings
    track: TrackSettings
    sources: Mapping[str, Source]
    console: ConsoleSettings | None = None  # None: no [console] table, /console is 404

    @property
    def destinations(self) -> list[Destination]:
        seen: dict[str, Destination] = {}
        for s in self.sources.values():
            for d in s.destinations:
                seen.setdefault(d.name, d)
        return list(seen.values())


SQLITE_HEADER = b"SQLite format 3\x00"


def _database(r: ConfigTable) -> Path | str:
    """`[relay] database`: a `postgresql://` (or `postgres://`) URL, else a SQLite file. Any
    other `scheme://` is refused: a URL is never taken as a file path. Messages never show
    the URL (it may hold a password)."""
    from relay.storage import URL_SCHEMES, is_database_url

    value: str = r.string("database", "relay.db")
    if not is_database_url(value):
        path: Path = r.path("database", "relay.db")
        return path
    scheme = value.split("://", 1)[0].lower()
    if scheme not in URL_SCHEMES:
        r.fail(
            "database",
            f"unknown database URL scheme {scheme}:// (a path for SQLite, or a postgresql:// URL)",
        )
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        r.fail("database", "PostgreSQL needs psycopg: pip install 'webhook-relay[postgres]'")
    try:
        conninfo_to_dict(value)
        urlsplit(value).port  # noqa: B018 (raises ValueError for a port that is not a number)
    except Exception:
        r.fail("database", "not a valid postgresql:// URL")
    return value


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
    return ConfigError(config.path, key, reason, line=line_of(text, key))


def mapping_path(table: ConfigTable, provider: str) -> Path:
    """A source's mapping file: the one it names (which must exist), else
    mappings/<provider>.toml beside the config, else the default one shipped with the relay."""
    if "mapping" in table:
        named: Path = table.path("mapping")
        if not named.is_file():
            table.fail("mapping", f"mapping file {named} not found")
        return named
    beside: Path = table.path("mapping", f"mappings/{provider}.toml")
    if beside.is_file():
        return beside
    shipped = default_mappings() / f"{provider}.toml"
    if shipped.is_file():
        return shipped
    table.fail(
        "mapping",
        f"is required: there is no {beside} and the relay ships no default mapping for "
        f"provider {provider!r}",
    )


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
        database=_database(r),
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
    problem = database_problem(relay.database) if isinstance(relay.database, Path) else None
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
        if provider_name == "track" and "mapping" not in table:
            mapping = PASSTHROUGH  # a track source needs no mapping
        else:
            mapping = mapping_path(table, provider_name)
        destination = Destination(
            base_url=track.base_url,
            api_key=table.secret("api_key", track.api_key, header=True),
            website_id=table.integer("website_id", track.website_id, min=1),
        )
        table.finish()
        sources[name] = Source(name, provider, verifier, mapping, destination)
    s.finish()
    console = None
    if "console" in root:
        c = root.table("console")
        console = ConsoleSettings(
            enabled=c.boolean("enabled", False), token=c.secret("token", None)
        )
        c.finish()
    root.finish()
    return Config(path=file, relay=relay, track=track, sources=sources, console=console)
