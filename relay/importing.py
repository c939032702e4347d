"""`relay import SOURCE FILE`: the rows of a CSV or JSON-lines file as events of an import
source (`provider = "import"`).

The file is streamed: rows are read, checked and mapped a chunk at a time, and each chunk is
one write through the store (the chunk, its row ids deduped against every row imported before,
and its outbox rows), so memory stays bounded whatever the file's size. A chunk committed is
never taken again: an import that was interrupted, run again, takes only the rest. A chunk
stored but not yet mapped when the process died is mapped by the next import (or the next
`relay serve`). The outbox rows are forwarded by the relay that serves the same database,
which looks for rows other processes queued while it is idle (relay/forwarder.py).

A bad row is refused (and reported as "line N: reason", the file's own line numbers with the
CSV header as line 1) and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from relay.config import Config, Source
from relay.errors import ConfigError
from relay.mapper import job_of, outputs_of
from relay.mapping import Mapping, load_mapping
from relay.providers.importer import ImportProvider, stored_body
from relay.storage import Incoming, Mapped, Output, Store
from relay.trackapi import cast

CHUNK_ROWS = 1000
FORMATS = ("csv", "jsonl")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl"}
PLAIN_EVERY = 5.0  # seconds between progress lines when not on a terminal


class Unusable(Exception):
    """The file or the source cannot be imported at all (exit 2); one line."""


@dataclass
class Summary:
    rows: int = 0  # rows read (bad ones included)
    taken: int = 0  # rows stored now
    events: int = 0  # track events queued from them
    duplicates: int = 0  # rows imported before
    refused: int = 0  # bad rows
    recovered: int = 0  # chunks of an earlier import mapped now

    @property
    def exit_code(self) -> int:
        return 1 if self.refused else 0


@dataclass(frozen=True)
class Line:
    """One row of the file: its line number, and the row or why it is refused."""

    number: int
    row: dict[str, str] | None
    error: str | None = None


def file_format(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise Unusable(
            f"{path}: cannot tell the format from the name; pass --format csv or --format jsonl"
        )
    return fmt


def import_source(config: Config, name: str) -> tuple[Source, ImportProvider, Mapping]:
    source = config.sources.get(name)
    if source is None:
        raise Unusable(
            f"no source named {name!r} in {config.path} "
            f"(sources: {', '.join(config.sources) or 'none'})"
        )
    if not isinstance(source.provider, ImportProvider):
        raise Unusable(
            f"source {name!r} has provider {source.provider.kind!r}; "
            f'relay import takes a source with provider = "import"'
        )
    try:
        mapping = load_mapping(source.mapping)
    except ConfigError as e:
        raise Unusable(e.message) from None
    return source, source.provider, mapping


# -- reading


def read_csv(f: IO[bytes]) -> Iterator[Line]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, strict=True)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
        raise Unusable(f"line 1: cannot read the header: {e}") from None
    if not header or not any(header):
        raise Unusable("line 1: no header (the first line names the columns)")
    seen: set[str] = set()
    for i, col in enumerate(header, start=1):
        if not col:
            raise Unusable(f"line 1: column {i} of the header has no name")
        if col in seen:
            raise Unusable(f"line 1: column {col!r} appears twice in the header")
        seen.add(col)
    last = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Line(last + 1, None, f"not valid CSV: {e}")
            last = reader.line_num
            continue
        except UnicodeDecodeError:
            raise Unusable(f"not UTF-8 text (after line {last})") from None
        number, last = last + 1, reader.line_num
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            yield Line(number, None, f"{len(fields)} fields, the header has {len(header)}")
            continue
        yield Line(number, dict(zip(header, fields, strict=True)))


def _flat(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise ValueError("an object or array (rows are flat)")
    return cast(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_jsonl(f: IO[bytes]) -> Iterator[Line]:
    for number, raw in enumerate(f, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            yield Line(number, None, "not UTF-8 text")
            continue
        except (ValueError, RecursionError) as e:
            yield Line(number, None, f"not JSON: {e}")
            continue
        if not isinstance(data, dict):
            yield Line(number, None, "not a JSON object")
            continue
        row: dict[str, str] = {}
        bad = None
        for k, v in data.items():
            try:
                flat = _flat(v)
            except ValueError as e:
                bad = f"field {k!r} holds {e}"
                break
            if flat is not None:
                row[k] = flat
        yield Line(number, None, bad) if bad else Line(number, row)


# -- progress


class Progress:
    """Rows read, their rate and the time left: a bar on a terminal, plain lines otherwise."""

    def __init__(self, path: Path, size: int, out: IO[str], bar: bool | None = None):
        self.path = path
        self.size = max(size, 1)
        self.out = out
        self.started = time.monotonic()
        self.last = self.started
        self.done = 0
        self._bar: Any = None
        if bar if bar is not None else out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.size,
                unit="B",
                unit_scale=True,
                desc=path.name,
                file=out,
                leave=True,
                dynamic_ncols=True,
            )

    def update(self, rows: int, position: int) -> None:
        now = time.monotonic()
        rate = rows / max(now - self.started, 1e-6)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rows:,} rows, {rate:,.0f} rows/s", refresh=False)
            self._bar.update(max(position - self.done, 0))
            self.done = max(self.done, position)
            return
        if now - self.last >= PLAIN_EVERY:
            self.last = now
            share = min(position / self.size, 1.0)
            elapsed = now - self.started
            eta = elapsed * (1 - share) / share if share > 0 else 0.0
            print(
                f"{self.path}: {rows:,} rows read ({rate:,.0f} rows/s), {share:.0%}, "
                f"about {eta:.0f} s left",
                file=self.out,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(max(self.size - self.done, 0))
            self._bar.close()


# -- importing


async def recover(store: Store, config: Config, source: Source, mapping: Mapping) -> int:
    """Map the chunks of this source that an earlier import stored but did not map."""
    after, count = 0, 0
    while True:
        hooks = await store.unmapped(after, 200)
        if not hooks:
            return count
        after = hooks[-1].id
        mapped = []
        for hook in hooks:
            if hook.source != source.name:
                continue
            job = job_of(config, hook)
            if job is None:
                continue
            outputs: list[Output] = []
            for event in job.events:
                outputs += outputs_of(source, event, mapping.apply(event, source.name, {}))
            mapped.append(Mapped(hook.id, hook.received_at, outputs))
        if mapped:
            await store.save_mapped(mapped)
            count += len(mapped)


async def run_import(
    store: Store,
    config: Config,
    source_name: str,
    path: Path,
    fmt: str | None,
    report: Callable[[Line], None],
    progress_out: IO[str] | None = None,
    bar: bool | None = None,
) -> Summary:
    """Import the file; bad rows go to `report`. Raises Unusable."""
    source, provider, mapping = import_source(config, source_name)
    kind = file_format(path, fmt)
    try:
        f = path.open("rb")
    except OSError as e:
        raise Unusable(f"{path}: cannot read: {e.strerror or e}") from None
    summary = Summary()
    with f:
        summary.recovered = await recover(store, config, source, mapping)
        size = os.fstat(f.fileno()).st_size
        progress = Progress(path, size, progress_out or sys.stderr, bar)
        lines = read_csv(f) if kind == "csv" else read_jsonl(f)
        chunk: list[tuple[str, int, dict[str, str], list[Output]]] = []
        try:
            for line in lines:
                summary.rows += 1
                taken = _check(line, source, provider, mapping, report)
                if taken is None:
                    summary.refused += 1
                else:
                    chunk.append(taken)
                if len(chunk) >= CHUNK_ROWS:
                    await _store_chunk(store, source, chunk, summary)
                    chunk = []
                    progress.update(summary.rows, f.tell())
            if chunk:
                await _store_chunk(store, source, chunk, summary)
        except Unusable as e:
            raise Unusable(f"{path}: {e}") from None
        finally:
            progress.update(summary.rows, size)
            progress.close()
    return summary


def _check(
    line: Line,
    source: Source,
    provider: ImportProvider,
    mapping: Mapping,
    report: Callable[[Line], None],
) -> tuple[str, int, dict[str, str], list[Output]] | None:
    """A good row, its id and its outbox rows; None (reported) for a bad one."""
    if line.row is None:
        report(line)
        return None
    key = provider.key(line.row)
    if key is None:
        report(Line(line.number, None, f"no value in the id column {provider.id_column!r}"))
        return None
    event = provider.event(key, line.row)
    result = mapping.apply(event, source.name, {})
    if result.failures:
        reasons = "; ".join(f"{mapping.rule_label(f.rule)}: {f.reason}" for f in result.failures)
        report(Line(line.number, None, f"mapping failed: {reasons}"))
        return None
    return key, line.number, line.row, outputs_of(source, event, result)


async def _store_chunk(
    store: Store,
    source: Source,
    chunk: list[tuple[str, int, dict[str, str], list[Output]]],
    summary: Summary,
) -> None:
    now = time.time()
    item = Incoming(
        source.name,
        now,
        "application/json",
        "{}",
        stored_body([(k, n, r) for k, n, r, _ in chunk]),
        [k for k, _, _, _ in chunk],
        0.0,
    )
    result = await store.import_rows(item)
    summary.duplicates += result.duplicates
    if result.webhook_id is None:
        return
    accepted = set(result.accepted)
    outputs: list[Output] = []
    for key, _, _, outs in chunk:
        if key in accepted:
            accepted.discard(key)
            outputs += outs
    await store.save_mapped([Mapped(result.webhook_id, now, outputs)])
    summary.taken += len(result.accepted)
    summary.events += len(outputs)
