"""relay.toml: every mistake is one line naming file, key and reason; secrets never show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.config import default_mappings, load_config
from relay.settings import Secret, format_duration, parse_duration
from tests.conftest import MAPPINGS

API_KEY = "sk_live_CONFIGTEST_0123456789abcdef"
WEBHOOK_SECRET = "whsec_CONFIGTEST_fedcba9876543210"

BASE = f"""\
[relay]
database = "relay.db"
dedupe_window = "48h"

[track]
base_url = "http://127.0.0.1:9/api/v1"
api_key = "{API_KEY}"
website_id = 1
batch_size = 25
flush_interval = "5s"

[sources.stripe]
provider = "stripe"
secret = "{WEBHOOK_SECRET}"
mapping = "mappings/stripe.toml"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "mappings").symlink_to(MAPPINGS, target_is_directory=True)
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "relay.toml"
    path.write_text(text)
    return path


# (case, change to BASE, key named, reason fragment)
MISTAKES = [
    (
        "unset variable",
        ('api_key = "' + API_KEY + '"', 'api_key = "${RELAY_TEST_NOT_SET}"'),
        "track.api_key",
        "environment variable RELAY_TEST_NOT_SET is not set",
    ),
    ("unknown key", ("batch_size = 25", "batch_sise = 25"), "track.batch_sise", "unknown key"),
    (
        "wrong type",
        ("website_id = 1", 'website_id = "one"'),
        "track.website_id",
        "must be an integer, not a string",
    ),
    (
        "bad duration",
        ('flush_interval = "5s"', 'flush_interval = "5 parsecs"'),
        "track.flush_interval",
        "is not a duration",
    ),
    (
        "batch_size 0",
        ("batch_size = 25", "batch_size = 0"),
        "track.batch_size",
        "must be between 1 and 25, not 0",
    ),
    (
        "batch_size 26",
        ("batch_size = 25", "batch_size = 26"),
        "track.batch_size",
        "must be between 1 and 25, not 26",
    ),
    (
        "unknown provider",
        ('provider = "stripe"', 'provider = "square"'),
        "sources.stripe.provider",
        "unknown provider 'square'",
    ),
    (
        "missing mapping file",
        ('mapping = "mappings/stripe.toml"', 'mapping = "mappings/nope.toml"'),
        "sources.stripe.mapping",
        "nope.toml not found",
    ),
    (
        "secret of the wrong type",
        ('secret = "' + WEBHOOK_SECRET + '"', 'secret = ["' + WEBHOOK_SECRET + '", 7]'),
        "sources.stripe.secret",
        "list of strings",
    ),
    ("TOML syntax error", ("website_id = 1", "website_id = = 1"), None, "invalid TOML"),
]


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [m[1:] for m in MISTAKES],
    ids=[m[0] for m in MISTAKES],
)
def test_each_mistake_is_one_line_naming_file_key_and_reason(
    folder: Path, change: tuple[str, str], key: str | None, reason: str
) -> None:
    assert change[0] in BASE
    path = write(folder, BASE.replace(change[0], change[1]))
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"relay: {path}:"), line  # file:line
    if key is not None:
        assert f": {key}: " in line, line
    assert reason in line, line
    assert "Traceback" not in result.stderr
    assert API_KEY not in line and WEBHOOK_SECRET not in line


def test_the_line_number_points_at_the_key(folder: Path) -> None:
    path = write(folder, BASE.replace("batch_size = 25", "batch_size = 99"))
    line_no = BASE.splitlines().index("batch_size = 25") + 1
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.stderr.startswith(f"relay: {path}:{line_no}: track.batch_size: ")


STRIPE_TABLE = f"""\
[sources.stripe]
provider = "stripe"
secret = "{WEBHOOK_SECRET}"
mapping = "mappings/stripe.toml"
"""

# (case, how [sources.stripe] is written instead, the line its message must name)
SOURCE_FORMS = [
    ("a table", STRIPE_TABLE.replace('"stripe"', '"square"'), 'provider = "square"'),
    (
        "dotted keys",
        f'[sources]\nstripe.provider = "square"\nstripe.secret = "{WEBHOOK_SECRET}"\n',
        'stripe.provider = "square"',
    ),
    (
        "an inline table",
        f'[sources]\nstripe = {{ provider = "square", secret = "{WEBHOOK_SECRET}" }}\n',
        "stripe = {",
    ),
    (
        "a quoted table name",
        STRIPE_TABLE.replace("[sources.stripe]", '[sources."stripe"]').replace(
            '"stripe"\n', '"square"\n'
        ),
        'provider = "square"',
    ),
]


@pytest.mark.parametrize(
    ("table", "shown"), [f[1:] for f in SOURCE_FORMS], ids=[f[0] for f in SOURCE_FORMS]
)
def test_the_line_number_points_at_the_key_however_the_table_is_written(
    folder: Path, table: str, shown: str
) -> None:
    text = BASE.replace(STRIPE_TABLE, table)
    assert STRIPE_TABLE in BASE and text != BASE
    path = write(folder, text)
    line_no = next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(shown))
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"relay: {path}:{line_no}: sources.stripe.provider: unknown provider 'square'"
    ), result.stderr


# -- which mapping a source uses -------------------------------------------------------------

UNNAMED = BASE.replace('mapping = "mappings/stripe.toml"\n', "")


def test_a_source_that_names_no_mapping_takes_the_one_beside_the_config(folder: Path) -> None:
    config = load_config(write(folder, UNNAMED))
    assert config.sources["stripe"].mapping == folder / "mappings" / "stripe.toml"


def test_without_one_beside_the_config_it_takes_the_shipped_default(tmp_path: Path) -> None:
    path = write(tmp_path, UNNAMED)
    config = load_config(path)
    assert config.sources["stripe"].mapping == default_mappings() / "stripe.toml"
    assert config.sources["stripe"].mapping.is_file()
    # `relay check` finds the default mapping's examples beside it, and runs them.
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 mapping(s)" in result.stdout and " 0 example(s)" not in result.stdout


def test_a_named_mapping_that_does_not_exist_is_an_error_even_with_a_default(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, BASE)  # names mappings/stripe.toml, and tmp_path has no mappings/
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    line = one_line(result, path, "sources.stripe.mapping")
    assert f"mapping file {tmp_path / 'mappings' / 'stripe.toml'} not found" in line


def test_a_provider_without_a_shipped_mapping_must_name_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        UNNAMED + '\n[sources.shop]\nprovider = "hmac"\nsecret = "s"\nsignature_header = "X-Sig"\n',
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    line = one_line(result, path, "sources.shop.mapping")
    assert "is required: there is no " in line and "no default mapping for provider 'hmac'" in line


def test_a_real_process_exits_1_with_one_line_on_stderr(folder: Path) -> None:
    path = write(folder, BASE.replace("website_id = 1", "website_id = 0"))
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "track.website_id: must be >= 1, not 0" in proc.stderr


def test_a_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"relay: {tmp_path / 'nope.toml'}: file not found (pass --config or set RELAY_CONFIG)"
    )


def test_relay_config_variable_names_the_file(folder: Path) -> None:
    path = write(folder, BASE.replace("website_id = 1", "website_id = -1"))
    result = CliRunner().invoke(main, ["check"], env={"RELAY_CONFIG": str(path)})
    assert result.exit_code == 1
    assert str(path) in result.stderr and "track.website_id" in result.stderr


def test_secrets_are_redacted_in_repr_and_str(folder: Path) -> None:
    config = load_config(write(folder, BASE))
    assert config.track.api_key.reveal() == API_KEY
    source = config.sources["stripe"]
    assert source.destination.api_key.reveal() == API_KEY
    for shown in (repr(config), str(config), repr(config.track), repr(source), str(source)):
        assert API_KEY not in shown
        assert WEBHOOK_SECRET not in shown
    assert "**********" in repr(config.track)
    secret = Secret(WEBHOOK_SECRET)
    assert WEBHOOK_SECRET not in f"{secret} {secret!r} {[secret]}"
    # The destination's name is a fingerprint of the key, not the key.
    assert API_KEY not in source.destination.name


def test_variables_with_defaults(folder: Path) -> None:
    text = BASE.replace("website_id = 1", 'website_id = "${RELAY_TEST_WEBSITE:-7}"').replace(
        'api_key = "' + API_KEY + '"', 'api_key = "${RELAY_TEST_KEY}"'
    )
    path = write(folder, text)
    config = load_config(path, env={"RELAY_TEST_KEY": "sk_from_env"})
    assert config.track.website_id == 7
    assert config.track.api_key.reveal() == "sk_from_env"
    config = load_config(path, env={"RELAY_TEST_KEY": "k", "RELAY_TEST_WEBSITE": "3"})
    assert config.track.website_id == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5), ("10m", 600), ("48h", 172800), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 s", "s", "1x", "1h 30m", "-5s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_durations_in_the_config(folder: Path) -> None:
    text = BASE.replace('flush_interval = "5s"', 'flush_interval = "250ms"\ntimeout = 3')
    config = load_config(write(folder, text))
    assert config.track.flush_interval == 0.25
    assert config.track.timeout == 3.0
    assert config.relay.dedupe_window == 48 * 3600


def test_relative_paths_are_relative_to_the_config_file(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(folder, BASE)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(os.path.relpath(path))
    assert config.relay.database == folder / "relay.db"
    assert config.sources["stripe"].mapping == folder / "mappings" / "stripe.toml"
    assert config.path == path


# -- what `relay check` passed and `relay serve` then tripped on -----------------------------

SOURCE_KEYS = 'mapping = "mappings/stripe.toml"'

# (case, change to BASE, key named, reason fragment)
UNUSABLE = [
    (
        "website_id past 64 bits",
        ("website_id = 1", "website_id = 99999999999999999999"),
        "track.website_id",
        "must be between 1 and 9223372036854775807, not 99999999999999999999",
    ),
    (
        "a source's website_id past 64 bits",
        (SOURCE_KEYS, SOURCE_KEYS + "\nwebsite_id = 9223372036854775808"),
        "sources.stripe.website_id",
        "must be between 1 and 9223372036854775807",
    ),
    (
        "max_body_bytes past 64 bits",
        ('dedupe_window = "48h"', 'dedupe_window = "48h"\nmax_body_bytes = 18446744073709551616'),
        "relay.max_body_bytes",
        "must be between 1024 and 9223372036854775807",
    ),
    (
        "api_key with a line break",
        (f'api_key = "{API_KEY}"', f'api_key = "{API_KEY}\\n"'),
        "track.api_key",
        "must be printable ASCII without spaces or line breaks (it is sent in an HTTP header)",
    ),
    (
        "api_key not ASCII",
        (f'api_key = "{API_KEY}"', f'api_key = "{API_KEY}é"'),
        "track.api_key",
        "must be printable ASCII",
    ),
    (
        "api_key with a space",
        (f'api_key = "{API_KEY}"', f'api_key = "Bearer {API_KEY}"'),
        "track.api_key",
        "must be printable ASCII",
    ),
    (
        "a source's api_key with a tab",
        (SOURCE_KEYS, SOURCE_KEYS + f'\napi_key = "{API_KEY}\\t"'),
        "sources.stripe.api_key",
        "must be printable ASCII",
    ),
    (
        "base_url with a space",
        ('base_url = "http://127.0.0.1:9/api/v1"', 'base_url = "http://127.0.0.1:9/api v1"'),
        "track.base_url",
        "must not hold spaces, line breaks or control characters",
    ),
    (
        "base_url without a host",
        ('base_url = "http://127.0.0.1:9/api/v1"', 'base_url = "http:///api/v1"'),
        "track.base_url",
        "must name a host",
    ),
    (
        "base_url with a bad port",
        ('base_url = "http://127.0.0.1:9/api/v1"', 'base_url = "http://127.0.0.1:99999/api"'),
        "track.base_url",
        "is not a valid URL",
    ),
]


def one_line(result: Any, path: Path, key: str) -> str:
    """The one stderr line of a refused command, checked for file, key, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relay: {path}:"), lines[0]
    assert f": {key}: " in lines[0], lines[0]
    line: str = lines[0]
    return line


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    ("change", "key", "reason"), [m[1:] for m in UNUSABLE], ids=[m[0] for m in UNUSABLE]
)
def test_values_the_relay_cannot_use_are_refused_at_load(
    folder: Path, command: str, change: tuple[str, str], key: str, reason: str
) -> None:
    assert change[0] in BASE
    path = write(folder, BASE.replace(change[0], change[1]))
    result = CliRunner().invoke(main, [command, "--config", str(path)])
    line = one_line(result, path, key)
    assert reason in line, line
    assert API_KEY not in line
    assert not (folder / "relay.db").exists()


def database_at(folder: Path, setting: str) -> Path:
    return write(folder, BASE.replace('database = "relay.db"', f'database = "{setting}"'))


def not_sqlite(folder: Path) -> str:
    (folder / "notes.txt").write_text("not a database\n")
    return "notes.txt"


def short_file(folder: Path) -> str:
    (folder / "tiny.db").write_bytes(b"SQLite")  # shorter than the header
    return "tiny.db"


def bad_page_size(folder: Path) -> str:
    (folder / "odd.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    return "odd.db"


def directory(folder: Path) -> str:
    (folder / "data").mkdir()
    return "data"


def under_a_file(folder: Path) -> str:
    (folder / "data").write_text("a file where a directory should be\n")
    return "data/relay.db"


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (directory, "data is a directory, not a database file"),
        (not_sqlite, "notes.txt is not a SQLite database"),
        (short_file, "tiny.db is not a SQLite database"),
        (bad_page_size, "odd.db is not a SQLite database"),
        (under_a_file, "cannot create {folder}/data/relay.db: {folder}/data is not a directory"),
    ],
    ids=["directory", "not SQLite", "short file", "bad header", "under a file"],
)
def test_a_database_path_the_relay_cannot_open_is_one_line(
    folder: Path, command: str, make: Any, reason: str
) -> None:
    path = database_at(folder, make(folder))
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(main, [command, "--config", str(path)])
    line = one_line(result, path, "relay.database")
    assert reason.format(folder=folder) in line, line
    assert line.startswith(f"relay: {path}:2: ")  # the line of `database =`
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_database_without_permission_is_one_line(
    folder: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() == 0:  # root may write anything: answer from the mode bits, as for a user
        real = os.access

        def access(path: Any, mode: int) -> bool:
            denied = mode & os.W_OK and not os.stat(path).st_mode & 0o200
            return real(path, mode) and not denied

        monkeypatch.setattr(os, "access", access)
    (folder / "locked").mkdir()
    (folder / "locked").chmod(0o500)
    (folder / "relay.db").write_bytes(b"")
    (folder / "relay.db").chmod(0o400)
    try:
        for setting, reason in (
            ("locked/relay.db", "locked is not writable"),
            ("relay.db", "relay.db is not writable"),
        ):
            path = database_at(folder, setting)
            result = CliRunner().invoke(main, [command, "--config", str(path)])
            assert reason in one_line(result, path, "relay.database")
    finally:
        (folder / "locked").chmod(0o700)


def test_serve_opens_the_database_before_it_starts(folder: Path) -> None:
    """What only opening tells: a schema newer than this relay, a file SQLite cannot create."""
    import sqlite3

    newer = folder / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    (folder / "garbage.db").write_bytes(newer.read_bytes()[:100] + b"\xff" * 8000)
    for setting, reason in (
        ("newer.db", "the database has schema version 99, newer than this relay knows"),
        ("garbage.db", f"cannot open the database {folder / 'garbage.db'}: "),
        ("/proc/relay.db", "cannot open the database /proc/relay.db: "),
    ):
        path = database_at(folder, setting)
        line = serve_refused(path, "relay.database")
        assert reason in line, line
    # Found out after loading, a value from the environment is still named, not shown.
    path = database_at(folder, "${RELAY_TEST_DB}")
    line = serve_refused(path, "relay.database", {"RELAY_TEST_DB": str(folder / "garbage.db")})
    assert ": relay.database: cannot open the database ${RELAY_TEST_DB}: " in line, line
    assert "garbage.db" not in line


def serve_refused(path: Path, key: str, env: dict[str, str] | None = None) -> str:
    """`relay serve` as a process of its own (it sets up logging on the real stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"relay: {path}:2: {key}: "), line
    return line


def test_a_real_serve_process_names_the_database_in_one_line(folder: Path) -> None:
    path = database_at(folder, directory(folder))
    line = serve_refused(path, "relay.database")
    assert line.endswith(f": {folder / 'data'} is a directory, not a database file")


@pytest.mark.parametrize("setting", ["empty.db", "new/dirs/relay.db", "used.db"])
def test_a_database_the_relay_can_use_passes_check(folder: Path, setting: str) -> None:
    import sqlite3

    (folder / "empty.db").write_bytes(b"")
    sqlite3.connect(folder / "used.db").execute("CREATE TABLE t (x)").connection.close()
    path = database_at(folder, setting)
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == before  # check creates nothing
    assert load_config(path).relay.database == folder / setting
