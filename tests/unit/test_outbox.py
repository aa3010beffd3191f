"""OutboxMapper: Relation + Insert on the outbox table → OutboxEvent, by column name."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_relay import outbox
from cdc_relay.errors import InvalidEvent, OutboxError
from cdc_relay.lsn import Lsn
from cdc_relay.outbox import OutboxColumns, OutboxEvent, OutboxMapper
from cdc_relay.pgoutput import UNCHANGED, Binary, Column, ColumnValue, Insert, Relation

UUID = 2950
TEXT = 25
JSONB = 3802
JSON = 114
TIMESTAMPTZ = 1184
INT4 = 23

OUTBOX_OID = 16400
OTHER_OID = 16500
LSN = Lsn.parse("16/B374D848")
EVENT_ID = "0b6f7d4e-0c5a-4d8e-9b1e-6f0f3a1c2d3e"

STANDARD_COLUMNS: tuple[tuple[str, int], ...] = (
    ("id", UUID),
    ("aggregatetype", TEXT),
    ("aggregateid", TEXT),
    ("type", TEXT),
    ("payload", JSONB),
    ("headers", JSONB),
    ("traceparent", TEXT),
    ("created_at", TIMESTAMPTZ),
)

STANDARD_ROW: dict[str, ColumnValue] = {
    "id": EVENT_ID.encode(),
    "aggregatetype": b"order",
    "aggregateid": b"42",
    "type": b"OrderPlaced",
    "payload": b'{"total": 9.90, "items": [1, 2]}',
    "headers": b'{"tenant": "acme"}',
    "traceparent": b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "created_at": b"2026-11-27 10:11:12.123456+00",
}


def relation(
    columns: tuple[tuple[str, int], ...] = STANDARD_COLUMNS,
    oid: int = OUTBOX_OID,
    namespace: str = "public",
    name: str = "outbox",
) -> Relation:
    return Relation(
        oid=oid,
        namespace=namespace,
        name=name,
        replica_identity=ord("d"),
        columns=tuple(
            Column(flags=1 if n == "id" else 0, name=n, type_oid=t, type_modifier=-1)
            for n, t in columns
        ),
    )


def insert(
    values: dict[str, ColumnValue] | None = None,
    columns: tuple[tuple[str, int], ...] = STANDARD_COLUMNS,
    oid: int = OUTBOX_OID,
) -> Insert:
    """An Insert whose tuple follows ``columns`` order, taking values from ``values`` by name."""
    row = STANDARD_ROW if values is None else values
    return Insert(relation_oid=oid, new=tuple(row.get(n) for n, _ in columns))


def mapper(columns: tuple[tuple[str, int], ...] = STANDARD_COLUMNS) -> OutboxMapper:
    m = OutboxMapper([("public", "outbox")])
    m.relation(relation(columns))
    return m


def event_of(m: OutboxMapper, ins: Insert, lsn: Lsn = LSN) -> OutboxEvent:
    ev = m.event(ins, lsn)
    assert ev is not None
    return ev


def outbox_error(m: OutboxMapper, ins: Insert, lsn: Lsn = LSN) -> OutboxError:
    with pytest.raises(OutboxError) as info:
        m.event(ins, lsn)
    return info.value


# --- the happy path ------------------------------------------------------------------------------


def test_insert_into_outbox_becomes_event() -> None:
    ev = event_of(mapper(), insert())
    assert ev == OutboxEvent(
        id=EVENT_ID,
        aggregate_type="order",
        aggregate_id="42",
        type="OrderPlaced",
        payload=b'{"total": 9.90, "items": [1, 2]}',
        headers=b'{"tenant": "acme"}',
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        created_at="2026-11-27 10:11:12.123456+00",
        lsn=LSN,
        table="public.outbox",
    )
    assert type(ev.payload) is bytes
    assert type(ev.lsn) is Lsn


def test_non_ascii_text_columns_are_decoded_as_utf8() -> None:
    row = {**STANDARD_ROW, "aggregateid": "Zoë/東京".encode(), "type": "Bestellung✓".encode()}
    ev = event_of(mapper(), insert(row))
    assert ev.aggregate_id == "Zoë/東京"
    assert ev.type == "Bestellung✓"


def test_invalid_utf8_in_text_column_is_outbox_error() -> None:
    err = outbox_error(mapper(), insert({**STANDARD_ROW, "aggregateid": b"\xff\xfe"}))
    assert "aggregateid" in str(err)


def test_optional_columns_may_be_null() -> None:
    row = {**STANDARD_ROW, "headers": None, "traceparent": None, "created_at": None}
    ev = event_of(mapper(), insert(row))
    assert ev.headers is None
    assert ev.traceparent is None
    assert ev.created_at is None


def test_optional_columns_may_be_absent_from_the_table() -> None:
    minimal = STANDARD_COLUMNS[:5]
    ev = event_of(mapper(minimal), insert(columns=minimal))
    assert ev.id == EVENT_ID
    assert ev.payload == STANDARD_ROW["payload"]
    assert ev.headers is None
    assert ev.traceparent is None
    assert ev.created_at is None


def test_null_payload_is_none() -> None:
    ev = event_of(mapper(), insert({**STANDARD_ROW, "payload": None}))
    assert ev.payload is None


def test_every_insert_carries_its_own_lsn() -> None:
    m = mapper()
    first = event_of(m, insert(), Lsn(100))
    second = event_of(m, insert(), Lsn(200))
    assert (first.lsn, second.lsn) == (Lsn(100), Lsn(200))


# --- which relations are the outbox --------------------------------------------------------------


def test_insert_into_other_relation_is_none() -> None:
    m = mapper()
    m.relation(relation((("id", INT4), ("name", TEXT)), oid=OTHER_OID, name="customers"))
    assert m.event(Insert(OTHER_OID, (b"1", b"Ann")), LSN) is None
    assert not m.is_outbox_oid(OTHER_OID)
    assert m.is_outbox_oid(OUTBOX_OID)


def test_same_table_name_in_another_schema_is_not_the_outbox() -> None:
    m = OutboxMapper([("public", "outbox")])
    m.relation(relation(oid=OTHER_OID, namespace="other"))
    assert m.event(insert(oid=OTHER_OID), LSN) is None
    assert not m.is_outbox_oid(OTHER_OID)


def test_mapper_for_another_schema_matches_only_that_schema() -> None:
    m = OutboxMapper([("other", "outbox")])
    m.relation(relation(oid=OUTBOX_OID, namespace="public"))
    m.relation(relation(oid=OTHER_OID, namespace="other"))
    assert m.event(insert(oid=OUTBOX_OID), LSN) is None
    ev = event_of(m, insert(oid=OTHER_OID))
    assert ev.id == EVENT_ID


def test_empty_namespace_means_pg_catalog() -> None:
    m = OutboxMapper([("public", "outbox")])
    rel = relation(namespace="")
    m.relation(rel)
    assert not m.is_outbox(rel)
    assert OutboxMapper([("pg_catalog", "outbox")]).is_outbox(rel)


def test_table_name_must_match_exactly() -> None:
    m = OutboxMapper([("public", "outbox")])
    for name in ("outbox2", "Outbox", "outbo"):
        assert not m.is_outbox(relation(name=name))
    assert m.is_outbox(relation())


def test_insert_for_never_described_relation_is_outbox_error() -> None:
    m = mapper()
    err = outbox_error(m, Insert(relation_oid=99999, new=(b"x",)))
    assert err.context["relation_oid"] == 99999
    assert err.context["lsn"] == LSN
    assert "99999" in str(err)
    assert str(LSN) in str(err)
    assert not err.retryable


def test_relation_name_for_messages() -> None:
    m = mapper()
    assert m.relation_name(OUTBOX_OID) == "public.outbox"
    assert m.relation_name(12345) == "oid 12345"


# --- columns are found by name -------------------------------------------------------------------


def test_reordered_columns_are_mapped_by_name() -> None:
    reordered = tuple(reversed(STANDARD_COLUMNS))
    ev = event_of(mapper(reordered), insert(columns=reordered))
    assert ev.id == EVENT_ID
    assert ev.aggregate_type == "order"
    assert ev.aggregate_id == "42"
    assert ev.type == "OrderPlaced"
    assert ev.payload == STANDARD_ROW["payload"]
    assert ev.created_at == "2026-11-27 10:11:12.123456+00"


def test_added_column_is_ignored() -> None:
    wider = (("tenant", TEXT), *STANDARD_COLUMNS[:3], ("extra", INT4), *STANDARD_COLUMNS[3:])
    row = {**STANDARD_ROW, "tenant": b"acme", "extra": b"7"}
    ev = event_of(mapper(wider), insert(row, wider))
    assert ev.id == EVENT_ID
    assert ev.type == "OrderPlaced"
    assert ev.payload == STANDARD_ROW["payload"]


def test_later_relation_message_replaces_the_layout() -> None:
    m = mapper()
    assert event_of(m, insert()).aggregate_id == "42"
    # ALTER TABLE ... ADD COLUMN x; columns shift: the next Relation describes the new order
    shifted = (("x", INT4), *STANDARD_COLUMNS)
    m.relation(relation(shifted))
    ev = event_of(m, insert({**STANDARD_ROW, "x": b"1"}, shifted))
    assert ev.aggregate_id == "42"
    assert ev.id == EVENT_ID


def test_custom_column_names() -> None:
    custom = OutboxColumns(
        id="event_id",
        aggregate_type="agg_type",
        aggregate_id="agg_id",
        type="event_type",
        payload="body",
        headers="hdrs",
        traceparent="trace",
        created_at="ts",
    )
    cols = (
        ("event_id", UUID),
        ("agg_type", TEXT),
        ("agg_id", TEXT),
        ("event_type", TEXT),
        ("body", JSONB),
        ("hdrs", JSONB),
        ("trace", TEXT),
        ("ts", TIMESTAMPTZ),
        # a column with a default name must not be picked up
        ("type", TEXT),
    )
    row: dict[str, ColumnValue] = {
        "event_id": EVENT_ID.encode(),
        "agg_type": b"invoice",
        "agg_id": b"7",
        "event_type": b"InvoiceSent",
        "body": b"[1]",
        "hdrs": b"{}",
        "trace": b"tp",
        "ts": b"2026-01-01 00:00:00+00",
        "type": b"WRONG",
    }
    m = OutboxMapper([("billing", "events")], custom)
    m.relation(relation(cols, namespace="billing", name="events"))
    ev = event_of(m, insert(row, cols))
    assert ev == OutboxEvent(
        id=EVENT_ID,
        aggregate_type="invoice",
        aggregate_id="7",
        type="InvoiceSent",
        payload=b"[1]",
        headers=b"{}",
        traceparent="tp",
        created_at="2026-01-01 00:00:00+00",
        lsn=LSN,
        table="billing.events",
    )


def test_default_column_names_do_not_satisfy_custom_ones() -> None:
    m = OutboxMapper([("public", "outbox")], OutboxColumns(payload="body"))
    m.relation(relation())  # has "payload", not "body"
    err = outbox_error(m, insert())
    assert "body" in str(err)


# --- missing or unusable values ------------------------------------------------------------------


def test_relation_without_required_column_does_not_raise_by_itself() -> None:
    m = OutboxMapper([("public", "outbox")])
    m.relation(relation(STANDARD_COLUMNS[1:]))  # no id
    assert m.is_outbox_oid(OUTBOX_OID)


@pytest.mark.parametrize("dropped", ["id", "aggregatetype", "aggregateid", "type", "payload"])
def test_required_column_dropped_later_fails_at_the_insert(dropped: str) -> None:
    m = mapper()
    assert event_of(m, insert()).id == EVENT_ID
    without = tuple(c for c in STANDARD_COLUMNS if c[0] != dropped)
    m.relation(relation(without))  # ALTER TABLE outbox DROP COLUMN ...
    lsn = Lsn.parse("1A/2B3C4D5E")
    err = outbox_error(m, insert(columns=without), lsn)
    text = str(err)
    assert repr(dropped) in text or f"column={dropped}" in text
    assert "public.outbox" in text
    # the operator needs to know which INSERT could not be mapped
    assert str(lsn) in text


@pytest.mark.parametrize("column", ["id", "aggregatetype", "aggregateid", "type"])
def test_null_required_column_is_outbox_error(column: str) -> None:
    lsn = Lsn.parse("3/10")
    err = outbox_error(mapper(), insert({**STANDARD_ROW, column: None}), lsn)
    assert "NULL" in str(err)
    assert err.context["column"] == column
    assert err.context["lsn"] == lsn
    assert str(lsn) in str(err)


def test_null_id_error_has_no_event_id_but_others_do() -> None:
    err = outbox_error(mapper(), insert({**STANDARD_ROW, "id": None}))
    assert "event_id" not in err.context
    err = outbox_error(mapper(), insert({**STANDARD_ROW, "type": None}))
    assert err.context["event_id"] == EVENT_ID


@pytest.mark.parametrize(
    "column",
    ["payload", "id", "aggregatetype", "aggregateid", "type", "headers", "created_at"],
)
def test_unchanged_toast_is_outbox_error_never_none(column: str) -> None:
    err = outbox_error(mapper(), insert({**STANDARD_ROW, column: UNCHANGED}))
    assert "TOAST" in str(err)
    assert err.context["column"] == column
    assert err.context["lsn"] == LSN


@pytest.mark.parametrize("column", ["payload", "id", "aggregateid", "traceparent"])
def test_binary_value_is_outbox_error(column: str) -> None:
    err = outbox_error(mapper(), insert({**STANDARD_ROW, column: Binary(b"\x00\x01")}))
    assert "binary" in str(err)
    assert err.context["column"] == column


def test_insert_with_fewer_columns_than_relation_is_outbox_error() -> None:
    m = mapper()
    short = Insert(OUTBOX_OID, (EVENT_ID.encode(), b"order", b"42", b"T"))
    err = outbox_error(m, short)
    assert err.context["column"] == "payload"


# --- payload JSON --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload_type", [JSONB, JSON])
def test_json_typed_payload_is_passed_through_unparsed(payload_type: int) -> None:
    cols = tuple((n, payload_type if n == "payload" else t) for n, t in STANDARD_COLUMNS)
    raw = b'{"n": 1.50, "b": [1,2]}'
    ev = event_of(mapper(cols), insert({**STANDARD_ROW, "payload": raw}, cols))
    assert ev.payload == raw


TEXT_PAYLOAD = tuple((n, TEXT if n == "payload" else t) for n, t in STANDARD_COLUMNS)


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"{'single': 1}", b'{"a": 1} trailing', b"\xff", b"[1,"]
)
def test_text_payload_with_invalid_json_is_outbox_error(raw: bytes) -> None:
    err = outbox_error(mapper(TEXT_PAYLOAD), insert({**STANDARD_ROW, "payload": raw}, TEXT_PAYLOAD))
    assert "JSON" in str(err)
    assert err.context["column"] == "payload"
    assert err.context["event_id"] == EVENT_ID
    assert err.context["lsn"] == LSN


@pytest.mark.parametrize(
    "raw", [b'{"a": 1}', b"[1, 2.50]", b'"just a string"', b"42", b"null", b'{"k": "\xc3\xa9"}']
)
def test_text_payload_with_valid_json_is_accepted_verbatim(raw: bytes) -> None:
    ev = event_of(mapper(TEXT_PAYLOAD), insert({**STANDARD_ROW, "payload": raw}, TEXT_PAYLOAD))
    assert ev.payload == raw


def test_text_payload_null_is_none() -> None:
    ev = event_of(mapper(TEXT_PAYLOAD), insert({**STANDARD_ROW, "payload": None}, TEXT_PAYLOAD))
    assert ev.payload is None


def test_logical_message_event_with_headers_object() -> None:
    from cdc_relay.pgoutput import Message

    m = OutboxMapper([("public", "outbox")])
    content = (
        b'{"id": "e1", "aggregatetype": "order", "aggregateid": "A", "type": "Paid",'
        b' "payload": {"n": 1.50}, "headers": {"tenant": "acme"}, "traceparent": "tp"}'
    )
    ev = m.message_event(Message(True, LSN, "outbox", content))
    assert ev is not None
    assert ev.headers == b'{"tenant": "acme"}'
    assert ev.payload == b'{"n": 1.50}'
    assert ev.traceparent == "tp"
    assert ev.table == ""
    assert m.message_event(Message(False, LSN, "outbox", content)) is None
    assert m.message_event(Message(True, LSN, "other", content)) is None
    no_headers = m.message_event(
        Message(
            True, LSN, "outbox", b'{"id":"e2","aggregatetype":"o","aggregateid":"A","type":"T"}'
        )
    )
    assert no_headers is not None
    assert no_headers.headers is None
    assert no_headers.payload == b"null"


# --- row-level problems are InvalidEvent with the raw row ----------------------------------------

BYTEA = 17
RAW_ROW: dict[str, bytes | None] = {n: v for n, v in STANDARD_ROW.items() if type(v) is bytes}


def invalid_event(m: OutboxMapper, ins: Insert, lsn: Lsn = LSN) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        m.event(ins, lsn)
    return info.value


@pytest.mark.parametrize(
    ("column", "value", "raw"),
    [
        ("id", None, None),
        ("aggregateid", b"\xff\xfe", b"\xff\xfe"),
        ("payload", UNCHANGED, None),
        ("traceparent", Binary(b"\x00\x01"), None),
        ("type", None, None),
    ],
)
def test_row_problems_carry_every_column_raw(
    column: str, value: ColumnValue, raw: bytes | None
) -> None:
    err = invalid_event(mapper(), insert({**STANDARD_ROW, column: value}))
    assert err.column == column
    assert err.relation == "public.outbox"
    assert err.lsn == LSN
    assert err.row == {**RAW_ROW, column: raw}
    assert not err.retryable


def test_fewer_columns_than_the_table_keeps_what_arrived() -> None:
    short = Insert(OUTBOX_OID, (EVENT_ID.encode(), b"order", b"42", b"T"))
    err = invalid_event(mapper(), short)
    assert err.event_id == EVENT_ID
    assert err.row == {
        "id": EVENT_ID.encode(),
        "aggregatetype": b"order",
        "aggregateid": b"42",
        "type": b"T",
        "payload": None,
        "headers": None,
        "traceparent": None,
        "created_at": None,
    }


def test_the_row_includes_columns_that_are_not_outbox_columns() -> None:
    wider = (*STANDARD_COLUMNS, ("tenant", TEXT))
    err = invalid_event(
        mapper(wider), insert({**STANDARD_ROW, "id": None, "tenant": b"acme"}, wider)
    )
    assert err.row is not None and err.row["tenant"] == b"acme"


def test_error_names_the_column_as_the_table_has_it() -> None:
    m = OutboxMapper([("public", "outbox")], OutboxColumns(aggregate_id=("agg_id", "aggregateid")))
    m.relation(relation())
    err = invalid_event(m, insert({**STANDARD_ROW, "aggregateid": None}))
    assert err.column == "aggregateid"


def test_table_problems_stay_outbox_errors_not_invalid_events() -> None:
    m = mapper()
    err = outbox_error(m, Insert(relation_oid=99999, new=(b"x",)))
    assert not isinstance(err, InvalidEvent)
    m.relation(relation(STANDARD_COLUMNS[1:]))  # no id column
    err = outbox_error(m, insert(columns=STANDARD_COLUMNS[1:]))
    assert not isinstance(err, InvalidEvent)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"payload": 1e400}',
        b"1e400",
        b"-1E-400",
        b'{"big": 123456789012345678901234567890}',
        b"[" + b"1" * 5000 + b"]",
    ],
)
def test_text_payload_with_numbers_jsonb_accepts_is_valid(raw: bytes) -> None:
    ev = event_of(mapper(TEXT_PAYLOAD), insert({**STANDARD_ROW, "payload": raw}, TEXT_PAYLOAD))
    assert ev.payload == raw


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'"\xff"', b'{"k": "\xc3"}'])
def test_text_payload_deep_or_not_utf8_is_an_invalid_event(raw: bytes) -> None:
    err = invalid_event(
        mapper(TEXT_PAYLOAD), insert({**STANDARD_ROW, "payload": raw}, TEXT_PAYLOAD)
    )
    assert err.column == "payload"
    assert err.row is not None and err.row["payload"] == raw


BYTEA_PAYLOAD = tuple((n, BYTEA if n == "payload" else t) for n, t in STANDARD_COLUMNS)


def test_bytea_payload_in_hex_is_decoded_and_checked() -> None:
    raw = b'{"n": 1e400}'
    hex_text = b"\\x" + raw.hex().encode()
    ev = event_of(
        mapper(BYTEA_PAYLOAD), insert({**STANDARD_ROW, "payload": hex_text}, BYTEA_PAYLOAD)
    )
    assert ev.payload == raw


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"{\\\\001}", "the relay sets bytea_output = 'hex'"),
        (b"\\xzz", "not valid hex"),
        (b"\\x" + b"not json".hex().encode(), "JSON"),
        (b"\\x" + b'"\xff"'.hex().encode(), "UTF-8"),
    ],
)
def test_bytea_payload_problems_are_invalid_events(value: bytes, problem: str) -> None:
    err = invalid_event(
        mapper(BYTEA_PAYLOAD), insert({**STANDARD_ROW, "payload": value}, BYTEA_PAYLOAD)
    )
    assert problem in err.problem
    assert err.row is not None and err.row["payload"] == value


# --- logical messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"id": 5, "aggregatetype": "o", "aggregateid": "A", "type": "T"}',
        b'{"id": "e"}',
        b"[]",
        b'{"id":"e","aggregatetype":"o","aggregateid":"A","type":"T","payload":"\xff"}',
        b'{"id":"e","aggregatetype":"o","aggregateid":"A","type":"T","payload":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
    ],
)
def test_logical_message_that_is_not_an_event_is_an_invalid_event(content: bytes) -> None:
    from cdc_relay.pgoutput import Message

    m = OutboxMapper([("public", "outbox")], message_prefix="events")
    assert m.prefix == "events"
    with pytest.raises(InvalidEvent) as info:
        m.message_event(Message(True, LSN, "events", content))
    err = info.value
    assert err.row == {"content": content, "prefix": b"events"}
    assert err.lsn == LSN
    assert err.column == "content"
    assert err.relation is None
    assert "events" in err.problem
    # other prefixes and non-transactional messages are still none of our business
    assert m.message_event(Message(True, LSN, "outbox", content)) is None
    assert m.message_event(Message(False, LSN, "events", content)) is None


# --- the one-go read of plain rows is the careful read -------------------------------------------

_cell = st.one_of(
    st.none(),
    st.just(UNCHANGED),
    st.binary(max_size=12).map(Binary),
    st.binary(max_size=12),  # often not UTF-8
    st.text(max_size=12).map(str.encode),
)


def _outcome(m: OutboxMapper, ins: Insert) -> object:
    try:
        return m.event(ins, LSN)
    except OutboxError as exc:
        return (type(exc).__name__, str(exc))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(st.sampled_from(list(STANDARD_ROW)), _cell, max_size=3),
    length=st.integers(0, len(STANDARD_COLUMNS) + 1),
    drop=st.sets(st.sampled_from(("headers", "traceparent", "created_at"))),
)
def test_plain_row_fast_read_equals_careful_read(
    changes: dict[str, ColumnValue],
    length: int,
    drop: set[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every row, odd ones included, gives the same event or the same error either way."""
    columns = tuple(c for c in STANDARD_COLUMNS if c[0] not in drop)
    m = mapper(columns)
    row = insert({**STANDARD_ROW, **changes}, columns).new
    ins = Insert(relation_oid=OUTBOX_OID, new=((*row, b"extra"))[:length])
    fast = _outcome(m, ins)
    with monkeypatch.context() as patch:
        patch.setattr(outbox, "_plain_event", lambda *_: None)
        careful = _outcome(m, ins)
    assert fast == careful
