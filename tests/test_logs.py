"""The text formatter's cached date and time agree with the logging module's own."""

from __future__ import annotations

import logging

from relay.logs import TextFormatter


def record(created: float) -> logging.LogRecord:
    r = logging.LogRecord("relay.webhook", logging.INFO, __file__, 1, "webhook %s", ("x",), None)
    r.created = created
    r.msecs = (created - int(created)) * 1000
    return r


def test_each_line_is_stamped_as_the_standard_formatter_would() -> None:
    ours = TextFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # the same second twice, the next second, a jump back (clock set back), a far date
    for created in (1_790_000_000.001, 1_790_000_000.999, 1_790_000_001.5, 1_789_999_000.25, 4e9):
        r = record(created)
        assert ours.format(r) == standard.format(r)
