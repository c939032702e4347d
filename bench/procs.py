"""The processes a benchmark starts, and the guarantee that none outlives it.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only the bench, which
then stops the children itself: SIGTERM, a grace period, SIGKILL. SIGTERM sent to the bench
becomes a KeyboardInterrupt, so the same cleanup runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_command() -> list[str]:
    """The `relay` command of this checkout: run from the repository root (REPO), `python -m
    relay` imports the package beside bench/, whatever else is installed."""
    return [PYTHON, "-m", "relay"]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET on 127.0.0.1 (no client library: used while timing a start)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


class Child:
    """One started process, its log file, and how to stop it."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path, spawned: float):
        self.name = name
        self.popen = popen
        self.log = log
        self.spawned = spawned  # perf_counter() just before the spawn

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, port: int, path: str = "/healthz", timeout: float = 20.0) -> float:
        """Poll until `path` answers 200; seconds since the spawn. Raises if the process died."""
        deadline = time.perf_counter() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(OSError, ValueError, IndexError):
                if http_get(port, path, timeout=1.0)[0] == 200:
                    return time.perf_counter() - self.spawned
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.005)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Procs:
    """Starts children and stops every one of them on exit, error or interrupt."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            spawned = time.perf_counter()
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd or self.workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        child = Child(name, popen, log, spawned)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 15.0) -> int | None:
        code = child.stop(grace)
        if child in self.children:
            self.children.remove(child)
        return code

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop(grace=5.0)
        self.children.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def proc_status(pid: int, field: str) -> int | None:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM), in bytes; None if unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process and its live descendants (a supervisor's workers)
    have used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = (int(fields[11]) + int(fields[12])) / ticks
    for child in _children(pid):
        total += cpu_seconds(child) or 0.0
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out
