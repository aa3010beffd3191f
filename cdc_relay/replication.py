"""CopyBoth framing of PostgreSQL's streaming replication protocol, sans-I/O.

After ``START_REPLICATION`` the connection carries CopyData messages both ways. The server sends
XLogData ('w', one pgoutput message each) and primary keepalives ('k'); the client answers with
standby status updates ('r'). That status update is the only way the slot learns it may release
WAL, so encoding it is kept here next to the parsing, away from sockets, and tested byte-for-byte.
See PostgreSQL "Streaming Replication Protocol".

Times on this wire are microseconds since 2000-01-01 00:00 UTC (PostgreSQL's epoch), not Unix
time; ``pg_now_us`` and ``pg_time_to_unix`` are the only conversions the relay should use.
"""

from __future__ import annotations

import struct
import time
from typing import Final

import msgspec

from cdc_relay.errors import DecodeError
from cdc_relay.lsn import Lsn
from cdc_relay.lsn import new_unchecked as _new_lsn

PG_EPOCH_UNIX: Final = 946684800
"""2000-01-01 00:00:00 UTC as a Unix timestamp: PostgreSQL's epoch for replication clocks."""

_PG_EPOCH_US: Final = PG_EPOCH_UNIX * 1_000_000
_U64_MAX: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1

_XLOG_HEAD = struct.Struct("!QQq")  # data start, WAL end, send time
_KEEPALIVE = struct.Struct("!QqB")  # WAL end, send time, reply requested
_STATUS = struct.Struct("!cQQQqB")  # 'r', write, flush, apply, clock, reply requested

_XLOG_HEADER_SIZE: Final = 1 + _XLOG_HEAD.size
_KEEPALIVE_SIZE: Final = 1 + _KEEPALIVE.size
_XLOG_UNPACK = _XLOG_HEAD.unpack_from
_KEEPALIVE_UNPACK = _KEEPALIVE.unpack_from
_STATUS_PACK = _STATUS.pack

_W: Final = 0x77  # 'w'
_KA: Final = 0x6B  # 'k'


class XLogData(msgspec.Struct, frozen=True):
    """One WAL chunk; with pgoutput, exactly one logical replication message.

    ``payload`` is a view into the buffer the CopyData arrived in, not a copy: the decoder copies
    out what it keeps, so the bytes are copied once per message instead of twice. Hold the view
    no longer than that buffer is meant to live; never encode this struct.
    """

    data_start: Lsn  # WAL position of the payload's start
    wal_end: Lsn  # the server's current end of WAL: how far an idle slot could advance
    send_time: int  # server clock, µs since 2000-01-01 UTC
    payload: memoryview | bytes


class PrimaryKeepalive(msgspec.Struct, frozen=True):
    """The server's heartbeat; ``reply_requested`` means answer now or be disconnected.

    The server asks for a reply when ``wal_sender_timeout`` is about to expire, so a relay that
    waits for its next periodic status update before answering gets cut off.
    """

    wal_end: Lsn
    send_time: int  # server clock, µs since 2000-01-01 UTC
    reply_requested: bool


def _short(kind: str, n: int, pos: int, size: int, what: str) -> DecodeError:
    left = max(n - pos, 0)
    return DecodeError(kind, pos, f"truncated: {what} needs {size} bytes, {left} left")


def _header_short(kind: str, n: int, fields: tuple[tuple[str, int], ...]) -> DecodeError:
    pos = 1
    for what, size in fields:
        if pos + size > n:
            return _short(kind, n, pos, size, what)
        pos += size
    raise AssertionError("called for input that holds the whole header")  # pragma: no cover


XLOG_PAYLOAD: Final = _XLOG_HEADER_SIZE
"""Offset of the pgoutput message inside an XLogData CopyData message."""
_XLOG_POSITIONS = struct.Struct("!QQ").unpack_from


def xlog_positions(data: bytes | memoryview) -> tuple[int, int] | None:
    """(data start, WAL end) of an XLogData carrying a payload at ``XLOG_PAYLOAD``; else None.

    The per-message fast path (no frame object, no slice); ``parse_copy_data`` handles, and
    names the problem with, everything this declines.
    """
    if len(data) > _XLOG_HEADER_SIZE and data[0] == _W:
        return _XLOG_POSITIONS(data, 1)
    return None


def parse_copy_data(data: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData message received during streaming replication.

    Anything but a complete 'w' or 'k' message raises ``DecodeError``: silently skipping an
    unknown message could skip WAL, and the checkpoint rule forbids ever moving past a gap.
    """
    view = data if type(data) is memoryview else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    n = len(view)
    if not n:
        raise DecodeError("CopyData", 0, "empty CopyData: no message type byte")
    tag = view[0]
    if tag == _W:
        if n < _XLOG_HEADER_SIZE:
            raise _header_short(
                "XLogData", n, (("data start LSN", 8), ("WAL end LSN", 8), ("send time", 8))
            )
        data_start, wal_end, send_time = _XLOG_UNPACK(view, 1)
        return XLogData(
            _new_lsn(Lsn, data_start),
            _new_lsn(Lsn, wal_end),
            send_time,
            view[_XLOG_HEADER_SIZE:],
        )
    if tag == _KA:
        if n != _KEEPALIVE_SIZE:
            if n > _KEEPALIVE_SIZE:
                raise DecodeError(
                    "PrimaryKeepalive",
                    _KEEPALIVE_SIZE,
                    f"{n - _KEEPALIVE_SIZE} unexpected bytes after the end of the message",
                )
            raise _header_short(
                "PrimaryKeepalive",
                n,
                (("WAL end LSN", 8), ("send time", 8), ("reply-requested flag", 1)),
            )
        wal_end, send_time, reply = _KEEPALIVE_UNPACK(view, 1)
        return PrimaryKeepalive(_new_lsn(Lsn, wal_end), send_time, reply != 0)
    shown = repr(chr(tag)) if 0x20 <= tag < 0x7F else f"0x{tag:02x}"
    raise DecodeError("CopyData", 0, f"unknown message type {shown}: expected 'w' or 'k'")


def standby_status_update(
    write: int, flush: int, apply: int, now_us: int, reply_requested: bool = False
) -> bytes:
    """Encode the 'r' message that tells the server how far the relay got.

    ``flush`` is what lets the slot release WAL, so it must be the confirmed point and nothing
    newer (see the checkpoint rule). Out-of-range values are a bug in the caller, not something
    the server should ever see: they raise ``ValueError`` rather than wrap around.
    """
    for name, lsn in (("write", write), ("flush", flush), ("apply", apply)):
        if not 0 <= lsn <= _U64_MAX:
            raise ValueError(f"{name} LSN out of range: {lsn}")
    if not _I64_MIN <= now_us <= _I64_MAX:
        raise ValueError(f"clock out of range: {now_us}")
    return _STATUS_PACK(b"r", write, flush, apply, now_us, 1 if reply_requested else 0)


def pg_now_us(unix_seconds: float | None = None) -> int:
    """Microseconds since 2000-01-01 UTC: the clock the status update carries.

    Without an argument it reads the clock in integer nanoseconds, because a float of the current
    Unix time cannot hold microseconds exactly.
    """
    if unix_seconds is None:
        return time.time_ns() // 1000 - _PG_EPOCH_US
    return round((unix_seconds - PG_EPOCH_UNIX) * 1_000_000)


def pg_time_to_unix(us: int) -> float:
    """Unix seconds for a replication timestamp, e.g. to measure replication lag."""
    return PG_EPOCH_UNIX + us / 1_000_000
