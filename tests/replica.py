"""One replica of the relay as a process of its own, for the replica tests: the relay's app
under uvicorn, as `relay serve` runs it, with the tests' shorter rate window and lease.

    python -m tests.replica CONFIG PORT RATE_WINDOW LEASE
"""

from __future__ import annotations

import sys


def main() -> None:
    import uvicorn

    import relay.storage.postgres as pg
    from relay.app import create_app
    from relay.config import load_config
    from relay.logs import setup_logging

    config, port, window, lease = sys.argv[1:5]
    pg.LEASE = float(lease)
    setup_logging("text", "info")
    app = create_app(load_config(config), rate_window=float(window))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_config=None, access_log=False)


if __name__ == "__main__":
    main()
