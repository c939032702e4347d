"""What a template may cost: how large the values it makes, how long one event's mapping takes.

Webhook data is at most a body's size, but a template can multiply it (``'a' * n``, ``x ** n``,
a separator joined between 100,000 items, output in a loop) or loop for as long as it likes.
The mapping environment (relay.templating) keeps every event's mapping small and short:

* every value a template makes, by an operator, a literal, a filter, a call, ``~`` or a block
  of output, is at most MAX_TEXT characters as printed, and an integer at most MAX_DIGITS
  digits. Where the work itself would be large (``*``, ``**``, ``%``, padding, separators,
  repeated fields) it is refused before it is done; the rest is checked after, since it makes
  no more than a few times what it was given;
* constants are folded at load within the same bounds, so ``{{ 10 ** 5000 }}`` is an error of
  the mapping file, not a computation at load or at each event;
* one event's mapping may use DEADLINE seconds of CPU. Compiled templates look at the clock
  (:func:`tick`) at every loop step, macro, call block and block entry, and in every filter,
  call and bounded operator; past the deadline the rule fails with :class:`TooSlow`.

The clock is looked at by the template itself rather than interrupted from outside (an
exception raised into the thread with ``PyThreadState_SetAsyncExc``): a tick fires only at
those points in template code, never inside Jinja's or the relay's own code (a lock held, a
buffer half-built), and it reaches nested loops over webhook data, recursive loops and macros
alike. Neither can stop a single long C call; the size bounds are what keep each step short.
"""

from __future__ import annotations

import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

from jinja2.utils import Namespace

MAX_TEXT = 1_048_576  # characters of any value a template makes (lists and dicts as printed)
MAX_FIELD = 65_536  # characters of a field's output kept; rendering stops there
MAX_DIGITS = 1000  # digits of an integer a template makes
MAX_COUNT = 100_000  # batch sizes and slice counts, as many as the sandbox's range() makes
DEADLINE = 0.050  # seconds of CPU the mapping of one event may use

_MAX_BITS = int(MAX_DIGITS * math.log2(10))
_LOG10_2 = math.log10(2)
_WALK_TICK = 1024  # container items counted between two looks at the clock
BOUNDED_BINOPS = frozenset({"+", "*", "**", "%"})
_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "*": operator.mul,
    "**": operator.pow,
    "%": operator.mod,
}


class TooLarge(Exception):
    """A template would make a value over a bound; the message says which."""


class TooSlow(Exception):
    """An event's mapping used up its deadline."""


# -- time ------------------------------------------------------------------------------------


_NO_LIMITS = (math.inf, math.inf)


class _Clock(threading.local):
    """This thread's limits for the event it maps (none outside :func:`start`): when tick()
    looks again (time.monotonic()), and when the event fails (time.thread_time())."""

    def __init__(self) -> None:
        self.limits = _NO_LIMITS


_clock = _Clock()


def tick() -> None:
    """Raise TooSlow when the event being mapped is past its deadline."""
    if time.monotonic() > _clock.limits[0]:
        _expired()


def _expired() -> None:
    _, cpu_end = _clock.limits
    # CPU time rather than the wall clock: a thread waiting for the GIL is not mapping.
    left = cpu_end - time.thread_time()
    if left <= 0:
        raise TooSlow(
            f"took more than {DEADLINE * 1000:.0f} ms of CPU, the most one event's mapping may take"
        )
    _clock.limits = (time.monotonic() + left, cpu_end)


Limits = tuple[float, float]


def start() -> Limits:
    """Begin mapping one event on this thread: it may use DEADLINE seconds of the thread's
    CPU. Returns what :func:`stop` puts back."""
    saved = _clock.limits
    _clock.limits = (time.monotonic() + DEADLINE, time.thread_time() + DEADLINE)
    return saved


def stop(saved: Limits) -> None:
    _clock.limits = saved


# -- sizes -----------------------------------------------------------------------------------


def _digits(bits: float) -> str:
    return f"about {int(bits * _LOG10_2) + 1}" if bits < 1e15 else "an enormous number of"


def too_large(what: str, size: int | None = None) -> TooLarge:
    if size is None:
        return TooLarge(
            f"{what} would make more than {MAX_TEXT} characters, the most a mapping makes"
        )
    return TooLarge(f"{what} would make {size} characters; a mapping makes at most {MAX_TEXT}")


def _too_many_digits(what: str, bits: float) -> TooLarge:
    return TooLarge(
        f"{what} would make an integer of {_digits(bits)} digits; a mapping makes at most "
        f"{MAX_DIGITS}"
    )


def _children(value: Any) -> Iterator[Any] | None:
    if isinstance(value, list | tuple):
        return iter(value)
    if isinstance(value, dict):
        return chain.from_iterable(value.items())
    if isinstance(value, Namespace):
        attrs: dict[str, Any] = value._Namespace__attrs
        return chain.from_iterable(attrs.items())
    return None


def _atom_size(value: Any) -> int:
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 2
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value.bit_length() * _LOG10_2) + 2
    return 8  # a float, true/false/null, or an object that prints as a short name


def printed_size(value: Any, what: str = "this", limit: int = MAX_TEXT) -> int:
    """About how many characters ``value`` prints as (lists and dicts as JSON), counting a
    part held in several places as often as it prints. Raises TooLarge past ``limit``: the
    walk stops there, so it costs no more than the value it measures."""
    items = _children(value)
    if items is None:
        return _atom_size(value)
    total = 2
    walking = {id(value)}  # the containers being walked: one met again is a cycle ([...])
    stack: list[tuple[Iterator[Any], int]] = [(items, id(value))]
    steps = 0
    while stack:
        items, key = stack[-1]
        for item in items:
            steps += 1
            if steps % _WALK_TICK == 0:
                tick()
            inner = _children(item)
            if inner is None:
                total += _atom_size(item) + 1
            elif id(item) in walking:
                total += 5
            else:
                total += 3
                walking.add(id(item))
                stack.append((inner, id(item)))
            if total > limit:
                raise too_large(what)
            if stack[-1][0] is not items:
                break  # walk the container just met, then come back to this one
        else:
            stack.pop()
            walking.discard(key)
    return total


def made(value: Any, what: str) -> Any:
    """``value``, a template has just made it: refused (TooLarge) if over the bounds."""
    if isinstance(value, str | bytes | bytearray):
        if len(value) > MAX_TEXT:
            raise too_large(what, len(value))
    elif isinstance(value, int):
        if value.bit_length() > _MAX_BITS:
            raise _too_many_digits(what, value.bit_length())
    elif isinstance(value, list | tuple | dict | Namespace):
        printed_size(value, what)
    return value


def check_width(what: str, digits: str) -> int:
    """A width or precision as a format string writes it (digits), refused over MAX_TEXT."""
    if len(digits) > 7 or int(digits) > MAX_TEXT:
        raise TooLarge(
            f"{what}: a width of {digits[:20]} is more than the {MAX_TEXT} a mapping may use"
        )
    return int(digits)


def check_count(what: str, n: Any, limit: int = MAX_TEXT) -> None:
    if isinstance(n, int) and abs(n) > limit:
        bound = f"more than the {limit}" if n > 0 else f"less than the -{limit}"
        raise TooLarge(f"{what} of {n} is {bound} a mapping may use")


# -- operators -------------------------------------------------------------------------------


def binop(op: str, left: Any, right: Any) -> Any:
    """``left op right`` for the bounded operators (+ * ** %)."""
    tick()
    what = f"'{op}'"
    if op == "*":
        _check_mul(left, right)
    elif op == "**":
        _check_pow(left, right)
    elif op == "%" and isinstance(left, str):
        check_printf(what, left, right)
    return made(_BINOPS[op](left, right), what)


def _check_mul(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
        if bits > _MAX_BITS + 1:
            raise _too_many_digits("'*'", bits)
        return
    for seq, n in ((left, right), (right, left)):
        if not isinstance(n, int) or n <= 1:
            continue
        if isinstance(seq, str | bytes | bytearray):
            if len(seq) * n > MAX_TEXT:
                raise too_large("'*'", len(seq) * n)
        elif isinstance(seq, list | tuple) and seq and printed_size(seq) * n > MAX_TEXT:
            # The items are held, not copied, n times: what matters is how they print.
            raise too_large("'*'")


def _check_pow(base: Any, exponent: Any) -> None:
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 1:
        return
    if abs(base) > 1:
        # An exponent too large for a float is refused as such (at least a bit a step).
        bits = exponent * math.log2(abs(base)) if exponent < 1e15 else math.inf
        if bits > _MAX_BITS:
            raise _too_many_digits("'**'", bits)


_PRINTF = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.DOTALL)


def check_printf(what: str, fmt: str, values: Any) -> None:
    """``fmt % values`` (or ``fmt|format(...)``): the widths and the fields it would print."""
    args = tuple(values.values()) if isinstance(values, dict) else values
    if not isinstance(args, tuple):
        args = (args,)
    fields = 0
    size = len(fmt)
    star = False
    for _key, width, precision, kind in _PRINTF.findall(fmt):
        if kind == "%":
            continue
        fields += 1
        for n in (width, precision):
            if n == "*":
                star = True
            elif n:
                size += check_width(what, n)
    if star:
        for a in args:
            check_count(f"{what}: a width", a)
            if isinstance(a, int):
                size += abs(a)
    sizes = [printed_size(a, what) for a in args]
    if isinstance(values, dict):
        size += fields * max(sizes, default=0)  # a key may be printed by every field
    else:
        size += sum(sizes)
    if size > MAX_TEXT:
        raise too_large(what, size)
