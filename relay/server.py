"""Running the gateway under uvicorn, with the relay's own signal handling.

SIGTERM and SIGINT first make every new webhook answer 503 (so senders retry elsewhere or
later), then uvicorn stops listening and waits for requests under way, then the forwarder
finishes or hands back its in-flight batches within `shutdown_grace`, and the database is
closed. SIGHUP reloads the mappings.
"""

from __future__ import annotations

import gc
import socket
import sys
import types
from typing import Any

import uvicorn
from starlette.routing import BaseRoute

from relay.app import Runtime, create_app
from relay.config import Config
from relay.workers import Supervisor, die_with_supervisor, worker_role


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
    **options: Any,
) -> RelayServer:
    app = create_app(config, mounts=mounts, worker=worker, workers=workers)
    uv = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=max(1, int(config.relay.shutdown_grace)),
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
    # The writer thread gives up the GIL around every SQLite step and must win it back from
    # the event loop; at the default 5 ms switch interval each of those waits can cost up to
    # 5 ms, and webhooks waiting on the commit wait with it.
    sys.setswitchinterval(0.0005)
    if role is None:
        server = build_server(config, host, port, mounts)
        server.run()
    else:
        die_with_supervisor()
        server = build_server(config, host, port, mounts, role.index, role.count)
        server.run(sockets=[role.sock])
    return bool(server.started)
