"""`relay serve` with `workers` > 1: a supervisor and that many worker processes.

One Python process spends about one core; a burst of webhooks wants them all. The supervisor
brings the database schema up to date, opens one listening socket per worker on the same
address (SO_REUSEPORT: the kernel spreads connections over them), and starts each worker as
`python -m relay serve` with its socket. Every worker verifies, maps, dedupes and stores the
webhooks it receives, writing to the one SQLite file (its write lock orders the workers, and
dedupe happens inside it); worker 0 alone forwards to the track API and does the housekeeping.

The supervisor passes SIGTERM (drain) and SIGHUP (reload the mappings) on to every worker,
starts a worker again when one dies, and gives up (exit 1) when workers keep dying at start.
A worker stops when its supervisor is gone, so that no orphan keeps the port.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass

from relay.config import Config
from relay.errors import ConfigError
from relay.metrics import MULTIPROCESS_DIR

log = logging.getLogger("relay")

WORKER_ENV = "RELAY_WORKER"  # "<index>/<count>", set by the supervisor only
LISTEN_FD_ENV = "RELAY_LISTEN_FD"
SUPERVISOR_ENV = "RELAY_SUPERVISOR_PID"
RESTART_DELAY = 1.0
QUICK_EXIT = 10.0  # a worker that dies this soon after its start did not really start
QUICK_EXITS_ALLOWED = 3


@dataclass(frozen=True)
class Role:
    index: int
    count: int
    sock: socket.socket


def worker_role() -> Role | None:
    """This process's part when a supervisor started it, else None."""
    spec = os.environ.get(WORKER_ENV)
    if not spec:
        return None
    index, _, count = spec.partition("/")
    sock = socket.socket(fileno=int(os.environ[LISTEN_FD_ENV]))
    return Role(int(index), int(count), sock)


def die_with_supervisor() -> None:
    """SIGTERM this worker (a graceful drain) as soon as its supervisor is gone."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0"))
    if not supervisor:
        return
    try:  # Linux: the kernel sends it the moment the supervisor dies
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # elsewhere, and for a supervisor that died before prctl
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="relay-supervisor-watch", daemon=True).start()


def listen(host: str, port: int) -> socket.socket:
    """One of the workers' listening sockets. Raises OSError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def port_is_free(host: str, port: int) -> None:
    """SO_REUSEPORT lets our sockets share a port, and also join a stranger already on it
    (a second relay): refuse a port that anything listens on. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@dataclass
class Worker:
    index: int
    sock: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0


class Supervisor:
    def __init__(
        self,
        config: Config,
        host: str,
        port: int,
        count: int,
        log_format: str,
        log_level: str,
    ):
        self.config = config
        self.host = host
        self.port = port
        self.log_format = log_format
        self.log_level = log_level
        self.stopping = False
        self.failed = False
        self.metrics_dir = ""
        self.workers: list[Worker] = []
        try:
            port_is_free(host, port)
            for i in range(count):
                self.workers.append(Worker(i, listen(host, port)))
        except OSError as e:
            for w in self.workers:
                w.sock.close()
            raise ConfigError(config.path, "relay.port", str(e)) from None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(self.config.path.resolve()),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-format",
            self.log_format,
            "--log-level",
            self.log_level,
        ]

    def spawn(self, w: Worker) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = f"{w.index}/{len(self.workers)}"
        env[LISTEN_FD_ENV] = str(w.sock.fileno())
        env[SUPERVISOR_ENV] = str(os.getpid())
        env[MULTIPROCESS_DIR] = self.metrics_dir
        # Its own session: a Ctrl-C in the terminal reaches the supervisor only, which then
        # asks each worker once to drain (a second signal would make uvicorn stop at once).
        w.proc = subprocess.Popen(
            self.command(), env=env, pass_fds=(w.sock.fileno(),), start_new_session=True
        )
        w.started = time.monotonic()

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    os.kill(w.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def _on_stop(self, sig: int, frame: types.FrameType | None) -> None:
        if not self.stopping:
            log.info(
                "supervisor: %s, draining %d workers", signal.Signals(sig).name, len(self.workers)
            )
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def _on_reload(self, sig: int, frame: types.FrameType | None) -> None:
        self.signal_all(signal.SIGHUP)

    def run(self) -> bool:
        """Run until stopped; True when every worker drained and exited 0."""
        from relay.cli.common import open_database

        open_database(self.config)  # the schema, before any worker opens it
        self.metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        previous = {
            s: signal.signal(s, h)
            for s, h in (
                (signal.SIGTERM, self._on_stop),
                (signal.SIGINT, self._on_stop),
                (signal.SIGHUP, self._on_reload),
            )
        }
        try:
            for w in self.workers:
                self.spawn(w)
            log.info(
                "supervisor: %d workers on %s:%d (%s)",
                len(self.workers),
                self.host,
                self.port,
                # PostgreSQL: the workers are replicas, one elected sender per API key
                "replicas" if isinstance(self.config.relay.database, str) else "worker 0 forwards",
            )
            self._watch()
        finally:
            self.stopping = True
            self.signal_all(signal.SIGTERM)
            for w in self.workers:
                if w.proc is not None:
                    w.proc.wait()
                w.sock.close()
            for s, h in previous.items():
                signal.signal(s, h)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return not self.failed and all(
            w.proc is not None and w.proc.returncode == 0 for w in self.workers
        )

    def _watch(self) -> None:
        while True:
            running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
            if not running and self.stopping:
                return
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return
            w = next((w for w in self.workers if w.proc is not None and w.proc.pid == pid), None)
            if w is None or w.proc is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            w.proc.returncode = code
            if self.stopping:
                continue
            lived = time.monotonic() - w.started
            w.quick_exits = w.quick_exits + 1 if lived < QUICK_EXIT else 0
            if w.quick_exits >= QUICK_EXITS_ALLOWED:
                log.error(
                    "supervisor: worker %d exited with %d %d times right after starting; "
                    "stopping (see its log above)",
                    w.index,
                    code,
                    w.quick_exits,
                )
                self.failed = True
                self.stopping = True
                self.signal_all(signal.SIGTERM)
                continue
            log.error("supervisor: worker %d exited with %d; starting it again", w.index, code)
            deadline = time.monotonic() + RESTART_DELAY
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.stopping:
                self.spawn(w)
