"""Log setup: one human-readable line per record, or one JSON object per line.

Log lines carry what senders control (a source name from the URL path, event ids, reasons
quoting a body): a newline in one of them must not start a line that looks like the relay's
own. Both formatters write every control character of a message as an escape.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time

# Characters that end a line for some reader (splitlines(), editors, log viewers) or drive a
# terminal: C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What json.dumps(ensure_ascii=False) leaves as it is among those.
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """`text` on one line: each control character written as its escape (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


def continuation(text: str) -> str:
    """A multi-line text (a traceback) as lines under the record: each indented, so that none
    can pass for a record of its own, whatever an exception's message holds."""
    return "".join("\n  " + escape_controls(line) for line in text.rstrip("\n").split("\n"))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        if _JSON_RAW.search(line):
            line = _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", line)
        return line


class TextFormatter(logging.Formatter):
    """`2026-11-27 02:57:28,758 INFO    relay.webhook: message`, with the date and time part
    formatted once a second rather than once a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        if record.exc_info:
            line += continuation(self.formatException(record.exc_info))
        elif record.exc_text:
            line += continuation(record.exc_text)
        if record.stack_info:
            line += continuation(self.formatStack(record.stack_info))
        return line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is never interleaved


class BatchedStreamHandler(logging.Handler):
    """Collects lines that a background thread writes every `interval` seconds.

    A line per webhook must not cost a write system call per webhook on the event loop;
    warnings and errors are written at once, and whatever is left at exit is written. Writes
    end on a line and hold at most PIPE_BUF bytes, so that worker processes sharing one stderr
    pipe (workers > 1) never cut into each other's lines.
    """

    def __init__(self, fd: int, interval: float = 0.1):
        super().__init__()
        self.fd = fd
        self.interval = interval
        self._lines: list[bytes] = []
        self._lines_lock = threading.Lock()  # held only to append or take the lines
        # Batches go out in the order they were taken. Never held while waiting for self.lock
        # (which handle() holds around emit(), and emit() may write): no lock cycle.
        self._write_lock = threading.Lock()
        thread = threading.Thread(target=self._flusher, name="relay-logs", daemon=True)
        thread.start()
        atexit.register(self.flush_now)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        with self._lines_lock:
            self._lines.append(line)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush(self) -> None:
        pass  # the flusher thread does it

    def flush_now(self) -> None:
        with self._write_lock:
            with self._lines_lock:
                lines, self._lines = self._lines, []
            for chunk in line_chunks(lines, PIPE_BUF):
                try:
                    while chunk:
                        chunk = chunk[os.write(self.fd, chunk) :]
                except OSError:
                    return  # stderr is gone: nowhere to say so

    def _flusher(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._lines:
                self.flush_now()


def line_chunks(lines: list[bytes], limit: int) -> list[bytes]:
    """Whole lines joined into chunks of at most `limit` bytes (a longer line goes alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = BatchedStreamHandler(sys.stderr.fileno())
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # Neither format shows the caller's file and line, thread or process: not looking them up
    # makes each record several microseconds cheaper (a line is logged per webhook).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # Client libraries log each request at INFO/DEBUG: noise, and a debug line could carry a
    # header. The relay logs its own one line per batch instead.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
