"""Log setup: one human-readable line per record, or one JSON object per line."""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from typing import TextIO


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
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-11-27 02:57:28,758 INFO    relay.webhook: message`, with the date and time part
    formatted once a second rather than once a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines into a buffer that a background thread flushes every `interval` seconds.

    A line per webhook must not cost a write system call per webhook on the event loop;
    warnings and errors are flushed at once, and whatever is buffered at exit is flushed.
    """

    def __init__(self, stream: TextIO, interval: float = 0.1):
        super().__init__(stream)
        self.interval = interval
        thread = threading.Thread(target=self._flusher, name="relay-logs", daemon=True)
        thread.start()
        atexit.register(self.flush_now)

    def flush(self) -> None:
        pass  # the flusher thread does it

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush_now(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _flusher(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush_now()


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    stream = open(  # noqa: SIM115  (lives as long as the process)
        sys.stderr.fileno(),
        "w",
        buffering=1 << 16,
        encoding="utf-8",
        errors="replace",
        closefd=False,
    )
    handler = BatchedStreamHandler(stream)
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
