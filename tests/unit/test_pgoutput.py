"""The pgoutput decoder against bytes captured from PostgreSQL 15, plus property tests.

The captures (tests/unit/captured/*.hex) come from tests/unit/capture_pgoutput.py; the comments in
each file say which SQL produced them. Values asserted here are the ones that SQL wrote.
"""

from __future__ import annotations

import itertools
import struct
import typing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_relay import pgoutput
from cdc_relay.errors import DecodeError
from cdc_relay.lsn import Lsn
from cdc_relay.pgoutput import (
    UNCHANGED,
    Begin,
    Binary,
    Column,
    ColumnValue,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleData,
    Type,
    Update,
    decode,
)
from tests.unit.capture_pgoutput import CAPTURED_DIR, SCENARIOS, CapturedMessage, read_capture
from tests.unit.pgoutput_encoder import encode

CAPTURES: dict[str, list[CapturedMessage]] = {
    s.name: read_capture(CAPTURED_DIR / f"{s.name}.hex") for s in SCENARIOS
}
ALL_RAW: list[bytes] = [m.data for messages in CAPTURES.values() for m in messages]

KIND_NAMES = {
    Begin: "Begin",
    Commit: "Commit",
    Origin: "Origin",
    Relation: "Relation",
    Type: "Type",
    Insert: "Insert",
    Update: "Update",
    Delete: "Delete",
    Truncate: "Truncate",
    Message: "Message",
}
KIND_BY_BYTE = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
}

OUTBOX_COLUMNS = (
    Column(1, "id", 2950, -1),  # uuid, the replica identity key
    Column(0, "aggregatetype", 25, -1),
    Column(0, "aggregateid", 25, -1),
    Column(0, "type", 25, -1),
    Column(0, "payload", 3802, -1),  # jsonb
    Column(0, "headers", 3802, -1),
    Column(0, "traceparent", 25, -1),
    Column(0, "created_at", 1184, -1),  # timestamptz
)
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def decoded(name: str) -> list[PgOutputMessage]:
    return [decode(m.data) for m in CAPTURES[name]]


def kinds(messages: list[PgOutputMessage]) -> list[str]:
    return [KIND_NAMES[type(m)] for m in messages]


def pg_us(text: str) -> int:
    """Microseconds since 2000-01-01 UTC for an ISO timestamp, the way pgoutput counts time."""
    delta = datetime.fromisoformat(text) - datetime(2000, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@contextmanager
def view_path_forced() -> Iterator[None]:
    """Make decode() take its zero-copy memoryview path for every row, however small."""
    saved = pgoutput.VIEW_COPY_LIMIT
    pgoutput.VIEW_COPY_LIMIT = 0
    try:
        yield
    finally:
        pgoutput.VIEW_COPY_LIMIT = saved


def outcome(data: bytes | memoryview) -> PgOutputMessage | tuple[str, int]:
    """The decoded message, or (kind, offset) of the DecodeError; anything else propagates."""
    try:
        return decode(data)
    except DecodeError as exc:
        length = len(data)
        assert 0 <= exc.offset <= length, (exc, length)
        assert exc.kind in {*KIND_NAMES.values(), "unknown"}
        assert exc.kind in str(exc)
        return exc.kind, exc.offset


# --- captured bytes: table-driven -----------------------------------------------------------------

# one letter per message, the pgoutput type byte: B=Begin R=Relation I=Insert C=Commit ...
EXPECTED_KINDS: dict[str, str] = {
    "insert": "BRIC",
    "multi_insert": "BRIIIC",
    "sequence": "BRIC BIC BIIC",
    "update": "BRUC",
    "update_key": "BRUC",
    "update_full": "BYRIC BUC",
    "toast": "BRIC BUC",
    "delete": "BRDC",
    "delete_full": "BYRDC",
    "truncate": "BYRRTC BRTC",
    "message_transactional": "BMC",
    "message_nontransactional": "MM",
    "rollback": "M",
    "origin": "BORIC",
    "binary": "BRIC BYRIC",
}


def test_every_capture_scenario_has_an_expectation() -> None:
    assert set(EXPECTED_KINDS) == set(CAPTURES)
    assert sum(len(v) for v in CAPTURES.values()) == sum(
        len(v.replace(" ", "")) for v in EXPECTED_KINDS.values()
    )


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED_KINDS.items()))
def test_kind_sequence(name: str, expected: str) -> None:
    letters = {name: chr(byte) for byte, name in KIND_BY_BYTE.items()}
    assert "".join(letters[kind] for kind in kinds(decoded(name))) == expected.replace(" ", "")


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_transactions_are_consistent_with_the_servers_lsn_and_xid(name: str) -> None:
    """Begin/Commit pair up; xids and LSNs match what the server reported beside each message."""
    open_begin: Begin | None = None
    relations: dict[int, Relation] = {}
    types: dict[int, Type] = {}
    last_end = Lsn(0)
    for captured in CAPTURES[name]:
        msg = decode(captured.data)
        assert captured.lsn is not None
        assert captured.xid is not None
        if isinstance(msg, Begin):
            assert open_begin is None
            assert msg.xid == captured.xid
            assert msg.final_lsn > last_end
            open_begin = msg
        elif isinstance(msg, Commit):
            assert open_begin is not None
            assert captured.xid == open_begin.xid
            assert msg.commit_lsn == open_begin.final_lsn
            assert msg.commit_time == open_begin.commit_time
            assert msg.commit_lsn < msg.end_lsn
            assert str(msg.end_lsn) == captured.lsn  # the SQL interface reports the end LSN
            assert msg.end_lsn > last_end
            last_end = msg.end_lsn
            open_begin = None
        elif isinstance(msg, Message):
            assert str(msg.lsn) == captured.lsn
            assert msg.transactional == (open_begin is not None)
        elif isinstance(msg, Type):
            types[msg.oid] = msg
        elif isinstance(msg, Relation):
            relations[msg.oid] = msg
            for column in msg.columns:
                assert column.type_oid < 16384 or column.type_oid in types
        else:
            assert open_begin is not None, "a change outside a transaction"
            assert captured.xid == open_begin.xid
            if isinstance(msg, Truncate):
                assert all(oid in relations for oid in msg.relation_oids)
            elif isinstance(msg, Insert | Update | Delete):
                width = len(relations[msg.relation_oid].columns)
                rows = (getattr(msg, f, None) for f in ("new", "old", "key"))
                assert all(len(row) == width for row in rows if row is not None)
    assert open_begin is None


def test_insert_of_an_outbox_row() -> None:
    begin, relation, insert, commit = decoded("insert")
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert commit.flags == 0
    assert isinstance(relation, Relation)
    assert relation == Relation(relation.oid, "public", "outbox", ord("d"), OUTBOX_COLUMNS)
    assert insert == Insert(
        relation.oid,
        (
            b"6f1c2a9e-8d3b-4c1e-9f0a-1b2c3d4e5f60",
            b"order",
            b"o-1",
            b"OrderCreated",
            b'{"items": ["a", "b"], "total": 42}',  # jsonb's own normalised text
            b'{"source": "shop"}',
            TRACEPARENT,
            b"2024-01-02 03:04:05.123456+00",
        ),
    )
    assert all(type(v) is bytes for v in insert.new)


def test_multi_row_insert_with_null_and_non_ascii_values() -> None:
    messages = decoded("multi_insert")
    inserts = [m for m in messages if isinstance(m, Insert)]
    assert [i.new[0] for i in inserts] == [
        b"00000000-0000-4000-8000-000000000001",
        b"00000000-0000-4000-8000-000000000002",
        b"00000000-0000-4000-8000-000000000003",
    ]
    assert inserts[0].new[4] == b'{"paid": true}'
    assert inserts[0].new[5:7] == (None, None)
    assert inserts[1].new[4] is None  # NULL payload
    third = inserts[2].new
    assert isinstance(third[2], bytes)
    assert isinstance(third[4], bytes)
    assert third[2].decode() == "Grüße-東京-🚀"
    assert third[4].decode() == '{"city": "Köln", "name": "Zoë Ñúñez"}'


def test_sequence_of_transactions_in_commit_order() -> None:
    messages = decoded("sequence")
    begins = [m for m in messages if isinstance(m, Begin)]
    commits = [m for m in messages if isinstance(m, Commit)]
    assert [b.xid for b in begins] == sorted(b.xid for b in begins)
    assert len({b.xid for b in begins}) == 3
    ends = [c.end_lsn for c in commits]
    assert ends == sorted(ends)
    assert all(a.end_lsn <= b.commit_lsn for a, b in itertools.pairwise(commits))
    assert [m.new[2] for m in messages if isinstance(m, Insert)] == [
        b"s-1",
        b"s-2",
        b"s-3",
        b"s-3b",
    ]


def test_update_without_key_change_sends_only_the_new_row() -> None:
    update = decoded("update")[2]
    assert isinstance(update, Update)
    assert update.old is None
    assert update.key is None
    assert update.new[0] == b"6f1c2a9e-8d3b-4c1e-9f0a-1b2c3d4e5f60"
    assert update.new[3] == b"OrderShipped"


def test_update_of_the_key_sends_the_old_key() -> None:
    update = decoded("update_key")[2]
    assert isinstance(update, Update)
    assert update.old is None
    assert update.key == (b"00000000-0000-4000-8000-000000000001", *([None] * 7))
    assert update.new[0] == b"00000000-0000-4000-8000-0000000000ff"
    assert update.new[3] == b"OrderPaid"


def test_replica_identity_full_type_and_old_row() -> None:
    messages = decoded("update_full")
    mood, accounts = messages[1], messages[2]
    assert isinstance(mood, Type)
    assert (mood.namespace, mood.name) == ("public", "mood")
    assert isinstance(accounts, Relation)
    assert accounts.replica_identity == ord("f")
    assert accounts.columns == (
        Column(1, "id", 23, -1),
        Column(1, "näme", 25, -1),  # non-ASCII column name
        Column(1, "balance", 1700, (12 << 16 | 2) + 4),  # numeric(12,2) typmod
        Column(1, "mood", mood.oid, -1),
    )
    update = messages[6]
    assert update == Update(
        accounts.oid,
        old=(b"1", "Zoë".encode(), b"10.50", b"ok"),
        key=None,
        new=(b"1", "Zoë".encode(), b"99.99", b"happy"),
    )


def test_unchanged_toast_column_is_the_sentinel() -> None:
    messages = decoded("toast")
    insert, update = messages[2], messages[5]
    assert isinstance(insert, Insert)
    assert insert.new == (b"1", b"draft", b"lorem ipsum " * 500)
    assert isinstance(update, Update)
    assert update.new[:2] == (b"1", b"final")
    assert update.new[2] is UNCHANGED
    assert repr(update.new[2]) == "UNCHANGED"


def test_delete_sends_the_key_or_the_full_old_row() -> None:
    delete = decoded("delete")[2]
    assert isinstance(delete, Delete)
    assert delete == Delete(
        delete.relation_oid, None, (b"00000000-0000-4000-8000-000000000002", *([None] * 7))
    )
    delete_full = decoded("delete_full")[3]
    assert isinstance(delete_full, Delete)
    assert delete_full.key is None
    assert delete_full.old == (b"1", "Zoë".encode(), b"99.99", b"happy")


def test_truncate_options_and_relations() -> None:
    messages = decoded("truncate")
    accounts, documents, first = messages[2], messages[3], messages[4]
    outbox, second = messages[7], messages[8]
    assert isinstance(accounts, Relation)
    assert isinstance(documents, Relation)
    assert isinstance(outbox, Relation)
    assert (accounts.name, documents.name, outbox.name) == ("accounts", "documents", "outbox")
    assert first == Truncate(options=1 | 2, relation_oids=(accounts.oid, documents.oid))
    assert second == Truncate(options=0, relation_oids=(outbox.oid,))


def test_logical_decoding_messages() -> None:
    begin, message, _ = decoded("message_transactional")
    assert isinstance(begin, Begin)
    assert isinstance(message, Message)
    assert (message.transactional, message.prefix, message.content) == (
        True,
        "outbox",
        b'{"a":1}',
    )
    ping, binary = decoded("message_nontransactional")
    assert isinstance(ping, Message)
    assert isinstance(binary, Message)
    assert (ping.transactional, ping.prefix, ping.content) == (False, "outbox-ctl", b"ping")
    assert (binary.transactional, binary.prefix, binary.content) == (False, "bin", b"\x00\xff\x80")
    assert ping.lsn < binary.lsn


def test_rolled_back_transaction_leaves_only_its_non_transactional_message() -> None:
    (message,) = decoded("rollback")
    assert isinstance(message, Message)
    assert message == Message(False, message.lsn, "audit", b"rolled back")


def test_origin_message_and_origin_commit_time() -> None:
    begin, origin, _, insert, commit = decoded("origin")
    assert origin == Origin(Lsn.parse("0/1234ABCD"), "o1")
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    # pg_replication_origin_xact_setup() set the commit timestamp the origin reported
    assert begin.commit_time == commit.commit_time == pg_us("2024-01-02T03:04:05+00:00")
    assert isinstance(insert, Insert)
    assert insert.new[3] == b"Replicated"


def test_binary_format_columns() -> None:
    messages = decoded("binary")
    outbox_row, accounts_row = messages[2], messages[7]
    assert isinstance(outbox_row, Insert)
    assert outbox_row.new == (
        Binary(uuid.UUID("00000000-0000-4000-8000-0000000000b1").bytes),
        Binary(b"order"),
        Binary(b"o-b"),
        Binary(b"Binary"),
        Binary(b'\x01{"x": 1}'),  # jsonb_send: version 1, then the text
        None,
        None,
        Binary(struct.pack("!q", pg_us("2000-01-01T00:00:01+00:00"))),
    )
    assert isinstance(accounts_row, Insert)
    assert accounts_row.new[0] == Binary(struct.pack("!i", 2))
    assert accounts_row.new[1] == Binary(b"Bob")
    # numeric_send: ndigits 2, weight 0, sign +, dscale 2, base-10000 digits 1 and 2500
    assert accounts_row.new[2] == Binary(struct.pack("!hhHHhh", 2, 0, 0, 2, 1, 2500))
    assert accounts_row.new[3] == Binary(b"sad")


@pytest.mark.parametrize("raw", ALL_RAW, ids=lambda raw: f"{chr(raw[0])}{len(raw)}")
def test_captured_bytes_reencode_exactly(raw: bytes) -> None:
    assert encode(decode(raw)) == raw


@pytest.mark.parametrize("raw", ALL_RAW, ids=lambda raw: f"{chr(raw[0])}{len(raw)}")
def test_memoryview_input_decodes_to_the_same_and_copies(raw: bytes) -> None:
    expected = decode(raw)
    buffer = bytearray(b"wxyz" + raw)  # an offset view, as an XLogData payload is
    view = memoryview(buffer)[4:]
    assert decode(view) == expected
    with view_path_forced():
        result = decode(view)
    assert result == expected
    buffer[4:] = bytes(len(raw))  # libpq reuses its buffer: decoded values must not change
    assert result == expected
    for row in (getattr(result, f, None) for f in ("new", "old", "key")):
        for value in row or ():
            assert value is None or type(value) in (bytes, Binary) or value is UNCHANGED


def test_large_rows_take_the_view_path_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    copied_out: list[TupleData] = []
    real_owned = pgoutput._owned

    def spy(values: TupleData) -> TupleData:
        copied_out.append(values)
        return real_owned(values)

    monkeypatch.setattr(pgoutput, "_owned", spy)
    big = b"lorem ipsum " * (pgoutput.VIEW_COPY_LIMIT // 12 + 1)
    raw = encode(Insert(16406, (b"1", Binary(big), big, None)))
    assert len(raw) > pgoutput.VIEW_COPY_LIMIT
    buffer = bytearray(raw)
    insert = decode(memoryview(buffer))
    assert len(copied_out) == 1  # decoded from the view, values copied out once
    assert isinstance(copied_out[0][2], memoryview)
    decode(memoryview(CAPTURES["toast"][2].data))  # a 6 KB row is copied up front instead
    assert len(copied_out) == 1
    buffer[:] = bytes(len(buffer))
    assert insert == Insert(16406, (b"1", Binary(big), big, None))
    assert type(insert.new[2]) is bytes
    binary = insert.new[1]
    assert isinstance(binary, Binary)
    assert type(binary.data) is bytes


def test_other_memoryview_formats_are_read_as_bytes() -> None:
    raw = CAPTURES["insert"][2].data
    char_view = typing.cast(memoryview, memoryview(raw).cast("c"))
    assert decode(char_view) == decode(raw)


# --- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ALL_RAW, ids=lambda raw: f"{chr(raw[0])}{len(raw)}")
def test_every_truncation_and_any_trailing_byte_is_a_decode_error(raw: bytes) -> None:
    kind = KIND_BY_BYTE[raw[0]]
    for cut in range(1, len(raw)):
        with pytest.raises(DecodeError) as info:
            decode(raw[:cut])
        assert info.value.kind == kind
        assert 0 < info.value.offset <= cut
        assert "truncated" in info.value.problem or "NUL" in info.value.problem
    with pytest.raises(DecodeError) as info:
        decode(raw + b"\x00")
    assert (info.value.kind, info.value.offset) == (kind, len(raw))
    assert "unexpected bytes" in info.value.problem


OID = struct.pack("!I", 16391)
TEXT_COL = b"t" + struct.pack("!I", 2) + b"ok"

MALFORMED: list[tuple[str, bytes, str, int, str]] = [
    ("empty", b"", "unknown", 0, "empty"),
    ("unknown type", b"X\x00", "unknown", 0, "unknown message type 'X'"),
    ("non-printable type", b"\x07", "unknown", 0, "0x07"),
    ("protocol 2 stream start", b"S\x00\x00\x00\x01\x01", "unknown", 0, "protocol version 2"),
    ("begin without xid", b"B" + bytes(16), "Begin", 17, "xid"),
    ("begin cut in lsn", b"B" + bytes(3), "Begin", 1, "final LSN"),
    ("commit cut in end lsn", b"C\x00" + bytes(12), "Commit", 10, "end LSN"),
    ("insert without N", b"I" + OID + b"K" + b"\x00\x00", "Insert", 5, "expected 'N'"),
    ("insert bad column kind", b"I" + OID + b"N\x00\x02" + TEXT_COL + b"x", "Insert", 15, "'x'"),
    ("insert short column", b"I" + OID + b"N\x00\x01t\x00\x00\x00\x09abc", "Insert", 13, "9"),
    ("insert huge length", b"I" + OID + b"N\x00\x01t\xff\xff\xff\xffab", "Insert", 13, "left"),
    ("insert short count", b"I" + OID + b"N\x00", "Insert", 6, "column count"),
    ("insert missing column", b"I" + OID + b"N\x00\x02" + TEXT_COL, "Insert", 15, "column 2"),
    ("update bad marker", b"U" + OID + b"X\x00\x00", "Update", 5, "'K', 'O' or 'N'"),
    ("update key then no N", b"U" + OID + b"K\x00\x00" + b"O\x00\x00", "Update", 8, "'N'"),
    ("update key then end", b"U" + OID + b"K\x00\x00", "Update", 8, "'N' marker"),
    ("delete with N", b"D" + OID + b"N\x00\x00", "Delete", 5, "expected 'K' or 'O'"),
    ("relation no NUL", b"R" + OID + b"public", "Relation", 5, "NUL"),
    ("relation bad utf8", b"R" + OID + b"pub\xfflic\x00t\x00d\x00\x00", "Relation", 8, "UTF-8"),
    ("relation no identity", b"R" + OID + b"public\x00t\x00", "Relation", 14, "identity"),
    ("relation short count", b"R" + OID + b"public\x00t\x00d\x00", "Relation", 15, "count"),
    (
        "relation column cut",
        b"R" + OID + b"p\x00t\x00d\x00\x01\x01c\x00\x00",
        "Relation",
        15,
        "type",
    ),
    ("type bad utf8 name", b"Y" + OID + b"public\x00\xc3(\x00", "Type", 12, "UTF-8"),
    ("origin no NUL", b"O" + bytes(8) + b"o1", "Origin", 9, "NUL"),
    ("truncate short oids", b"T\x00\x00\x00\x03\x00" + OID * 2, "Truncate", 6, "3 relation"),
    ("truncate huge count", b"T\xff\xff\xff\xff\x00" + OID, "Truncate", 6, "relation OIDs"),
    (
        "message bad prefix",
        b"M\x01" + bytes(8) + b"\xe2\x82\x00" + bytes(4),
        "Message",
        10,
        "UTF-8",
    ),
    ("message unknown flags", b"M\x02" + bytes(8) + b"p\x00" + bytes(4), "Message", 1, "flags"),
    (
        "message short content",
        b"M\x01" + bytes(8) + b"p\x00\x00\x00\x00\x05abc",
        "Message",
        16,
        "5",
    ),
]


@pytest.mark.parametrize(
    ("data", "kind", "offset", "hint"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_input_names_kind_and_offset(
    data: bytes, kind: str, offset: int, hint: str
) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert (info.value.kind, info.value.offset) == (kind, offset)
    assert hint in info.value.problem
    assert not info.value.retryable
    # the view path must report the same problem at the same place
    with view_path_forced(), pytest.raises(DecodeError) as view_info:
        decode(memoryview(data))
    assert (view_info.value.kind, view_info.value.offset) == (kind, offset)


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    outcome(data)


@settings(max_examples=1000)
@given(st.sampled_from(sorted(KIND_BY_BYTE)), st.binary(max_size=80))
def test_random_bodies_of_every_kind_never_raise_anything_but_decode_error(
    first: int, body: bytes
) -> None:
    data = bytes([first]) + body
    result = outcome(data)
    with view_path_forced():
        assert outcome(memoryview(data)) == result


@st.composite
def mutated_captures(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(ALL_RAW)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, len(raw)))
        if action == "flip" and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
        elif action == "cut":
            del raw[pos:]
        elif action == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            del raw[pos : pos + draw(st.integers(1, 4))]
    return bytes(raw)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_captures())
def test_mutated_captures_decode_or_raise_decode_error(data: bytes) -> None:
    result = outcome(data)
    with view_path_forced():
        assert outcome(memoryview(data)) == result
    if not isinstance(result, tuple):
        assert encode(result) == data  # whatever decodes, decodes to exactly its bytes


# --- round trips through the test encoder ---------------------------------------------------------

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
lsns = st.integers(0, (1 << 64) - 1).map(Lsn)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
column_values: st.SearchStrategy[ColumnValue] = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(Binary),
    st.just(UNCHANGED),
    st.none(),
)
tuples: st.SearchStrategy[TupleData] = st.lists(column_values, max_size=12).map(tuple)

begins = st.builds(Begin, lsns, i64, u32)
commits = st.builds(Commit, u8, lsns, lsns, i64)
origins = st.builds(Origin, lsns, names)
relations = st.builds(
    Relation,
    u32,
    names,
    names,
    u8,
    st.lists(st.builds(Column, u8, names, u32, i32), max_size=10).map(tuple),
)
types = st.builds(Type, u32, names, names)
inserts = st.builds(Insert, u32, tuples)
updates = st.one_of(
    st.builds(Update, u32, st.none(), st.none(), tuples),
    st.builds(Update, u32, tuples, st.none(), tuples),
    st.builds(Update, u32, st.none(), tuples, tuples),
)
deletes = st.one_of(
    st.builds(Delete, u32, tuples, st.none()),
    st.builds(Delete, u32, st.none(), tuples),
)
truncates = st.builds(Truncate, u8, st.lists(u32, max_size=10).map(tuple))
messages_ = st.builds(Message, st.booleans(), lsns, names, st.binary(max_size=60))

STRATEGIES: dict[str, st.SearchStrategy[PgOutputMessage]] = {
    "Begin": begins,
    "Commit": commits,
    "Origin": origins,
    "Relation": relations,
    "Type": types,
    "Insert": inserts,
    "Update": updates,
    "Delete": deletes,
    "Truncate": truncates,
    "Message": messages_,
}


def assert_lsn_fields_are_lsn(message: PgOutputMessage) -> None:
    for field in ("final_lsn", "commit_lsn", "end_lsn", "lsn"):
        if hasattr(message, field):
            assert type(getattr(message, field)) is Lsn


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_every_kind(kind: str, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[kind])
    raw = encode(message)
    result = decode(raw)
    assert type(result) is type(message)
    assert KIND_NAMES[type(result)] == kind
    assert result == message
    assert_lsn_fields_are_lsn(result)
    assert decode(memoryview(raw)) == message
    with view_path_forced():
        assert decode(memoryview(raw)) == message


@settings(max_examples=100)
@given(st.lists(column_values, min_size=300, max_size=400).map(tuple))
def test_round_trip_of_wide_rows_through_the_view_path(row: TupleData) -> None:
    message = Insert(7, row)
    raw = encode(message)
    assert decode(memoryview(raw)) == message
    assert decode(raw) == message


# --- the per-transaction fast readers agree with decode() ----------------------------------------


@given(
    final_lsn=st.integers(0, (1 << 64) - 1),
    commit_time=st.integers(-(1 << 63), (1 << 63) - 1),
    xid=st.integers(0, (1 << 32) - 1),
    offset=st.integers(0, 30),
    cut=st.integers(-2, 2),
)
def test_begin_fields_read_what_decode_reads(
    final_lsn: int, commit_time: int, xid: int, offset: int, cut: int
) -> None:
    raw = encode(Begin(final_lsn=Lsn(final_lsn), commit_time=commit_time, xid=xid))
    raw = raw[: len(raw) + cut] if cut < 0 else raw + b"\x00" * cut
    buf = memoryview(b"w" * offset + raw)
    fields = pgoutput.begin_fields(buf, offset)
    if cut:  # not exactly a Begin: left to decode(), which names the problem
        assert fields is None
        with pytest.raises(DecodeError):
            pgoutput.decode(raw)
    else:
        assert fields == (final_lsn, commit_time, xid)
        assert pgoutput.decode(raw) == Begin(Lsn(final_lsn), commit_time, xid)


@given(
    end_lsn=st.integers(0, (1 << 64) - 1),
    commit_lsn=st.integers(0, (1 << 64) - 1),
    commit_time=st.integers(-(1 << 63), (1 << 63) - 1),
    offset=st.integers(0, 30),
    cut=st.integers(-2, 2),
)
def test_commit_fields_read_what_decode_reads(
    end_lsn: int, commit_lsn: int, commit_time: int, offset: int, cut: int
) -> None:
    commit = Commit(
        flags=0, commit_lsn=Lsn(commit_lsn), end_lsn=Lsn(end_lsn), commit_time=commit_time
    )
    raw = encode(commit)
    raw = raw[: len(raw) + cut] if cut < 0 else raw + b"\x00" * cut
    buf = b"k" * offset + raw
    fields = pgoutput.commit_fields(buf, offset)
    if cut:
        assert fields is None
        with pytest.raises(DecodeError):
            pgoutput.decode(raw)
    else:
        assert fields == (0, commit_lsn, end_lsn, commit_time)
        assert pgoutput.decode(raw) == commit


def test_fast_readers_decline_other_kinds() -> None:
    commit = encode(Commit(flags=0, commit_lsn=Lsn(1), end_lsn=Lsn(2), commit_time=3))
    assert pgoutput.begin_fields(b"C" + commit[1:21], 0) is None  # Begin-sized, but a 'C'
    assert pgoutput.commit_fields(b"B" + commit[1:], 0) is None
