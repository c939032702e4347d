"""A plain install works: the wheel of the work tree, installed into a fresh virtualenv, holds
the default mappings and their examples, and its `relay dev` and `relay send-test`, run from an
empty folder, deliver an event to the built-in sandbox.

Nothing is downloaded: the wheel is built with the build backend already installed, and the
fresh virtualenv sees the dependencies already installed through a .pth file, which makes them
importable but not the checkout (a .pth file's own lines are never read as .pth files, so an
editable install's finder stays out).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.servers import free_port

# What is not part of the work tree's source: never copied into the build.
NOT_SOURCE = shutil.ignore_patterns(
    ".*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "*.db", "*.db-wal", "*.db-shm"
)


def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, **options)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    """This interpreter's pip, offline: --no-index, and no version check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return run([sys.executable, "-m", "pip", *args, "--no-index", "--no-deps"], env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the work tree as it is now, built from a copy (so that no build/ folder
    of an earlier build leaks into it, and none is left in the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp / "dist"
    pip("wheel", "--no-build-isolation", "--wheel-dir", str(out), str(source))
    [built] = out.glob("webhook_relay-*.whl")
    return built


def test_the_wheel_holds_every_module_and_every_shipped_mapping(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "relay").rglob("*.py")]
    missing = sorted(m for m in modules if m not in names)
    assert not missing, f"{len(missing)} modules not in the wheel (a package missing from the "
    f"packages of pyproject.toml?), e.g. {missing[:5]}"
    mappings = ROOT / "mappings"
    shipped = [
        "relay/defaults/" + p.relative_to(mappings).as_posix()
        for p in mappings.rglob("*")
        if p.is_file()
    ]
    assert "relay/defaults/stripe.toml" in shipped
    assert any(s.startswith("relay/defaults/examples/stripe/") for s in shipped)
    missing = sorted(s for s in shipped if s not in names)
    assert not missing, f"{len(missing)} files of mappings/ not in the wheel, e.g. {missing[:5]}"
    assert not any(n.startswith(("mappings/", "tests/")) for n in names)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed, and this interpreter's site-packages (the
    dependencies) after its own."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    pip("--python", str(python), "install", str(wheel))
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    paths = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    deps = [p for p in dict.fromkeys(paths) if Path(p).is_dir()]
    assert str(ROOT) not in deps  # the checkout itself stays out of sys.path
    (Path(own.stdout.strip()) / "relay_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return root


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RELAY_"))}


def test_the_fresh_virtualenv_imports_its_own_relay(venv: Path, tmp_path: Path) -> None:
    done = run(
        [str(venv / "bin" / "python"), "-c", "import relay, httpx; print(relay.__file__)"],
        cwd=tmp_path,
        env=clean_env(),
    )
    where = Path(done.stdout.strip())
    assert where.is_relative_to(venv), where
    assert not where.is_relative_to(ROOT / "relay")


@pytest.fixture
def dev(venv: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`relay dev` of the fresh virtualenv, run in an empty folder: (its URL, the folder)."""
    folder = tmp_path / "empty"
    folder.mkdir()
    port = free_port()
    log = (tmp_path / "dev.log").open("w")
    proc = subprocess.Popen(
        [str(venv / "bin" / "relay"), "dev", "--port", str(port)],
        cwd=folder,
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"relay dev exited {proc.returncode}:\n{output(tmp_path)}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"relay dev did not start:\n{output(tmp_path)}"
            time.sleep(0.1)
        yield url, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def output(tmp_path: Path) -> str:
    return (tmp_path / "dev.log").read_text()


def test_relay_dev_and_send_test_from_an_empty_folder_deliver_to_the_sandbox(
    venv: Path, dev: tuple[str, Path]
) -> None:
    url, folder = dev
    relay = str(venv / "bin" / "relay")
    sent = run([relay, "send-test", "stripe"], cwd=folder, env=clean_env())
    request, answer_line = sent.stdout.splitlines()
    assert request.startswith(f"POST {url}/webhooks/stripe ")
    status, _, body = answer_line.partition(" ")
    assert (status, json.loads(body)) == ("200", {"ok": True, "accepted": 1, "duplicates": 0})

    key = json.loads((folder / ".relay-dev" / "secrets.json").read_text())["api_key"]
    listing = f"{url}/sandbox/api/v1/websites/1/events"
    deadline = time.monotonic() + 20  # the dev flush interval is 2 s
    while True:
        answer = httpx.get(listing, headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert answer.status_code == 200, answer.text
        events = answer.json()["events"]
        if events:
            break
        assert time.monotonic() < deadline, "no event reached the sandbox"
        time.sleep(0.2)
    [event] = events
    assert event["name"] == "purchase"
    assert event["payload"]["currency"] == "USD"

    # PayPal too: dev mode signs with a certificate of its own making, nothing is fetched.
    sent = run([relay, "send-test", "paypal"], cwd=folder, env=clean_env())
    assert sent.stdout.splitlines()[-1].startswith("200 "), sent.stdout
    deadline = time.monotonic() + 20
    while len(events) < 2:
        assert time.monotonic() < deadline, "the PayPal sample did not reach the sandbox"
        time.sleep(0.2)
        answer = httpx.get(listing, headers={"Authorization": f"Bearer {key}"}, timeout=5)
        events = answer.json()["events"]
    assert sorted(e["payload"].get("capture_id", "") != "" for e in events) == [False, True]

    # The installed default mappings come with their examples, and `relay check` runs them.
    checked = run(
        [relay, "check", "--config", ".relay-dev/relay.toml"], cwd=folder, env=clean_env()
    )
    assert "example(s) passed" in checked.stdout and " 0 example(s)" not in checked.stdout
