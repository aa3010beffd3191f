"""The fast AMQP property encoder must produce exactly what pika produces."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pika.spec import BasicProperties

from cdc_relay.amqp import (
    CONTENT_HEADER_OVERHEAD,
    MAX_DEPTH,
    EncodeError,
    content_header_size,
    encode_event_properties,
    encode_properties,
    encode_publish,
    encode_table,
    publish_frames,
    string_headers,
)


def _pika(headers: dict[str, str], message_id: str, timestamp: int, type_: str) -> bytes:
    props = BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        type=type_,
        timestamp=timestamp,
        app_id="cdc-relay",
        headers=headers,
    )
    return b"".join(props.encode())


def test_matches_pika_for_the_relays_properties() -> None:
    headers = {"aggregate_type": "order", "aggregate_id": "ORD-1", "source_lsn": "0/16B3748"}
    ours = encode_properties(
        "application/json", headers, 2, "5ffb67f6-0000", 1_764_277_446, "OrderPlaced", "cdc-relay"
    )
    assert ours == _pika(headers, "5ffb67f6-0000", 1_764_277_446, "OrderPlaced")


short = st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255)


@given(
    headers=st.dictionaries(short, st.text(max_size=300), max_size=6),
    message_id=short,
    timestamp=st.integers(min_value=0, max_value=2**63 - 1),
    type_=short,
)
def test_matches_pika_for_any_string_headers(
    headers: dict[str, str], message_id: str, timestamp: int, type_: str
) -> None:
    ours = encode_properties(
        "application/json", headers, 2, message_id, timestamp, type_, "cdc-relay"
    )
    assert ours == _pika(headers, message_id, timestamp, type_)


def test_only_string_headers_take_the_fast_path() -> None:
    assert string_headers({"a": "b"})
    assert string_headers({})
    assert not string_headers({"a": 1})
    assert not string_headers({"a": {"nested": "x"}})


def test_overlong_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="255") as info:
        encode_properties("application/json", {}, 2, "x" * 256, 0, "T", "cdc-relay")
    assert isinstance(info.value, EncodeError)
    assert info.value.field == "message_id"


def _pika_publish(
    channel: int, exchange: str, routing_key: str, body: bytes, frame_max: int
) -> bytes:
    from pika import frame, spec

    props = BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id="id-1",
        type="T",
        timestamp=7,
        app_id="cdc-relay",
        headers={"a": "b"},
    )
    out = [
        frame.Method(
            channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
        ).marshal(),
        frame.Header(channel, len(body), props).marshal(),
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out.append(frame.Body(channel, body[start : start + chunk]).marshal())
    return b"".join(out)


@given(
    channel=st.integers(min_value=1, max_value=65535),
    exchange=short,
    routing_key=short,
    body=st.binary(max_size=5000),
    frame_max=st.sampled_from([4096, 131072]),
)
def test_publish_frames_match_pika(
    channel: int, exchange: str, routing_key: str, body: bytes, frame_max: int
) -> None:
    props = encode_properties("application/json", {"a": "b"}, 2, "id-1", 7, "T", "cdc-relay")
    ours = encode_publish(channel, exchange, routing_key, True, props, body, frame_max)
    assert ours == _pika_publish(channel, exchange, routing_key, body, frame_max)


# --- general field tables ------------------------------------------------------------------------


def _decoded(table: dict[str, object]) -> dict[str, object]:
    from tests.unit.test_hostile_headers import decode_properties

    props = encode_properties("application/json", table, 2, "id", 0, "T", "cdc-relay")
    headers = decode_properties(props)["headers"]
    assert isinstance(headers, dict)
    return headers


def _pika_decoded(table: dict[str, object]) -> object:
    props = BasicProperties()
    props.decode(encode_properties("application/json", table, 2, "id", 0, "T", "cdc-relay"))
    return props.headers


@pytest.mark.parametrize(
    "table",
    [
        {"s": "text", "t": True, "f": False, "n": None},
        {"int": 5, "neg": -5, "max": 2**63 - 1, "min": -(2**63)},
        {"nested": {"a": [1, "x", None, {"b": [True, []]}]}, "empty": {}},
        {"list": [[], [[]], [1, [2, [3]]]]},
        {"": "", "é東": "🚀"},
    ],
)
def test_tables_of_json_values_decode_with_pika(table: dict[str, object]) -> None:
    assert _pika_decoded(table) == table
    assert _decoded(table) == table


def test_floats_are_doubles() -> None:
    # pika decodes 'd' as int(value), so the reference decoder checks these
    table = {"half": 0.5, "neg": -1e300, "tiny": 5e-324, "zero": -0.0, "list": [0.1, 2.5]}
    assert _decoded(table) == table
    assert struct.pack(">cd", b"d", 0.5) in encode_table({"half": 0.5})


def test_integers_beyond_64_bits_are_decimal_text() -> None:
    assert _decoded({"big": 2**70, "small": -(2**63) - 1}) == {
        "big": str(2**70),
        "small": str(-(2**63) - 1),
    }


def test_integers_are_long_longs() -> None:
    assert encode_table({"n": 1}) == struct.pack(">I", 11) + b"\x01n" + b"l" + struct.pack(">q", 1)


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"k" * 256: 1}, "255"),
        ({"nested": {"é" * 128: 1}}, "255"),
        ({"nan": float("nan")}, "finite"),
        ({"inf": [float("inf")]}, "finite"),
        ({"b": b"bytes"}, "bytes"),
        ({"s": {1, 2}}, "set"),
        ({"s": "\ud800"}, "surrogate"),
        ({"\udc00": "v"}, "surrogate"),
        ({"s": "fast path \ud800"}, "surrogate"),
        ({1: "key is not text"}, "not text"),
    ],
)
def test_what_amqp_cannot_carry_is_an_encode_error(table: dict[Any, object], problem: str) -> None:
    with pytest.raises(EncodeError) as info:
        encode_table(table)
    assert info.value.field == "headers"
    assert problem in info.value.problem


def test_nesting_is_bounded() -> None:
    value: object = "leaf"
    for _ in range(MAX_DEPTH):
        value = [value]
    encode_table({"ok": value})
    with pytest.raises(EncodeError, match="nested"):
        encode_table({"deep": [value]})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"message_id": "x" * 256}, "message_id"),
        ({"type_": "é" * 128}, "type"),
        ({"message_id": "\ud800"}, "message_id"),
        ({"timestamp": -1}, "timestamp"),
        ({"timestamp": 2**64}, "timestamp"),
    ],
)
def test_property_errors_name_the_property(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "content_type": "application/json",
        "headers": {},
        "delivery_mode": 2,
        "message_id": "id",
        "timestamp": 0,
        "type_": "T",
        "app_id": "cdc-relay",
    }
    args.update(kwargs)
    with pytest.raises(EncodeError) as info:
        encode_properties(**args)
    assert info.value.field == field
    assert "x" * 41 not in str(info.value)


# --- frames as parts -----------------------------------------------------------------------------


def test_small_body_is_a_part_of_its_own_not_a_copy() -> None:
    body = b"x" * 1000
    props = encode_properties("application/json", {"a": "b"}, 2, "id-1", 7, "T", "cdc-relay")
    parts = publish_frames(1, "ex", "rk", True, props, body, 131072)
    assert any(part is body for part in parts)
    assert any(part is props for part in parts)
    assert b"".join(parts) == encode_publish(1, "ex", "rk", True, props, body, 131072)


def test_large_body_is_split_into_views_of_itself() -> None:
    body = bytes(range(256)) * 100  # 25600 bytes, frames of 4088
    props = encode_properties("application/json", {}, 2, "id-1", 7, "T", "cdc-relay")
    parts = publish_frames(3, "ex", "rk", True, props, body, 4096)
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 7
    assert all(v.obj is body for v in views)
    assert b"".join(views) == body
    assert b"".join(parts) == _pika_publish_props(3, "ex", "rk", body, 4096, props)


def test_empty_body_has_no_body_frame() -> None:
    props = encode_properties("application/json", {}, 2, "id-1", 7, "T", "cdc-relay")
    parts = publish_frames(1, "", "", True, props, b"", 4096)
    assert b"".join(parts) == _pika_publish_props(1, "", "", b"", 4096, props)


def test_content_header_size_counts_the_whole_frame() -> None:
    from pika import frame

    props = encode_properties("application/json", {"a": "b"}, 2, "id-1", 7, "T", "cdc-relay")
    pika_props = BasicProperties(headers={"a": "b"})
    header = frame.Header(1, 10, pika_props).marshal()
    assert content_header_size(props) == CONTENT_HEADER_OVERHEAD + len(props)
    assert len(header) == CONTENT_HEADER_OVERHEAD + len(b"".join(pika_props.encode()))
    parts = publish_frames(1, "e", "r", True, props, b"0123456789", 131072)
    wire = b"".join(parts)
    method_size = struct.unpack_from(">I", wire, 3)[0]
    start = 7 + method_size + 1
    assert wire[start] == 2  # the content-header frame
    header_size = struct.unpack_from(">I", wire, start + 3)[0]
    assert 7 + header_size + 1 == content_header_size(props)


def _pika_publish_props(
    channel: int, exchange: str, routing_key: str, body: bytes, frame_max: int, props: bytes
) -> bytes:
    from pika import frame, spec

    decoded = BasicProperties()
    decoded.decode(props)
    out = [
        frame.Method(
            channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
        ).marshal(),
        frame.Header(channel, len(body), decoded).marshal(),
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out.append(frame.Body(channel, body[start : start + chunk]).marshal())
    return b"".join(out)


# --- what the broker's closes mean (cdc_relay.rabbitmq) ---------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name", "argument", "too_large"),
    [
        (
            "ACCESS_REFUSED - access to exchange 'outbox' in vhost '/' refused for user 'relay'",
            "exchange",
            "outbox",
            None,
            False,
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'outbox' in vhost '/': "
            "received 'topic' but current is 'direct'",
            "exchange",
            "outbox",
            "type",
            False,
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'o.unroutable' in "
            "vhost 'v': received none but current is the value 'quorum' of type 'longstr'",
            "queue",
            "o.unroutable",
            "x-queue-type",
            False,
        ),
        ("NOT_FOUND - no exchange 'it's' in vhost '/'", "exchange", "it's", None, False),
        (
            "PRECONDITION_FAILED - message size 200000 is larger than configured max size 1000",
            None,
            None,
            None,
            True,
        ),
        (
            "PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header}",
            None,
            None,
            None,
            False,
        ),
        ("", None, None, None, False),
    ],
)
def test_parse_reply_text(
    text: str, kind: str | None, name: str | None, argument: str | None, too_large: bool
) -> None:
    from cdc_relay.rabbitmq import ReplyText, parse_reply_text

    assert parse_reply_text(text) == ReplyText(kind, name, argument, too_large)


class _FakeChannel:
    def __init__(self, number: int = 1) -> None:
        self.channel_number = number
        self.is_open = False
        self.on_close: list[Any] = []
        self.declared: list[str] = []

    def add_on_close_callback(self, callback: Any) -> None:
        self.on_close.append(callback)

    def queue_declare(self, queue: str, passive: bool, callback: Any) -> None:
        assert passive
        self.declared.append(queue)


class _FakeConnection:
    is_open = True
    frame_max = 4096

    def __init__(self) -> None:
        self.opened: list[tuple[_FakeChannel, Any]] = []

    def channel(self, on_open_callback: Any) -> _FakeChannel:
        ch = _FakeChannel(len(self.opened) + 2)
        self.opened.append((ch, on_open_callback))
        return ch


def _publisher(
    url: Any = "amqp://guest:guest@127.0.0.1:1/%2F", **kwargs: Any
) -> tuple[Any, list[Any]]:
    from cdc_relay.rabbitmq import Publisher

    failures: list[Any] = []
    publisher = Publisher(
        url,
        ["outbox"],
        "topic",
        True,
        30,
        ioloop=None,
        on_ready=lambda: None,
        on_confirm=lambda *_: None,
        on_failure=failures.append,
        on_closed=lambda: None,
        **kwargs,
    )
    return publisher, failures


def _closed_by_broker(code: int, text: str, ready: bool, step: Any = None) -> Any:
    import pika.exceptions

    publisher, failures = _publisher()
    channel = _FakeChannel()
    publisher._channel = channel
    publisher._connection = _FakeConnection()
    publisher.ready = ready
    publisher._step = step
    publisher._last_exchange = "outbox"
    publisher._on_channel_closed(channel, pika.exceptions.ChannelClosedByBroker(code, text))
    assert len(failures) == 1
    return failures[0]


def test_content_refused_by_the_broker_is_not_retried() -> None:
    from cdc_relay.errors import BrokerRefused

    err = _closed_by_broker(
        406, "PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header}", True
    )
    assert isinstance(err, BrokerRefused) and not err.retryable
    assert err.side == "rabbitmq"
    assert "'outbox'" in str(err) and "invalid message" in str(err)


def test_too_large_keeps_its_advice() -> None:
    err = _closed_by_broker(
        406, "PRECONDITION_FAILED - message size 9 is larger than configured max size 1", True
    )
    assert "broker refused a message as too large" in str(err)
    assert "max_message_size" in str(err)


@pytest.mark.parametrize(
    ("ready", "step", "name", "permission"),
    [
        (True, None, "outbox", "write"),
        (
            False,
            ("exchange_declare", {"exchange": "outbox", "durable": True}),
            "outbox",
            "configure",
        ),
        (
            False,
            (
                "exchange_declare",
                {"exchange": "outbox", "arguments": {"alternate-exchange": "o.u"}},
            ),
            "o.u",
            "write",
        ),
        (
            False,
            ("queue_declare", {"queue": "outbox.unroutable"}),
            "outbox.unroutable",
            "configure",
        ),
    ],
)
def test_access_refused_names_the_object_and_the_permission(
    ready: bool, step: Any, name: str, permission: str
) -> None:
    from cdc_relay.errors import BrokerRefused

    kind = "queue" if step and step[0] == "queue_declare" else "exchange"
    text = f"ACCESS_REFUSED - access to {kind} '{name}' in vhost '/' refused for user 'relay'"
    err = _closed_by_broker(403, text, ready, step)
    assert isinstance(err, BrokerRefused) and not err.retryable
    assert f"{kind} {name!r}" in str(err)
    assert f"grant the relay's user {permission} permission" in str(err)


def test_inequivalent_declaration_names_object_and_argument() -> None:
    from cdc_relay.errors import BrokerRefused

    text = (
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'outbox' in vhost '/': "
        "received 'topic' but current is 'direct'"
    )
    err = _closed_by_broker(406, text, False, ("exchange_declare", {"exchange": "outbox"}))
    assert isinstance(err, BrokerRefused)
    assert "exchange 'outbox' already exists with a different 'type'" in str(err)


def test_missing_exchange_while_publishing_stays_retryable() -> None:
    from cdc_relay.errors import BrokerRefused, PublishFailed

    err = _closed_by_broker(404, "NOT_FOUND - no exchange 'outbox' in vhost '/'", True)
    assert isinstance(err, PublishFailed) and err.retryable
    assert not isinstance(err, BrokerRefused)


def test_alternate_exchange_mismatch_reopens_instead_of_failing() -> None:
    import pika.exceptions

    publisher, failures = _publisher()
    channel = _FakeChannel()
    connection = _FakeConnection()
    publisher._channel = channel
    publisher._connection = connection
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'outbox' in "
        "vhost '/': received the value 'outbox.unroutable' of type 'longstr' but current is none"
    )
    publisher._on_channel_closed(channel, pika.exceptions.ChannelClosedByBroker(406, text))
    assert failures == []
    assert len(connection.opened) == 1
    assert publisher._without_alternate == {"outbox"}


@pytest.mark.parametrize(("code", "refused"), [(501, True), (502, True), (505, True), (320, False)])
def test_connection_closes_for_frames_the_broker_cannot_parse(code: int, refused: bool) -> None:
    import pika.exceptions

    from cdc_relay.errors import BrokerRefused, ConnectionLost
    from cdc_relay.rabbitmq import connection_failure

    err = connection_failure(pika.exceptions.ConnectionClosedByBroker(code, "FRAME_ERROR - x"))
    assert err.side == "rabbitmq"
    assert isinstance(err, BrokerRefused if refused else ConnectionLost)
    assert err.retryable is not refused
    # a channel closed because its connection closed means the same
    publisher, failures = _publisher()
    channel = _FakeChannel()
    publisher._channel = channel
    publisher._on_channel_closed(channel, pika.exceptions.ConnectionClosedByBroker(code, "x"))
    assert type(failures[0]) is type(err)


def test_a_lost_connection_seen_first_by_the_channel_moves_the_rotation_on() -> None:
    """pika closes a lost connection's channels before it calls the connection's close
    callback, and the session is closing by then: the channel's callback is where the loss
    must move the rotation, or the next session tries the dead node first."""
    import pika.exceptions

    from cdc_relay.brokers import Brokers

    brokers = Brokers("amqp://127.0.0.1:1/,amqp://127.0.0.1:2/,amqp://127.0.0.1:3/")
    publisher, failures = _publisher(brokers)
    brokers.connected(0)
    channel = _FakeChannel()
    publisher._channel = channel
    publisher.ready = True
    publisher._on_channel_closed(channel, pika.exceptions.StreamLostError("reset by peer"))
    assert failures and failures[0].retryable
    assert brokers.order() == [1, 2, 0]


def test_returns_are_returned_not_string_tagged_nacks() -> None:
    from pika.spec import Basic

    from cdc_relay.errors import Nacked, Returned

    publisher, failures = _publisher()
    method = Basic.Return(312, "NO_ROUTE", "outbox", "order.Placed")
    publisher._on_return(None, method, BasicProperties(message_id="e-1"), b"{}")
    assert isinstance(failures[0], Returned) and isinstance(failures[0], Nacked)
    assert failures[0].retryable and failures[0].side == "rabbitmq"


def test_publish_needs_a_ready_channel_and_frames_the_built_properties() -> None:
    from cdc_relay.errors import PublishFailed
    from cdc_relay.lsn import Lsn
    from cdc_relay.messages import MessageBuilder, TransactionInfo
    from cdc_relay.outbox import OutboxEvent

    publisher, _ = _publisher()
    event = OutboxEvent(
        "e-1", "o", "1", "T", b'{"score": 0.5}', b'{"score": 0.5}', None, None, Lsn(1)
    )
    msg = MessageBuilder("s", "d", "{aggregatetype}.{type}").build(
        event, TransactionInfo(1, Lsn(2), 0)
    )
    with pytest.raises(PublishFailed):
        publisher.publish(msg)

    class Writer(_FakeConnection):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[bytes | memoryview] = []

        def emit_frames(self, parts: list[bytes | memoryview]) -> None:
            self.parts += parts

    writer = Writer()
    publisher._connection = writer
    publisher._channel = _FakeChannel(7)
    publisher.ready = True
    assert publisher.frame_max == 4096
    publisher.publish(msg)
    assert b"".join(writer.parts) == encode_publish(
        7, msg.exchange, msg.routing_key, True, msg.properties, msg.body, 4096
    )


def test_inspector_channel_is_reopened_after_it_closes() -> None:
    publisher, _ = _publisher()
    connection = _FakeConnection()
    publisher._connection = connection
    publisher.ready = True
    counts: list[tuple[str, int]] = []

    def report(queue: str, count: int) -> None:
        counts.append((queue, count))

    publisher.count_unroutable(report)  # none yet: opens one, asks once it is open
    assert len(connection.opened) == 1
    first, on_open = connection.opened[0]
    first.is_open = True
    on_open(first)
    assert first.declared == ["outbox.unroutable"]
    publisher.count_unroutable(report)
    assert first.declared == ["outbox.unroutable"] * 2
    # someone deleted the queue: the passive declare closed the inspector channel
    first.is_open = False
    for callback in first.on_close:
        callback(first, Exception("NOT_FOUND"))
    publisher.count_unroutable(report)
    assert len(connection.opened) == 2, "reopened on the next call"
    second, on_open = connection.opened[1]
    second.is_open = True
    on_open(second)
    assert second.declared == ["outbox.unroutable"]


def test_no_inspector_without_alternate_exchanges() -> None:
    publisher, _ = _publisher(alternate_exchange=False)
    connection = _FakeConnection()
    publisher._connection = connection
    publisher.ready = True
    publisher.count_unroutable(lambda q, n: None)
    assert connection.opened == []


@given(
    aggregate_type=st.text(),
    aggregate_id=st.text(),
    lsn=st.text(max_size=20),
    traceparent=st.none() | st.text(max_size=60),
    message_id=st.text(max_size=300),
    timestamp=st.integers(-1, 1 << 65),
    type_=st.text(max_size=300),
)
@example("o", "\ud800", "0/1", None, "id", 1, "T")  # a lone surrogate
@example("o", "1", "0/1", "tp\udfff", "id", 1, "T")
@example("o", "1", "0/1", None, "i" * 256, 1, "T")  # over a short string
@example("o", "1", "0/1", None, "id", 1 << 64, "T")  # beyond 64 bits
def test_one_join_event_encoder_is_the_general_encoder(
    aggregate_type: str,
    aggregate_id: str,
    lsn: str,
    traceparent: str | None,
    message_id: str,
    timestamp: int,
    type_: str,
) -> None:
    """Same bytes for every input, and the same refusal (field named) for a bad one."""
    headers: dict[str, object] = {
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "source_lsn": lsn,
    }
    if traceparent:
        headers["traceparent"] = traceparent
    args = ("application/json", 2, message_id, timestamp, type_, "cdc-relay")
    try:
        expected: bytes | str = encode_properties(args[0], headers, *args[1:])
    except (EncodeError, UnicodeEncodeError) as exc:
        expected = repr(exc)
    try:
        got: bytes | str = encode_event_properties(
            "application/json", aggregate_type, aggregate_id, lsn, traceparent, *args[1:]
        )
    except (EncodeError, UnicodeEncodeError) as exc:
        got = repr(exc)
    assert got == expected
