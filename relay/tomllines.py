"""Line numbers of TOML keys, for `file:line` messages (tomllib does not keep positions)."""

from __future__ import annotations

import re


class KeyLines:
    """Where each key of a TOML text is set, for file:line messages (best effort).

    Keys are spelled as in messages: ``events[2].payload.amount``, ``examples[0].input``. A key
    set inside an inline table is found at the line of the table's own key.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
    _PART = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)"""
    _KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=(.*)$")

    def __init__(self, text: str):
        self._lines: dict[str, int] = {}
        counts: dict[str, int] = {}
        table = ""
        closing: str | None = None
        for n, line in enumerate(text.splitlines(), 1):
            if closing is not None:
                if line.count(closing) % 2 == 1:
                    closing = None
                continue
            m = self._HEADER.match(line)
            if m:
                parts = self._split(m.group(2))
                if m.group(1) == "[[":
                    full = self._join(self._resolve(parts[:-1], counts), parts[-1])
                    counts[full] = counts.get(full, -1) + 1
                    table = f"{full}[{counts[full]}]"
                else:
                    table = self._resolve(parts, counts)
                self._lines.setdefault(table, n)
                continue
            m = self._KEY.match(line)
            if m:
                self._lines.setdefault(self._join(table, ".".join(self._split(m.group(1)))), n)
                for quote in ('"""', "'''"):
                    if m.group(2).count(quote) % 2 == 1:
                        closing = quote

    @staticmethod
    def _split(dotted: str) -> list[str]:
        return [p.strip().strip("\"'") for p in re.findall(KeyLines._PART, dotted)]

    @staticmethod
    def _join(table: str, key: str) -> str:
        return f"{table}.{key}" if table else key

    @staticmethod
    def _resolve(parts: list[str], counts: dict[str, int]) -> str:
        resolved = ""
        for part in parts:
            resolved = KeyLines._join(resolved, part)
            if resolved in counts:
                resolved = f"{resolved}[{counts[resolved]}]"
        return resolved

    def line(self, key: str | None) -> int | None:
        while key:
            if key in self._lines:
                return self._lines[key]
            shorter = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", key)
            if shorter == key:
                return None
            key = shorter
        return None
