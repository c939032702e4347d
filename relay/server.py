"""Running the gateway under uvicorn, with the relay's own signal handling.

SIGTERM and SIGINT first make every new webhook answer 503 (so senders retry elsewhere or
later), then uvicorn stops listening and waits for requests under way, then the forwarder
finishes or hands back its in-flight batches within `shutdown_grace`, and the database is
closed. SIGHUP reloads the mappings.

HTTP is uvicorn's httptools protocol with the bounds that llhttp leaves to its host: a
request's header block may hold `max_header_bytes` (431 beyond) and must arrive within
`body_timeout` (408); the body's own time limit is the webhook handler's.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import types
from typing import Any, ClassVar

import uvicorn
from starlette.routing import BaseRoute
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from relay.app import Runtime, create_app
from relay.config import Config, format_duration
from relay.workers import Supervisor, die_with_supervisor, worker_role

log = logging.getLogger("relay.http")

CHUNK_FRAMING = 32  # bytes a chunk of a chunked body may spend on its size line and CRLFs
LINGER = 2.0  # seconds a refused sender has to stop sending and read the answer


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools with a size and a time limit on each request's header block.

    llhttp keeps a header of any size until its end arrives (an 8 MB header is read whole),
    and uvicorn arms no timer between a request's first byte and its last header. Here the
    bytes of each request that are not its body (request line, headers, chunk framing,
    trailers) are counted as they arrive: past `max_header_bytes` the sender gets 431, at most
    one read (64 KB) later. Headers that take longer than `header_timeout` get 408.
    """

    max_header_bytes: ClassVar[int] = 65536
    header_timeout: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._framing = 0  # bytes of this request that are not its body
        self._chunks = 0
        self._in_headers = True
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered; what more comes is read and dropped until the sender stops
        if self._in_headers and self._timer is None:
            self._timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        self._framing += len(data)
        super().data_received(data)
        if self._framing > self.max_header_bytes + CHUNK_FRAMING * self._chunks:
            self._refuse(431, "headers_too_large", self._too_large)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        self._cancel_timer()
        # All of a header block can come in one read: counted exactly before any handler runs.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._in_headers = True  # no request of this block started
            self._refuse(431, "headers_too_large", self._too_large)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        if not self._refused:
            super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._framing = self._chunks = 0
        self._in_headers = True

    @property
    def _too_large(self) -> str:
        return f"request headers over {self.max_header_bytes} bytes"

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        if not self._in_headers or self._refused or self.transport.is_closing():
            return
        if self._framing == 0:  # not a byte of a request yet: nothing to answer
            self.transport.close()
            return
        timeout = format_duration(self.header_timeout)
        self._refuse(408, "request_timeout", f"request headers not received within {timeout}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_timer()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("%s: %d %s: %s", client, status, code, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self._in_headers or cycle.response_started:
                self.transport.close()  # an answer is under way on this connection: no room
                return
            # Trailers of a request whose handler waits for the rest of its body: the handler
            # sees the sender gone, and whatever it would answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        body = json.dumps({"ok": False, "error": code, "message": message}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        # Closing with the sender's bytes unread would reset the connection, and a sender still
        # writing its request would never read the answer: close once it stops (eof_received),
        # or LINGER seconds from now.
        if self.transport.can_write_eof():  # TLS cannot half-close
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER, self.transport.close)


def http_protocol(max_header_bytes: int, header_timeout: float) -> type[BoundedHttpProtocol]:
    """The protocol class for one server's limits (uvicorn makes one instance a connection)."""
    return type(
        "BoundedHttpProtocol",
        (BoundedHttpProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout},
    )


class RelayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What is alive now (modules, compiled mappings, the app) lives as long as the
        # process: out of the collector's sight, a full collection under load takes a few
        # milliseconds instead of 30 to 40, and the latency of every webhook waiting on it.
        gc.freeze()

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        self.runtime.draining = True
        super().handle_exit(sig, frame)
        # uvicorn would raise the signal again after its graceful shutdown, making the exit
        # status "killed by SIGTERM" (or a KeyboardInterrupt traceback for SIGINT). A clean
        # drain is a clean exit: status 0.
        self._captured_signals.clear()


def build_server(
    config: Config,
    host: str,
    port: int,
    mounts: list[BaseRoute] | None = None,
    worker: int = 0,
    workers: int = 1,
    mapper_process: tuple[str, str] | None = None,
    **options: Any,
) -> RelayServer:
    app = create_app(
        config, mounts=mounts, worker=worker, workers=workers, mapper_process=mapper_process
    )
    uv = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=max(1, int(config.relay.shutdown_grace)),
        http=http_protocol(config.relay.max_header_bytes, config.relay.body_timeout),
        **options,
    )
    return RelayServer(uv, app.state.relay)


def serve(
    config: Config,
    host: str,
    port: int,
    mounts: list[BaseRoute] | None = None,
    *,
    log_format: str = "text",
    log_level: str = "info",
) -> bool:
    """Run until stopped; False when the server could not start (or, with workers > 1, when a
    worker failed)."""
    role = worker_role()
    if role is None and config.relay.workers > 1:
        supervisor = Supervisor(config, host, port, config.relay.workers, log_format, log_level)
        return supervisor.run()
    if role is None:  # one process: it maps in a child (relay/mapproc.py)
        server = build_server(config, host, port, mounts, mapper_process=(log_format, log_level))
        server.run()
    else:
        die_with_supervisor()
        server = build_server(config, host, port, mounts, role.index, role.count)
        server.run(sockets=[role.sock])
    return bool(server.started)
