"""The Jinja filters mappings use beyond Jinja's own.

Webhook fields are often absent: each filter turns an absent (undefined or null) value into
an empty string, so the field it feeds is simply dropped. A value of the wrong kind raises
:class:`FilterError`, whose message names the filter and the value; the mapping turns it into
a failure of that one rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from jinja2 import Undefined

# Unix times at or above this are taken as milliseconds: 1e11 seconds is in the year 5138,
# 1e11 milliseconds in 1973.
_MS_THRESHOLD = 100_000_000_000
# Numbers this large are no amount or time: 10**100 prints as 101 digits, 1e999999999 as a
# billion.
_MAX_EXPONENT = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Currencies whose amounts Stripe gives in other than hundredths: the zero-decimal ones and
# the three-decimal ones. Every other currency has two decimals.
_ZERO_DECIMAL = (
    "BIF",
    "CLP",
    "DJF",
    "GNF",
    "JPY",
    "KMF",
    "KRW",
    "MGA",
    "PYG",
    "RWF",
    "UGX",
    "VND",
    "VUV",
    "XAF",
    "XOF",
    "XPF",
)
_THREE_DECIMAL = ("BHD", "JOD", "KWD", "OMR", "TND")
_CURRENCY_DIGITS = {**dict.fromkeys(_ZERO_DECIMAL, 0), **dict.fromkeys(_THREE_DECIMAL, 3)}


class FilterError(ValueError):
    """A filter was given a value it cannot handle."""


def _absent(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise FilterError(f"{name}: {_show(value)} is not a number")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, ValueError):
        raise FilterError(f"{name}: {_show(value)} is not a number") from None
    if not number.is_finite():
        raise FilterError(f"{name}: {_show(value)} is not a finite number")
    if number and number.adjusted() > _MAX_EXPONENT:
        # "1e999999999" is a short string, but printing it as cents is a gigabyte.
        raise FilterError(f"{name}: {_show(value)} is out of range")
    return number


def cents(value: Any, digits: int | str = 2) -> str:
    """Integer minor units to a decimal string: 4999 -> "49.99".

    ``digits`` is the number of decimals (``cents(0)`` for JPY), or a currency code whose
    decimals Stripe uses: ``cents(data.object.currency)`` gives "4999" for jpy, "49.99" for usd.
    """
    if _absent(value):
        return ""
    if isinstance(digits, Undefined) or digits is None:
        digits = 2
    elif isinstance(digits, str):
        digits = _CURRENCY_DIGITS.get(digits.strip().upper(), 2)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 0 <= digits <= 8:
        raise FilterError(
            f"cents: digits must be an integer from 0 to 8 or a currency code, not {_show(digits)}"
        )
    number = _number("cents", value)
    if number != number.to_integral_value():
        raise FilterError(f"cents: {_show(value)} is not a whole number of minor units")
    return f"{number.scaleb(-digits):.{digits}f}"


def sha256(value: Any, normalize: bool = False) -> str:
    """Hex SHA-256, for identifiers that must not travel in clear (email addresses).

    With ``normalize`` the text is stripped and lower-cased first, so that
    "Jenny@Example.com " and "jenny@example.com" give the same hash. Empty input gives an
    empty result (hashing nothing would make every absent address look alike).
    """
    if _absent(value):
        return ""
    text = value if isinstance(value, str) else str(value)
    if normalize:
        text = text.strip().lower()
    if not text:
        return ""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def iso8601(value: Any) -> str:
    """Unix seconds or milliseconds to UTC ISO 8601: "2024-05-01T12:00:00Z"."""
    if _absent(value):
        return ""
    number = _number("iso8601", value)
    millis = number if abs(number) >= _MS_THRESHOLD else number * 1000
    try:
        moment = _EPOCH + timedelta(milliseconds=int(millis.to_integral_value(ROUND_FLOOR)))
    except OverflowError:
        raise FilterError(f"iso8601: {_show(value)} is out of range") from None
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate_to(value: Any, n: int) -> str:
    """The first n characters, with no ellipsis (Jinja's `truncate` adds one and leeway)."""
    if _absent(value):
        return ""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FilterError(f"truncate_to: length must be a non-negative integer, not {_show(n)}")
    text = value if isinstance(value, str) else str(value)
    return text[:n]


FILTERS: dict[str, Callable[..., str]] = {
    "cents": cents,
    "sha256": sha256,
    "iso8601": iso8601,
    "truncate_to": truncate_to,
}
