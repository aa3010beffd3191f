"""CopyBoth framing: frames captured from a real walsender, exact status-update bytes, fuzzing."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.errors import DecodeError
from cdc_relay.lsn import Lsn
from cdc_relay.pgoutput import Begin, Commit, Insert, Relation, decode
from cdc_relay.replication import (
    PG_EPOCH_UNIX,
    XLOG_PAYLOAD,
    PrimaryKeepalive,
    XLogData,
    parse_copy_data,
    pg_now_us,
    pg_time_to_unix,
    standby_status_update,
    xlog_positions,
)
from tests.unit.capture_pgoutput import CAPTURED_DIR, read_capture

FRAMES: list[bytes] = [m.data for m in read_capture(CAPTURED_DIR / "stream_frames.hex")]
CAPTURE_YEAR_MIN = datetime(2024, 1, 1, tzinfo=UTC).timestamp()

u64 = st.integers(0, (1 << 64) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)


def xlog_frame(start: int, end: int, send_time: int, payload: bytes) -> bytes:
    return b"w" + struct.pack("!QQq", start, end, send_time) + payload


def keepalive_frame(end: int, send_time: int, reply: int) -> bytes:
    return b"k" + struct.pack("!QqB", end, send_time, reply)


# --- frames captured from PostgreSQL 15 -----------------------------------------------------------


def test_captured_stream_frames() -> None:
    parsed = [parse_copy_data(frame) for frame in FRAMES]
    shapes = "".join("w" if isinstance(p, XLogData) else "k" for p in parsed)
    # a keepalive on connect, the transaction, a keepalive on catching up, then idle keepalives
    # until one asks for a reply because no status update was ever sent
    assert shapes.startswith("kwwwwk")
    assert set(shapes[6:]) == {"k"}

    xlog = [p for p in parsed if isinstance(p, XLogData)]
    decoded = [decode(x.payload) for x in xlog]
    assert [type(m) for m in decoded] == [Begin, Relation, Insert, Commit]
    begin, relation, insert, commit = decoded
    assert isinstance(relation, Relation)
    assert relation.name == "outbox"
    assert isinstance(insert, Insert)
    assert insert.new[3] == b"Streamed"
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn

    # the walsender stamps a Commit frame with the transaction's end, and a Relation frame
    # (schema, not WAL) with 0/0: a frame's data_start is not a position to confirm
    assert xlog[3].data_start == xlog[3].wal_end == commit.end_lsn
    assert xlog[1].data_start == xlog[1].wal_end == 0

    keepalives = [p for p in parsed if isinstance(p, PrimaryKeepalive)]
    assert keepalives[-1].reply_requested
    assert not any(k.reply_requested for k in keepalives[:-1])
    assert keepalives[-1].wal_end >= commit.end_lsn

    send_times = [p.send_time for p in parsed]
    assert send_times == sorted(send_times)
    assert all(pg_time_to_unix(t) > CAPTURE_YEAR_MIN for t in send_times)
    assert all(isinstance(p.wal_end, Lsn) for p in parsed)


def test_payload_is_a_view_of_the_frame_not_a_copy() -> None:
    frame = next(f for f in FRAMES if f[:1] == b"w")
    view = memoryview(frame)
    parsed = parse_copy_data(view)
    assert isinstance(parsed, XLogData)
    assert isinstance(parsed.payload, memoryview)
    assert parsed.payload.obj is frame
    assert bytes(parsed.payload) == frame[25:]
    from_bytes = parse_copy_data(frame)
    assert isinstance(from_bytes, XLogData)
    assert from_bytes.payload == frame[25:]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{chr(f[0])}{len(f)}")
def test_every_truncated_header_is_a_decode_error(frame: bytes) -> None:
    kind = "XLogData" if frame[:1] == b"w" else "PrimaryKeepalive"
    header = 25 if kind == "XLogData" else 18
    for cut in range(1, header):
        with pytest.raises(DecodeError) as info:
            parse_copy_data(frame[:cut])
        assert info.value.kind == kind
        assert 1 <= info.value.offset <= cut
        assert "truncated" in info.value.problem


def test_truncation_offsets_name_the_field() -> None:
    with pytest.raises(DecodeError) as info:
        parse_copy_data(b"w" + bytes(12))
    assert (info.value.kind, info.value.offset) == ("XLogData", 9)
    assert "WAL end" in info.value.problem
    with pytest.raises(DecodeError) as info:
        parse_copy_data(b"k" + bytes(16))
    assert (info.value.kind, info.value.offset) == ("PrimaryKeepalive", 17)
    assert "reply" in info.value.problem


def test_keepalive_with_trailing_bytes_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as info:
        parse_copy_data(keepalive_frame(1, 2, 0) + b"\x00")
    assert (info.value.kind, info.value.offset) == ("PrimaryKeepalive", 18)


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"", "empty"), (b"r" + bytes(33), "'r'"), (b"\x00", "0x00"), (b"d" + bytes(30), "'d'")],
)
def test_other_copy_data_is_a_decode_error(data: bytes, problem: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_copy_data(data)
    assert (info.value.kind, info.value.offset) == ("CopyData", 0)
    assert problem in info.value.problem


def test_xlogdata_with_an_empty_payload_is_framing_valid() -> None:
    parsed = parse_copy_data(xlog_frame(5, 6, 7, b""))
    assert parsed == XLogData(Lsn(5), Lsn(6), 7, b"")
    assert len(parsed.payload) == 0  # the pgoutput decoder is the one to reject it


def test_keepalive_reply_flag() -> None:
    assert parse_copy_data(keepalive_frame(0x16_B374D848, -5, 1)) == PrimaryKeepalive(
        Lsn.parse("16/B374D848"), -5, True
    )
    assert parse_copy_data(keepalive_frame(0, 0, 0)) == PrimaryKeepalive(Lsn(0), 0, False)


@settings(max_examples=300)
@given(u64, u64, i64, st.binary(max_size=40))
def test_xlogdata_header_round_trip(start: int, end: int, send_time: int, payload: bytes) -> None:
    parsed = parse_copy_data(memoryview(xlog_frame(start, end, send_time, payload)))
    assert isinstance(parsed, XLogData)
    assert (parsed.data_start, parsed.wal_end, parsed.send_time) == (start, end, send_time)
    assert type(parsed.data_start) is Lsn
    assert type(parsed.wal_end) is Lsn
    assert bytes(parsed.payload) == payload


@settings(max_examples=300)
@given(u64, i64, st.integers(0, 255))
def test_keepalive_round_trip(end: int, send_time: int, reply: int) -> None:
    parsed = parse_copy_data(keepalive_frame(end, send_time, reply))
    assert parsed == PrimaryKeepalive(Lsn(end), send_time, reply != 0)


@settings(max_examples=1000)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"w", b"k"]).flatmap(
            lambda tag: st.binary(max_size=30).map(lambda body: tag + body)
        ),
    )
)
def test_random_bytes_parse_or_raise_decode_error_only(data: bytes) -> None:
    try:
        parsed = parse_copy_data(data)
    except DecodeError as exc:
        assert exc.kind in {"XLogData", "PrimaryKeepalive", "CopyData"}
        assert 0 <= exc.offset <= len(data)
    else:
        assert isinstance(parsed, XLogData | PrimaryKeepalive)
        assert data[:1] == (b"w" if isinstance(parsed, XLogData) else b"k")


# --- standby status update ------------------------------------------------------------------------


def test_status_update_exact_bytes() -> None:
    update = standby_status_update(
        write=0x0000_0016_B374_D848,
        flush=0x0000_0016_B374_D800,
        apply=0x0000_0016_B374_D800,
        now_us=0x0002_D3B5_6F3A_1C00,
        reply_requested=True,
    )
    assert update == bytes.fromhex(
        "72"  # 'r'
        "00000016b374d848"  # write
        "00000016b374d800"  # flush
        "00000016b374d800"  # apply
        "0002d3b56f3a1c00"  # clock
        "01"  # reply requested
    )
    assert standby_status_update(0, 0, 0, 0) == b"r" + bytes(33)


def test_status_update_accepts_lsn_values_and_negative_clock() -> None:
    lsn = Lsn.parse("FFFFFFFF/FFFFFFFF")
    update = standby_status_update(lsn, lsn, Lsn(0), -1)
    assert update == b"r" + b"\xff" * 16 + bytes(8) + b"\xff" * 8 + b"\x00"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((-1, 0, 0, 0), "write"),
        ((0, 1 << 64, 0, 0), "flush"),
        ((0, 0, -5, 0), "apply"),
        ((0, 0, 0, 1 << 63), "clock"),
    ],
)
def test_status_update_rejects_values_that_would_wrap(
    args: tuple[int, int, int, int], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        standby_status_update(*args)


@settings(max_examples=300)
@given(u64, u64, u64, i64, st.booleans())
def test_status_update_layout(
    write: int, flush: int, apply: int, now_us: int, reply_requested: bool
) -> None:
    update = standby_status_update(write, flush, apply, now_us, reply_requested)
    assert len(update) == 34
    assert struct.unpack("!cQQQqB", update) == (
        b"r",
        write,
        flush,
        apply,
        now_us,
        int(reply_requested),
    )


# --- clocks ---------------------------------------------------------------------------------------


def test_pg_epoch() -> None:
    assert datetime(2000, 1, 1, tzinfo=UTC).timestamp() == PG_EPOCH_UNIX
    assert pg_now_us(PG_EPOCH_UNIX) == 0
    assert pg_now_us(PG_EPOCH_UNIX + 1.5) == 1_500_000
    assert pg_now_us(PG_EPOCH_UNIX - 1) == -1_000_000
    assert pg_time_to_unix(0) == PG_EPOCH_UNIX
    assert pg_time_to_unix(2_500_000) == PG_EPOCH_UNIX + 2.5


def test_commit_timestamp_of_a_known_instant() -> None:
    instant = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    assert pg_now_us(instant) == 757_479_845_000_000  # as the origin capture's Begin says
    assert pg_time_to_unix(757_479_845_000_000) == instant


def test_pg_now_us_reads_the_wall_clock_in_microseconds() -> None:
    before = time.time()
    now = pg_now_us()
    after = time.time()
    assert pg_now_us(before) - 1 <= now <= pg_now_us(after) + 1
    assert isinstance(now, int)


@settings(max_examples=2000)
@given(st.integers(-(10**15), 3 * 10**15))  # 1968-2095: a double holds Unix time to < 1 µs
def test_clock_conversions_round_trip(us: int) -> None:
    assert abs(pg_now_us(pg_time_to_unix(us)) - us) <= 1


def test_the_protocol_modules_stay_pure() -> None:
    """Decoding and framing must not drag in an I/O library (see DESIGN.md, Layout)."""
    probe = (
        "import sys, cdc_relay.pgoutput, cdc_relay.replication;"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in {'psycopg', 'pika', 'opentelemetry'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("raw", FRAMES[:50])
def test_fast_positions_agree_with_the_parser_on_captured_frames(raw: bytes) -> None:
    frame = parse_copy_data(raw)
    positions = xlog_positions(memoryview(raw))
    if isinstance(frame, XLogData) and len(frame.payload):
        assert positions == (frame.data_start, frame.wal_end)
        assert bytes(raw[XLOG_PAYLOAD:]) == bytes(frame.payload)
    else:
        assert positions is None


@pytest.mark.parametrize(
    "raw", [b"", b"w", b"w" + b"\0" * 24, b"k" + b"\0" * 40, b"r" + b"\0" * 40]
)
def test_fast_positions_decline_what_is_not_an_xlogdata_with_payload(raw: bytes) -> None:
    assert xlog_positions(raw) is None
