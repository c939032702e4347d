"""Mapping in a process of its own, beside the one that answers webhooks (`relay serve`).

Mapping a webhook costs more CPU than acknowledging it, and a thread of the gateway's process
would take that CPU from the answers: the event loop and a mapping thread share one GIL, and
each waits for the other (measured: half the webhooks a second). So `relay serve` (one
process) maps in a child process, on the other core:

- the gateway stores each webhook and its keys, answers, and sends the child a line "w":
  there is something in the unmapped set. One wake per turn of the gateway's loop at most.
- the child reads the unmapped set from the store, maps on its own event loop, saves each
  round's outbox rows (the same `Mapper` as in one process), and writes one line of JSON back
  per round: what each destination got (the forwarder's queue depth) and the counts for the
  gateway's metrics. Logs go to the same stderr in the same format.
- The child maps with the mappings' text as the gateway loaded and checked them, sent as the
  first line; SIGHUP: the gateway loads and checks them again (and logs the outcome, once),
  then sends the new text. A stop sends "s": the child finishes its round and
  exits; what it did not map stays in the unmapped set, mapped at the next start.
- A child that dies is started again after a second; it maps what is left. A child whose
  gateway is gone is killed with it (the kernel sends it SIGKILL).

The unmapped set is the contract between the two, so nothing is lost between them, and a
webhook is mapped once whoever saves it (see relay/mapper.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from relay.config import Config
from relay.mapper import Job, reloaded_mappings
from relay.mapping import Mapping, load_mappings
from relay.metrics import Metrics
from relay.storage import Queued

log = logging.getLogger("relay.webhook")

SOCKET_ENV = "RELAY_MAPPER_FD"
CONFIG_ENV = "RELAY_MAPPER_CONFIG"
LOG_ENV = "RELAY_MAPPER_LOG"  # "<format>/<level>"
START_TIMEOUT = 60.0  # for the child to compile the mappings and say it is ready
RESTART_DELAY = 1.0
SCAN_EVERY = 1.0  # the child reads the unmapped set at least this often, woken or not
# After a wake the child waits this long before it reads: the webhooks stored meanwhile are
# mapped and saved in the same round (one write instead of one each).
GATHER = 0.01
WAKE, STOP = b"w\n", b"s\n"
LINE_LIMIT = 64 << 20  # one line: every mapping file's text, or one round's report


def _queued_json(queued: dict[str, Queued]) -> dict[str, list[Any]]:
    return {dest: [q.pending, q.oldest, q.dead] for dest, q in queued.items()}


def _queued_of(raw: dict[str, list[Any]]) -> dict[str, Queued]:
    return {
        dest: Queued(int(p), None if o is None else float(o), int(d))
        for dest, (p, o, d) in raw.items()
    }


def _mappings_line(mappings: dict[str, Mapping]) -> bytes:
    texts = {str(m.path): m.text for m in mappings.values()}
    return json.dumps({"mappings": texts}).encode() + b"\n"


class MapperProcess:
    """The gateway's side: what `Runtime` and `Pipeline` use in place of a `Mapper`.

    The child is given the mappings' text as this process loaded and checked them, so the two
    never map with different files (one edited between their starts, say)."""

    def __init__(self, config: Config, metrics: Metrics, log_format: str, log_level: str):
        self.config = config
        self.metrics = metrics
        self.log_format = log_format
        self.log_level = log_level
        self.mappings = load_mappings(config)
        self.on_queued: Callable[[dict[str, Queued]], None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._woken = False
        self._stopping = False

    # -- life

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name="mapper-process")

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env[SOCKET_ENV] = str(theirs.fileno())
        env[CONFIG_ENV] = str(self.config.path.resolve())
        env[LOG_ENV] = f"{self.log_format}/{self.log_level}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "relay.mapproc"],
            env=env,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,  # a Ctrl-C reaches the gateway, which stops the child
        )
        theirs.close()
        self._reader, self._writer = await asyncio.open_connection(sock=ours, limit=LINE_LIMIT)
        self._writer.write(_mappings_line(self.mappings))
        try:
            line = await asyncio.wait_for(self._reader.readline(), START_TIMEOUT)
            ready = json.loads(line).get("ready") if line else None
        except (TimeoutError, ValueError, ConnectionError):
            ready = None
        if ready is not True:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
            raise RuntimeError("the mapper process did not start (see the log above)")
        self._woken = False
        self.wake()  # what was stored before the child started, or while it was down

    async def stop(self, grace: float) -> None:
        """The child maps what it has, for up to `grace` seconds, and exits."""
        self._stopping = True
        self._send(STOP)
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), grace + 2)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        if self._writer is not None:
            self._writer.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- what the gateway tells it

    def submit(self, job: Job) -> None:
        self.wake()

    def wake(self) -> None:
        if not self._woken:  # one wake per turn of the loop, however many webhooks
            self._woken = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._woken = False
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() == 0:
            self._send(WAKE)  # (else a wake is on its way already)

    def _send(self, what: bytes) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(what)  # gone: it is started again, and reads the store then

    def reload(self) -> bool:
        fresh = reloaded_mappings(self.config)
        if fresh is None:
            return False
        self.mappings = fresh
        self._send(_mappings_line(fresh))
        return True

    # -- what it tells the gateway

    async def _watch(self) -> None:
        while True:
            await self._read()
            proc = self._proc
            code = None if proc is None else await asyncio.to_thread(proc.wait)
            if self._stopping:
                return
            log.error("mapper process exited with %s; starting it again", code)
            while not self._stopping:
                await asyncio.sleep(RESTART_DELAY)
                try:
                    await self._spawn()
                    break
                except (OSError, RuntimeError) as e:
                    log.error("mapper process: %s; trying again", e)

    async def _read(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                self._report(json.loads(line))
        except (ConnectionError, ValueError) as e:
            log.error("mapper process: %s", e)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _report(self, message: dict[str, Any]) -> None:
        for source, outcome, n in message.get("events", ()):
            self.metrics.events.labels(source, outcome).inc(n)
        for source, n in message.get("fitted", {}).items():
            self.metrics.fitted.labels(source).inc(n)
        queued = _queued_of(message.get("queued", {}))
        for dest, q in queued.items():
            if q.dead:
                self.metrics.dead_letters.labels(dest).inc(q.dead)
        if self.on_queued is not None and queued:
            self.on_queued(queued)


# -- the child ---------------------------------------------------------------------------------


class _Tally:
    """The counters `Mapper` increments, kept for the next report instead of exported."""

    class _Counter:
        def __init__(self) -> None:
            self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()

        def labels(self, *key: str) -> _Tally._Inc:
            return _Tally._Inc(self.counts, key)

    class _Inc:
        def __init__(self, counts: collections.Counter[tuple[str, ...]], key: tuple[str, ...]):
            self.counts, self.key = counts, key

        def inc(self, n: float = 1) -> None:
            self.counts[self.key] += int(n)

    def __init__(self) -> None:
        self.events = self._Counter()
        self.fitted = self._Counter()
        self.dead_letters = self._Counter()  # reported with the queue (Queued.dead)

    def report(self, queued: dict[str, Queued]) -> bytes:
        message = {
            "queued": _queued_json(queued),
            "events": [[*k, n] for k, n in self.events.counts.items()],
            "fitted": {k[0]: n for k, n in self.fitted.counts.items()},
        }
        self.events.counts.clear()
        self.fitted.counts.clear()
        self.dead_letters.counts.clear()
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def _child(config: Config, sock: socket.socket) -> None:
    from relay.mapper import Mapper
    from relay.storage import open_store

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
    first = json.loads(await reader.readline() or b"{}")
    mappings = load_mappings(config, first.get("mappings", {}))
    store = open_store(config.relay.database, shared=True)
    await store.open()
    tally = _Tally()
    mapper = Mapper(config, store, tally, inline=True, mappings=mappings)  # type: ignore[arg-type]
    mapper.on_round = lambda queued: writer.write(tally.report(queued))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await mapper.start()
    mapper.scan()
    writer.write(b'{"ready":true}\n')

    async def commands() -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), SCAN_EVERY)
            except TimeoutError:
                mapper.scan()
                continue
            if not line or line == STOP:
                break
            if line.startswith(b"{"):  # mappings reloaded: checked and logged by the gateway
                texts = json.loads(line).get("mappings", {})
                mapper.mappings = load_mappings(config, texts)
                continue
            await asyncio.sleep(GATHER)
            mapper.scan()
        stop.set()

    task = asyncio.create_task(commands())
    await stop.wait()
    task.cancel()
    await mapper.stop(config.relay.shutdown_grace)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()
    await store.close()


def _die_with_parent() -> None:
    """The child lives and dies with its gateway: what it had not saved stays unmapped, for
    the next start (a graceful stop lets it finish instead)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the gateway died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    from relay.config import load_config
    from relay.logs import setup_logging

    fmt, _, level = os.environ.get(LOG_ENV, "text/info").partition("/")
    setup_logging(fmt, level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when to stop
    _die_with_parent()
    sock = socket.socket(fileno=int(os.environ[SOCKET_ENV]))
    started = time.monotonic()
    try:
        config = load_config(os.environ[CONFIG_ENV])
        asyncio.run(_child(config, sock))
    except Exception as e:  # one line, as the gateway's own errors; it starts the child again
        log.error(
            "mapper process stopped after %.1f s: %s: %s",
            time.monotonic() - started,
            type(e).__name__,
            e,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
