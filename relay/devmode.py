"""`relay dev`: a working setup with no configuration at all.

It makes (once, then reuses) a dev secret per provider and a sandbox API key, kept in
`.relay-dev/`, writes `.relay-dev/relay.toml` for them, and serves the gateway with the
sandbox track API mounted at /sandbox in the same process.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

from relay.config import default_mappings
from relay.errors import ConfigError
from relay.providers import PROVIDERS, provider_class

DEV_DIR = Path(".relay-dev")
DEV_CONFIG = DEV_DIR / "relay.toml"
SANDBOX_PREFIX = "/sandbox"


def find_mappings() -> Path:
    """The mappings dev mode uses: ./mappings when the current folder has one (a checkout, or
    a folder of one's own mappings), else the default ones shipped with the relay."""
    here = Path("mappings")
    if here.is_dir() and any(here.glob("*.toml")):
        return here.resolve()
    shipped = default_mappings()
    if not any(shipped.glob("*.toml")):
        raise ConfigError(shipped, None, "holds no default mappings (reinstall the relay)")
    return shipped


def _dev_secret(kind: str, directory: Path) -> dict[str, Any] | None:
    """A source table's signing settings for one provider, or None if dev mode skips it."""
    if kind == "stripe":
        return {"secret": "whsec_" + secrets.token_hex(24)}
    if kind == "mailgun":
        return {"secret": secrets.token_hex(16)}
    if kind == "hubspot":
        return {"secret": str(uuid.uuid4())}
    if kind == "standard":
        return {"secret": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()}
    if kind == "sendgrid":
        from relay.providers.sendgrid import generate_keypair

        public, private = generate_keypair(directory)
        return {"public_key": public, "private_key_file": str(private.resolve())}
    if kind == "paypal":
        from relay.providers.paypal import generate_dev_certificate

        return generate_dev_certificate(directory)
    return None  # hmac needs a real sender's settings


def _toml_value(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def write_dev_config(port: int, directory: Path = DEV_DIR) -> Path:
    """Create or refresh .relay-dev/relay.toml; secrets are made once and kept."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    state_file = directory / "secrets.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state.setdefault("api_key", "sk_sandbox_" + secrets.token_hex(16))
    sources = state.setdefault("sources", {})
    mappings = find_mappings()
    for kind in PROVIDERS:
        if kind in sources or not (mappings / f"{kind}.toml").is_file():
            continue
        try:
            provider_class(kind)
        except ImportError:
            continue
        settings = _dev_secret(kind, directory)
        if settings is not None:
            sources[kind] = settings
    state_file.write_text(json.dumps(state, indent=2))
    os.chmod(state_file, 0o600)

    lines = [
        "# Written by `relay dev`; secrets are made once and kept in secrets.json.",
        "[relay]",
        'database = "relay-dev.db"',
        f"port = {port}",
        'dedupe_window = "48h"',
        "",
        "[track]",
        f'base_url = "http://127.0.0.1:{port}{SANDBOX_PREFIX}/api/v1"',
        f'api_key = "{state["api_key"]}"',
        "website_id = 1",
        'flush_interval = "2s"',
        "",
        "[console]",
        "enabled = true  # on loopback only: no sign-in",
        "",
    ]
    for kind, settings in sources.items():
        lines.append(f"[sources.{kind}]")
        lines.append(f'provider = "{kind}"')
        lines.append(f"mapping = {json.dumps(str(mappings / f'{kind}.toml'))}")
        for key, value in settings.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    path = directory / "relay.toml"
    path.write_text("\n".join(lines))
    os.chmod(path, 0o600)
    return path


def api_key(directory: Path = DEV_DIR) -> str:
    state = json.loads((directory / "secrets.json").read_text())
    key: str = state["api_key"]
    return key
