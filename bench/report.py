"""The results table: one row per figure, with its target and PASS/FAIL where it has one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    bench: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: a figure without a target

    @property
    def result(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "FAIL")


def render(rows: list[Row]) -> str:
    header = ("bench", "measure", "value", "target", "result")
    table = [header] + [(r.bench, r.measure, r.value, r.target, r.result) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(rows: list[Row]) -> str:
    lines = ["| bench | measure | value | target | result |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.bench} | {r.measure} | {r.value} | {r.target} | {r.result} |")
    return "\n".join(lines)


def mb(n: float) -> str:
    """Bytes as decimal megabytes (the unit the targets use)."""
    return f"{n / 1e6:.1f} MB"
