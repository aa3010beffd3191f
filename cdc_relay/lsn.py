"""PostgreSQL log sequence numbers as a value type.

An LSN is a 64-bit byte position in the WAL. PostgreSQL prints it as two hex halves
(``16/B374D848``). Keeping it an ``int`` subclass makes comparisons and arithmetic free on the
hot path while still printing the way operators read it in ``pg_replication_slots``.
"""

from __future__ import annotations

import re
from typing import Final

from cdc_relay.errors import ConfigError

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_MAX = (1 << 64) - 1


class Lsn(int):
    """A WAL position; ordered like the integer it is, printed like PostgreSQL prints it."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Lsn:
        if not 0 <= value <= _MAX:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse ``"16/B374D848"``; anything else is a ConfigError naming the text."""
        m = _LSN_RE.match(text.strip())
        if m is None:
            raise ConfigError("lsn", f"not a PostgreSQL LSN (expected like 16/B374D848): {text!r}")
        return cls((int(m.group(1), 16) << 32) | int(m.group(2), 16))

    def __str__(self) -> str:
        # twice per event on the hot path: %-formatting is about twice as fast as an f-string
        # with format specs here
        return "%X/%X" % (self >> 32, self & 0xFFFFFFFF)  # noqa: UP031

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


ZERO = Lsn(0)

new_unchecked: Final = int.__new__
"""``new_unchecked(Lsn, value)``: an Lsn without the range check, for positions read off the
wire (every unsigned 64-bit value PostgreSQL sends is a valid LSN); several per WAL message."""
