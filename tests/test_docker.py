"""The Dockerfile, checked without a Docker engine: its CMD, HEALTHCHECK, ENV, USER and
STOPSIGNAL are parsed and run as written, outside a container, against the config that
docs/docker.md tells operators to mount."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.servers import free_port

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_DOC = ROOT / "docs" / "docker.md"

RunAs = tuple[int, int] | None  # (uid, gid) to run the image's commands as, if possible


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions by stage; comments dropped, continuation lines joined."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or (not raw.strip() and not current):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        logical.append(current + raw)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """ENV K=V K2="V 2" ..., with $VAR and ${VAR} expanded from what is already set."""
    out: dict[str, str] = {}

    def expand(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return out.get(name, env.get(name, ""))

    for word in shlex.split(args):
        key, sep, val = word.partition("=")
        assert sep, f"use the ENV key=value form: {word!r}"
        out[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, val)
    return out


def healthcheck_command(args: str) -> list[str]:
    before, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    for option in before.split():
        assert option.startswith("--"), option
    parsed = json.loads(command)  # exec form: no shell needed in the image
    assert isinstance(parsed, list) and all(isinstance(w, str) for w in parsed)
    return parsed


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# -- what the image is made of --------------------------------------------------------------


def test_two_stages_a_wheel_built_in_the_first(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    build = stages[0]
    assert build.base == final.base == "python:3.11-slim"
    assert build.name
    assert any("pip wheel" in r for r in build.all("RUN"))
    copies = final.all("COPY")
    assert any(c.startswith(f"--from={build.name} ") for c in copies)


COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|rustc|cargo)\b")


def test_the_final_stage_has_no_compilers_and_no_root(final: Stage) -> None:
    for keyword, args in final.instructions:
        assert not COMPILERS.search(args), f"{keyword} {args}"
    user = final.last("USER")
    name = user.split(":")[0]
    assert name not in ("root", "0", "")
    # Numeric, so that runAsNonRoot-style checks can verify it without /etc/passwd.
    assert re.fullmatch(r"\d+(:\d+)?", user), user
    # The user is made before it is used, and owns the data volume.
    run = " ".join(final.all("RUN"))
    assert f"--uid {name}" in run and "chown" in run and "/data" in run
    keywords = [k for k, _ in final.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_volume_port_signal_and_command(final: Stage) -> None:
    assert "/data" in json.loads(final.last("VOLUME"))
    assert final.last("EXPOSE").split() == ["8000"]
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert json.loads(final.last("CMD")) == ["relay", "serve"]  # exec form: relay is PID 1
    env = parse_env(" ".join(final.all("ENV")), {"PATH": "/usr/bin"})
    assert env["RELAY_CONFIG"] == "/etc/relay/relay.toml"
    assert env["RELAY_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert env["RELAY_PORT"] == "8000"
    assert env["PATH"].startswith("/opt/venv/bin:")
    check = " ".join(healthcheck_command(final.last("HEALTHCHECK")))
    assert "/healthz" in check and "curl" not in check and "wget" not in check


def docs_config() -> str:
    """The relay.toml docs/docker.md tells operators to mount."""
    blocks = re.findall(r"```toml\n(.*?)```", DOCKER_DOC.read_text(), flags=re.S)
    assert blocks, "docs/docker.md shows no relay.toml"
    return str(blocks[0])


def test_the_documented_config_fits_the_image(final: Stage) -> None:
    import tomllib

    doc = tomllib.loads(docs_config())
    env = parse_env(" ".join(final.all("ENV")), {})
    folder = Path(env["RELAY_CONFIG"]).parent
    assert doc["relay"]["database"].startswith("/data/")
    copied = [c.split() for c in final.all("COPY") if not c.startswith("--")]
    targets = {Path(dst) for _, dst in copied}
    for source in doc["sources"].values():
        mapping = folder / source["mapping"]
        assert any(t in mapping.parents for t in targets), mapping


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if any(regex(pattern).fullmatch(c) for c in candidates):
            result = not negate
    return result


def test_the_build_context_holds_what_the_build_copies_and_nothing_else(
    stages: list[Stage],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        src
        for stage in stages
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not ignored(rel, patterns), f"{rel} is needed but .dockerignore drops it"
    for unwanted in ["relay.db", "relay/__pycache__/cli.cpython-311.pyc", ".git/config",
                     ".relay-dev/relay.toml", "tests/test_docker.py", "relay.toml"]:  # fmt: skip
        assert ignored(unwanted, patterns), unwanted


def test_the_ignore_matcher() -> None:
    patterns = ["*", "!relay/", "**/__pycache__", "**/*.db"]
    assert ignored("x.txt", patterns) and ignored("tests/a.py", patterns)
    assert not ignored("relay/cli.py", patterns)
    assert ignored("relay/__pycache__/x.pyc", patterns)
    assert ignored("relay/sub/x.db", patterns)


# -- running it as written --------------------------------------------------------------------


def can_run_as(uid: int, gid: int) -> bool:
    """As root, whether the Python of the tests can run as the image's user (it cannot when
    it lives under a private home folder)."""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import relay"],
            user=uid,
            group=gid,
            extra_groups=[],
            capture_output=True,
            timeout=30,
        )
    except PermissionError:
        return False
    return done.returncode == 0


@pytest.fixture
def container(final: Stage) -> Iterator[tuple[dict[str, str], Path, RunAs]]:
    """The image's filesystem in miniature: /etc/relay (config + mappings) and /data."""
    root = Path(tempfile.mkdtemp(prefix="relay-image-"))
    os.chmod(root, 0o755)
    etc, data = root / "etc" / "relay", root / "data"
    etc.mkdir(parents=True)
    data.mkdir()
    (etc / "mappings").symlink_to(ROOT / "mappings", target_is_directory=True)
    config = docs_config().replace('"/data/', f'"{data}/')
    (etc / "relay.toml").write_text(config)

    env = dict(os.environ)
    env.update(parse_env(" ".join(final.all("ENV")), env))
    # The image's /opt/venv/bin is where this interpreter's `relay` and `python` are.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["RELAY_CONFIG"] = str(etc / "relay.toml")  # the mounted config
    env["RELAY_PORT"] = str(free_port())  # 8000 may be taken here
    env["RELAY_HOST"] = "127.0.0.1"  # tests listen on loopback only
    for name in re.findall(r"\$\{(\w+)\}", config):  # the secrets, as `-e NAME=...`
        env[name] = f"test_{name.lower()}"

    uid, _, gid = final.last("USER").partition(":")
    run_as: RunAs = None
    if can_run_as(int(uid), int(gid or uid)):
        os.chown(data, int(uid), int(gid or uid))
        run_as = (int(uid), int(gid or uid))
    yield env, data, run_as
    shutil.rmtree(root, ignore_errors=True)


def test_cmd_healthcheck_and_stopsignal_run_as_written(
    final: Stage, container: tuple[dict[str, str], Path, RunAs]
) -> None:
    env, data, run_as = container
    as_user: dict[str, Any] = {}
    if run_as:
        as_user = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
    check = healthcheck_command(final.last("HEALTHCHECK"))

    def healthy() -> bool:
        done = subprocess.run(check, env=env, cwd=data, capture_output=True, timeout=10, **as_user)
        return done.returncode == 0

    assert not healthy()  # nothing listens yet: the check can fail

    log = data.parent / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            json.loads(final.last("CMD")), env=env, cwd=data, stdout=out, stderr=out,
            **as_user,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not healthy():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert (data / "relay.db").is_file()  # the database went to the volume
        if run_as:
            assert (data / "relay.db").stat().st_uid == run_as[0]
        stop = signal.Signals[final.last("STOPSIGNAL")]
        proc.send_signal(stop)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "relay stopped cleanly" in text
    assert "Traceback" not in text
    assert not healthy()
