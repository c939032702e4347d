"""Posting a fixed list of pre-made requests, each exactly once, over keep-alive connections.

wrk runs for a duration; building a backlog needs a count instead (20,000 events, 100,000
events), every answer checked. This client writes the raw requests made by bench.webhooks on
`concurrency` connections and tallies the answers. It does no per-request work beyond reading
the answer, so on the relay it is not the bottleneck.

post_paced sends them at a steady rate instead (request i at start + i/rate, on whichever of
a few keep-alive connections is free) and records the wall-clock time (time.time(), the
clock the sandbox stamps its events with) at which each answer came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from bench import webhooks
from bench.procs import progress


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def all_ok(self, sent: int) -> bool:
        return self.statuses.get(200, 0) == sent and not self.errors

    def add(self, other: Tally) -> None:
        self.statuses.update(other.statuses)
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.errors += other.errors
        self.seconds += other.seconds


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _connection(port: int, requests: Iterator[bytes], tally: Tally) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        for raw in requests:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                tally.errors.append(f"{type(e).__name__}: {e}")
                if writer is not None:
                    writer.close()
                writer = reader = None
                continue
            status = int(head[9:12])
            tally.statuses[status] += 1
            if status == 200:
                with contextlib.suppress(ValueError):
                    answer = json.loads(body)
                    tally.accepted += int(answer.get("accepted", 0))
                    tally.duplicates += int(answer.get("duplicates", 0))
            if b"connection: close" in head.lower():
                writer.close()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()


async def _report(tally: Tally, before: int, total: int, started: float, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        elapsed = time.perf_counter() - started
        progress(
            f"  posted {before + tally.answered:,}/{total:,} ({tally.answered / elapsed:,.0f}/s)"
        )


async def _post_all(
    port: int, requests: list[bytes], concurrency: int, every: float, before: int, total: int
) -> Tally:
    tally = Tally()
    it = iter(requests)
    started = time.perf_counter()
    reporter = asyncio.create_task(_report(tally, before, total, started, every))
    try:
        await asyncio.gather(*(_connection(port, it, tally) for _ in range(concurrency)))
    finally:
        reporter.cancel()
    tally.seconds = time.perf_counter() - started
    return tally


def post_all(
    port: int,
    requests: list[bytes],
    concurrency: int = 64,
    report_every: float = 10.0,
    before: int = 0,
    total: int | None = None,
) -> Tally:
    """Send every request once to 127.0.0.1:port; the answers' tally."""
    coro = _post_all(
        port,
        requests,
        concurrency,
        report_every,
        before,
        total if total is not None else len(requests),
    )
    try:
        import uvloop  # uvicorn[standard] brings it; the client then keeps up with more
    except ImportError:
        return asyncio.run(coro)
    result: Tally = uvloop.run(coro)
    return result


def post_signed(
    port: int, count: int, secret: str, chunk: int = 25_000, concurrency: int = 64
) -> Tally:
    """Sign and send `count` distinct Stripe webhooks, a chunk at a time.

    Each chunk is signed just before it is sent, so every signature is fresh (inside Stripe's
    300 s tolerance) however slowly the relay takes them. Only sending is timed.
    """
    tally = Tally()
    done = 0
    while done < count:
        n = min(chunk, count - done)
        requests = webhooks.make_parallel(n, port, secret)
        tally.add(post_all(port, requests, concurrency, before=done, total=count))
        done += n
    return tally


@dataclass(frozen=True)
class Answer:
    index: int  # the request's place in the list
    status: int  # 0: no answer (a connection error)
    at: float  # time.time() when the answer was read
    late: float  # seconds after its slot the request went out (no connection was free)


async def _post_paced(port: int, requests: list[bytes], rate: float, pool: int) -> list[Answer]:
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
    for _ in range(pool):
        free.put_nowait(None)  # opened on first use
    answers: list[Answer] = []

    async def send(i: int, raw: bytes, slot: float) -> None:
        conn = await free.get()
        late = max(0.0, loop.time() - slot)
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
            answers.append(Answer(i, int(head[9:12]), time.time(), late))
            if b"connection: close" in head.lower():
                writer.close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            answers.append(Answer(i, 0, time.time(), late))
            if conn is not None:
                conn[1].close()
            conn = None
        finally:
            free.put_nowait(conn)

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, raw in enumerate(requests):
        slot = start + i / rate
        delay = slot - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, raw, slot)))
    await asyncio.gather(*tasks)
    while not free.empty():
        conn = free.get_nowait()
        if conn is not None:
            conn[1].close()
    return sorted(answers, key=lambda a: a.index)


def post_paced(port: int, requests: list[bytes], rate: float, pool: int = 8) -> list[Answer]:
    """Send request i at start + i/rate; every request's answer, in the list's order."""
    return asyncio.run(_post_paced(port, requests, rate, pool))
