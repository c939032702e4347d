"""Log output: the text formatter's cached time, and the batched handler's whole lines."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from relay.logs import BatchedStreamHandler, TextFormatter, line_chunks


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
