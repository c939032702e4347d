"""The web console at /console: what arrived, what it became, and buttons to act on it.

Server-rendered Jinja pages over the storage interface, one stylesheet and htmx (vendored,
see README.md); sign-in with `[console] token`, a CSRF token on every POST, a CSP without
inline script on every response.
"""

from __future__ import annotations

from relay.console.app import console_mount
from relay.console.auth import start_problem

__all__ = ["console_mount", "start_problem"]
