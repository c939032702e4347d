"""The track API guide's own clients, pointed at the relay: only the base URL and the key
change. The code is copied from the guide (track-api.md, "Language Examples")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Relay, Sandbox
from tests.test_proxy import INGEST_KEY, TRACK_SOURCE

GUIDE_BASE_URL = "https://webanalyzerapp.com/api/v1"

# Python (requests), as the guide has it.
PYTHON_CLIENT = """
import requests
import os

API_KEY = os.environ['WEBANALYZER_API_KEY']
WEBSITE_ID = 1
BASE_URL = 'https://webanalyzerapp.com/api/v1'

def track_event(name, payload=None, visitor_id=None):
    data = {'name': name}
    if payload:
        data['payload'] = payload
    if visitor_id:
        data['visitor_id'] = visitor_id

    response = requests.post(
        f'{BASE_URL}/websites/{WEBSITE_ID}/track',
        headers={
            'Authorization': f'Bearer {API_KEY}',
            'Content-Type': 'application/json',
        },
        json=data,
        timeout=10,
    )
    response.raise_for_status()
    return response.json()

# Usage
track_event('invoice_paid', {
    'invoice_id': 'INV-2024-001',
    'amount': '149.99',
    'currency': 'USD',
})
"""

# IoT / Hardware Events (Python), as the guide has it, plus a call.
PYTHON_IOT = """
import requests
import os

def track_sensor_reading(sensor_id, temperature, humidity):
    requests.post(
        'https://webanalyzerapp.com/api/v1/websites/1/track',
        headers={
            'Authorization': f'Bearer {os.environ["WEBANALYZER_API_KEY"]}',
            'Content-Type': 'application/json',
        },
        json={
            'name': 'sensor_reading',
            'payload': {
                'sensor_id': sensor_id,
                'temperature': str(temperature),
                'humidity': str(humidity),
            },
        },
    )

track_sensor_reading('kiosk-7', 21.5, 40)
"""

# Node.js (fetch), as the guide has it (the usage wrapped for a script).
NODE_CLIENT = """
const API_KEY = process.env.WEBANALYZER_API_KEY;
const WEBSITE_ID = 1;

async function trackEvent(name, payload = {}, visitorId = null) {
  const body = { name, payload };
  if (visitorId) body.visitor_id = visitorId;

  const res = await fetch(
    `https://webanalyzerapp.com/api/v1/websites/${WEBSITE_ID}/track`,
    {
      method: 'POST',
      headers: {
        'Authorization': `Bearer ${API_KEY}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify(body),
    }
  );

  if (!res.ok) {
    const error = await res.json();
    throw new Error(`Tracking failed: ${error.message}`);
  }
  return res.json();
}

// Usage
(async () => {
  await trackEvent('signup', { plan: 'free', source: 'organic' });
})().catch((e) => { console.error(e.message); process.exit(1); });
"""


def pointed_at(code: str, relay: Relay) -> str:
    """The guide's code with the relay's base URL: the one change a client makes."""
    assert GUIDE_BASE_URL in code
    return code.replace(GUIDE_BASE_URL, f"{relay.url}/api/v1")


def run(cmd: list[str], tmp_path: Path, key: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEBANALYZER_API_KEY": key}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)


def test_the_guides_python_clients_work_against_the_relay(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    relay = relay_factory(sandbox, sources=TRACK_SOURCE)
    for n, code in enumerate((PYTHON_CLIENT, PYTHON_IOT)):
        script = tmp_path / f"client{n}.py"
        script.write_text(pointed_at(code, relay))
        done = run([sys.executable, str(script)], tmp_path, INGEST_KEY)
        assert done.returncode == 0, done.stderr
    events = sandbox.wait_for(2)
    by_name = {e["name"]: e["payload"] for e in events}
    assert by_name == {
        "invoice_paid": {"invoice_id": "INV-2024-001", "amount": "149.99", "currency": "USD"},
        "sensor_reading": {"sensor_id": "kiosk-7", "temperature": "21.5", "humidity": "40"},
    }
    # With a wrong key the guide's client raises, as it would against the API.
    script = tmp_path / "client0.py"
    done = run([sys.executable, str(script)], tmp_path, "not-a-key")
    assert done.returncode != 0 and "401" in done.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_guides_node_client_works_against_the_relay(
    sandbox: Sandbox, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    relay = relay_factory(sandbox, sources=TRACK_SOURCE)
    script = tmp_path / "client.js"
    script.write_text(pointed_at(NODE_CLIENT, relay))
    done = run(["node", str(script)], tmp_path, INGEST_KEY)
    assert done.returncode == 0, done.stderr
    [event] = sandbox.wait_for(1)
    assert event["name"] == "signup" and event["payload"] == {"plan": "free", "source": "organic"}
