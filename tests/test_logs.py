"""Log output: the text formatter's cached time, the batched handler's whole lines, and one
line per record whatever a sender puts in the values logged."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from relay.logs import BatchedStreamHandler, JSONFormatter, TextFormatter, line_chunks
from tests.conftest import Sandbox, relay_toml
from tests.servers import free_port
from tests.test_process import RelayProcess

FORGED = "2026-01-01 00:00:00,000 INFO    relay.webhook: webhook stripe 200 accepted=1"


def record(created: float) -> logging.LogRecord:
    r = logging.LogRecord("relay.webhook", logging.INFO, __file__, 1, "webhook %s", ("x",), None)
    r.created = created
    r.msecs = (created - int(created)) * 1000
    return r


def test_each_line_is_stamped_as_the_standard_formatter_would() -> None:
    ours = TextFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # the same second twice, the next second, a jump back (clock set back), a far date
    for created in (1_790_000_000.001, 1_790_000_000.999, 1_790_000_001.5, 1_789_999_000.25, 4e9):
        r = record(created)
        assert ours.format(r) == standard.format(r)


def test_lines_are_written_whole_in_chunks_a_pipe_keeps_together() -> None:
    lines = [b"a" * 1000 + b"\n"] * 9 + [b"b" * 5000 + b"\n", b"c\n"]
    chunks = line_chunks(lines, 4096)
    assert b"".join(chunks) == b"".join(lines)
    assert [len(c) for c in chunks] == [4004, 4004, 1001, 5001, 2]
    for chunk in chunks:
        assert chunk.endswith(b"\n") and (len(chunk) <= 4096 or chunk.count(b"\n") == 1)
    assert line_chunks([], 4096) == []


def test_the_handler_writes_every_line_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    handler = BatchedStreamHandler(fd, interval=0.01)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.batched")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:

        def log_lines(t: int) -> None:
            for n in range(500):  # warnings are written at once, while the flusher writes too
                (logger.warning if n % 50 == 0 else logger.info)("t%d n%d", t, n)

        threads = [threading.Thread(target=log_lines, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        logger.warning("written at once")
        for t in threads:
            t.join()
        handler.flush_now()
        lines = path.read_text().splitlines()
        assert sorted(lines) == sorted(
            [f"t{t} n{n}" for t in range(4) for n in range(500)] + ["written at once"]
        )
        for t in range(4):  # each thread's lines in the order it logged them
            mine = [line for line in lines if line.startswith(f"t{t} ")]
            assert mine == [f"t{t} n{n}" for n in range(500)]
    finally:
        logger.removeHandler(handler)
        os.close(fd)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (f"nope\n{FORGED}", f"nope\\n{FORGED}"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("esc\x1b[2Jdel\x7fnul\x00", "esc\\x1b[2Jdel\\x7fnul\\x00"),
        ("nel\x85ls\u2028ps\u2029", "nel\\x85ls\\u2028ps\\u2029"),
        ("caf\u00e9 \u2603 ok", "caf\u00e9 \u2603 ok"),
    ],
)
def test_control_characters_in_a_value_are_escaped_on_one_line(value: str, shown: str) -> None:
    r = logging.LogRecord(
        "relay.webhook", logging.INFO, __file__, 1, "webhook %s 404", (value,), None
    )
    line = TextFormatter().format(r)
    assert line.endswith(f"relay.webhook: webhook {shown} 404")
    assert len(line.splitlines()) == 1
    entry = JSONFormatter().format(r)
    assert len(entry.splitlines()) == 1
    assert json.loads(entry)["message"] == f"webhook {value} 404"  # JSON keeps the exact value


def test_a_traceback_stays_under_its_record() -> None:
    try:
        raise ValueError(f"bad\n{FORGED}\rtail")
    except ValueError:
        exc_info = sys.exc_info()
    r = logging.LogRecord("relay.webhook", logging.ERROR, __file__, 1, "failed", (), exc_info)
    lines = TextFormatter().format(r).split("\n")
    assert lines[0].endswith("relay.webhook: failed")
    assert lines[1] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in lines[1:])
    assert lines[-1] == f"  {FORGED}\\rtail"
    assert len(JSONFormatter().format(r).splitlines()) == 1


def test_a_forged_line_in_the_url_path_stays_on_its_own_line(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(relay_toml(sandbox.base_url, tmp_path / "relay.db"))
    relay = RelayProcess(config, free_port(), tmp_path / "relay.log")
    relay.start()
    try:
        path = "/webhooks/nope%0A" + FORGED.replace(" ", "%20") + "%0D%E2%80%A8x"
        r = httpx.post(f"http://127.0.0.1:{relay.port}{path}", content=b"{}")
        assert r.status_code == 404
        deadline = time.monotonic() + 5
        while "nope" not in relay.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.stop()
    lines = relay.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    [line] = [line for line in lines if "nope" in line]
    assert f"webhook nope\\n{FORGED}\\r\\u2028x 404 unknown_source" in line
