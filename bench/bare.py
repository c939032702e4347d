"""The baseline for ingest: a Starlette endpoint that reads the body and answers 200.

It runs under uvicorn exactly as `relay serve` does (relay/server.py): the default ("auto")
event loop and HTTP implementation, no access log, no server header, lifespan on. So
relay/bare compares the relay's own work with the floor set by Python, Starlette and uvicorn on
the same machine.

With `--processes N` (N > 1) it runs as `relay serve` with `workers = N` does
(relay/workers.py): this process opens N listening sockets on the one port (SO_REUSEPORT: the
kernel spreads connections over them) and starts N uvicorn processes, one socket each; SIGTERM
is passed on to them, and a process whose parent is gone stops. /healthz answers the pid of
the process that took the connection, so a caller can see that all N are up.

    python -m bench.bare --port 9000 [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HOST = "127.0.0.1"


async def webhook(request: Request) -> Response:
    await request.body()
    return JSONResponse({"ok": True})


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True, "pid": os.getpid()})


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/webhooks/{source}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def server(port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(),
        host=HOST,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )
    return uvicorn.Server(config)


def listen(port: int) -> socket.socket:
    """One process's listening socket, as relay/workers.py makes them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(port: int, fd: int) -> None:
    parent = os.getppid()

    def watch() -> None:  # no orphan keeps the port
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    server(port).run(sockets=[socket.socket(fileno=fd)])


def supervise(port: int, processes: int) -> int:
    sockets = [listen(port) for _ in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.bare", "--port", str(port), "--fd", str(s.fileno())],
            pass_fds=(s.fileno(),),
            start_new_session=True,  # a Ctrl-C reaches this process, which passes it on once
        )
        for s in sockets
    ]

    def stop(signum: int, frame: types.FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [child.wait() for child in children]
    # uvicorn raises SIGTERM again after its graceful shutdown: that is a clean stop
    failed = [c for c in codes if c not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # a worker's socket
    args = parser.parse_args()
    if args.fd is not None:
        run_worker(args.port, args.fd)
    elif args.processes > 1:
        sys.exit(supervise(args.port, args.processes))
    else:
        server(args.port).run()


if __name__ == "__main__":
    main()
