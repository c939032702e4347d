"""Configured secrets taken out of text that came from outside the relay.

The track API's answers and the transport's exception messages are not ours: an API that
echoes the request's key would otherwise carry it into logs, `/readyz`, `relay status` and
dead letters. Such text goes through a :class:`Redactor` where it enters the relay, before
it is stored or shown.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from relay.config import REDACTED, Config, Secret


class Redactor:
    """Replaces every occurrence of any of the given secret values by ``**********``."""

    def __init__(self, secrets: Iterable[Secret]):
        values = sorted({s.reveal() for s in secrets if s.reveal()}, key=len, reverse=True)
        # Longest first, so a secret that contains another is replaced whole.
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    @classmethod
    def of(cls, config: Config) -> Redactor:
        return cls(secrets_in(config))

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)


def secrets_in(root: object) -> list[Secret]:
    """Every :class:`Secret` reachable from `root`: the parsed config's dataclasses, the
    providers and verifiers it holds (the relay's own objects), and their containers."""
    found: list[Secret] = []
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Secret):
            found.append(obj)
        elif isinstance(obj, str | bytes | int | float | bool) or obj is None:
            continue
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif _ours(obj):
            stack.extend(_attributes(obj))
    return found


def _ours(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] == "relay" and not isinstance(obj, type)


def _attributes(obj: object) -> list[Any]:
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if hasattr(obj, name):
                values.append(getattr(obj, name))
    return values
