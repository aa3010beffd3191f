"""Hostile rows through the real mapper, the real builder and the real ``Publisher`` on a real
pika IOLoop, into a real RabbitMQ: whatever the builder lets through, the broker confirms and
delivers exactly as built; whatever it refuses is ``InvalidEvent`` before anything was sent,
and its dead letter is a message the broker takes too.

No PostgreSQL here: rows are fed to the mapper as pgoutput would deliver them, so hypothesis
can try many per second. The consumer reads the raw properties (pika's own decoder turns a
double into an int) and decodes them with the suite's reference decoder.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from pika.adapters.select_connection import IOLoop
from pika.spec import BasicProperties

from cdc_relay.errors import InvalidEvent, RelayError
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder, OutgoingMessage, TransactionInfo
from cdc_relay.outbox import OutboxMapper
from cdc_relay.pgoutput import Column, Insert, Relation
from cdc_relay.rabbitmq import Publisher
from tests.sandbox import RabbitSandbox
from tests.unit.test_hostile_headers import (
    RawNumber,
    decode_properties,
    json_values,
    keys,
    to_json,
    wire,
)

pytestmark = pytest.mark.integration

TEXT, UUID, TIMESTAMPTZ = 25, 2950, 1184
COLUMNS = (
    ("id", TEXT),
    ("aggregatetype", TEXT),
    ("aggregateid", TEXT),
    ("type", TEXT),
    ("payload", TEXT),  # text, so the mapper checks the JSON
    ("headers", TEXT),
    ("traceparent", TEXT),
    ("created_at", TIMESTAMPTZ),
)
TX = TransactionInfo(xid=42, commit_lsn=Lsn(0x5000), commit_time=849_000_000_000_000)


@dataclass
class Rig:
    """A ``Publisher`` in confirm mode on its own IOLoop, run until what a test waits for."""

    url: str
    exchange: str
    ioloop: IOLoop = field(default_factory=IOLoop)
    ready: bool = False
    acked_through: int = 0
    nacked: list[int] = field(default_factory=list)
    failures: list[RelayError] = field(default_factory=list)
    tag: int = 0
    publisher: Publisher | None = None

    def start(self) -> Publisher:
        self.publisher = Publisher(
            self.url,
            [self.exchange],
            "topic",
            True,
            30,
            self.ioloop,
            on_ready=self._on_ready,
            on_confirm=self._on_confirm,
            on_failure=self.failures.append,
            on_closed=lambda: None,
        )
        self.publisher.connect()
        self.run_until(lambda: self.ready)
        assert self.ready, f"broker not ready: {self.failures}"
        return self.publisher

    def _on_ready(self) -> None:
        self.ready = True

    def _on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        if ack:
            self.acked_through = max(self.acked_through, tag)
        else:
            self.nacked.append(tag)

    def run_until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout

        def check() -> None:
            if done() or self.failures or time.monotonic() > deadline:
                self.ioloop.stop()
            else:
                self.ioloop.call_later(0.002, check)

        self.ioloop.call_later(0, check)
        self.ioloop.start()

    def publish(self, msg: OutgoingMessage) -> None:
        """Publish one message and wait for its confirm: it must be an ack, nothing closed."""
        assert self.publisher is not None
        self.publisher.publish(msg)
        self.tag += 1
        tag = self.tag
        self.run_until(lambda: self.acked_through >= tag or bool(self.nacked))
        assert not self.failures, f"the broker refused or closed: {self.failures}"
        assert not self.nacked, "the broker nacked"
        assert self.acked_through >= tag, "no confirm"

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.run_until(lambda: self.publisher is None or self.publisher.closed, 10)
        self.ioloop.close()


@dataclass
class Got:
    routing_key: str
    properties: dict[str, Any]
    body: bytes


class Consumer:
    """Reads what the broker delivers, keeping each message's raw encoded properties."""

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def get(self, timeout: float = 10) -> Got:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is not None:
                return Got(method.routing_key, decode_properties(props.raw_encoded), body)
            time.sleep(0.01)
        raise AssertionError("nothing delivered")

    def empty(self) -> bool:
        method, _, _ = self.channel.basic_get(self.queue, auto_ack=True)
        return method is None


@dataclass
class Broker:
    rig: Rig
    consumer: Consumer
    builder: MessageBuilder
    mapper: OutboxMapper
    oid: int = 16400

    def row(self, **values: bytes | None) -> Insert:
        return Insert(relation_oid=self.oid, new=tuple(values.get(n) for n, _ in COLUMNS))

    def roundtrip(self, msg: OutgoingMessage) -> Got:
        """Publish, await the ack, consume: what arrives is exactly what was built."""
        self.rig.publish(msg)
        got = self.consumer.get()
        assert got.routing_key == msg.routing_key
        assert got.body == msg.body
        assert got.properties == decode_properties(msg.properties)
        assert got.properties["message_id"] == msg.message_id
        assert got.properties["headers"] == wire(msg.headers)
        return got

    def event_or_refusal(self, insert: Insert) -> OutgoingMessage | InvalidEvent:
        """The mapper and builder as the pipeline calls them (frame_max from the broker)."""
        try:
            event = self.mapper.event(insert, Lsn(0x4000))
            assert event is not None
            return self.builder.build(event, TX)
        except InvalidEvent as err:
            return err


@pytest.fixture(scope="module")
def broker(rabbit: RabbitSandbox) -> Iterator[Broker]:
    name = f"hostile.{uuid.uuid4().hex[:8]}"
    original_decode = BasicProperties.decode

    def keep_raw(self: Any, encoded: bytes, offset: int = 0) -> Any:
        self.raw_encoded = bytes(encoded[offset:])
        return original_decode(self, encoded, offset)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BasicProperties, "decode", keep_raw)
        rig = Rig(rabbit.amqp_url, name)
        publisher = rig.start()
        consumer = Consumer(rabbit.amqp_url, name)
        consumer.channel.queue_declare(name, durable=True)
        consumer.channel.queue_bind(name, name, "#")
        builder = MessageBuilder("slot", "db", "{aggregatetype}.{type}", name)
        builder.frame_max = publisher.frame_max  # as the driver does when the broker is ready
        assert builder.frame_max == 131072
        mapper = OutboxMapper([("public", "outbox")])
        mapper.relation(
            Relation(
                oid=16400,
                namespace="public",
                name="outbox",
                replica_identity=ord("d"),
                columns=tuple(Column(0, n, t, -1) for n, t in COLUMNS),
            )
        )
        try:
            yield Broker(rig, consumer, builder, mapper)
        finally:
            for queue in (name, f"{name}.unroutable"):
                consumer.channel.queue_delete(queue)
            for exchange in (name, f"{name}.unroutable"):
                consumer.channel.exchange_delete(exchange)
            consumer.connection.close()
            rig.close()


def _row_values(
    event_id: bytes | None,
    aggregate_type: bytes,
    aggregate_id: bytes,
    type_: bytes,
    payload: bytes | None,
    headers: bytes | None,
    traceparent: bytes | None,
) -> dict[str, bytes | None]:
    return {
        "id": event_id,
        "aggregatetype": aggregate_type,
        "aggregateid": aggregate_id,
        "type": type_,
        "payload": payload,
        "headers": headers,
        "traceparent": traceparent,
        "created_at": b"2026-11-27 10:11:12.123456+00",
    }


def _text(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return strategy.map(str.encode)


short = _text(st.text(max_size=30))
odd_bytes = st.binary(max_size=40)  # mostly not UTF-8
ids = st.integers(0, 9).flatmap(
    lambda n: (
        st.just(None)
        if n == 0
        else odd_bytes
        if n == 1
        else _text(st.text(alphabet="é東a", min_size=100, max_size=300))
        if n == 2
        else _text(st.uuids().map(str))
    )
)
json_text = json_values.map(lambda v: to_json(v).encode())
object_text = st.dictionaries(keys, json_values, max_size=6).map(lambda v: to_json(v).encode())
payloads = st.integers(0, 9).flatmap(
    lambda n: st.none() if n == 0 else odd_bytes if n == 1 else json_text
)
headers = st.integers(0, 9).flatmap(
    lambda n: st.none() if n == 0 else json_text if n == 1 else object_text
)
aggregate_ids = st.integers(0, 9).flatmap(
    lambda n: _text(st.text(min_size=1000, max_size=3000)) if n == 0 else short
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    event_id=ids,
    aggregate_type=short,
    aggregate_id=aggregate_ids,
    type_=short,
    payload=payloads,
    row_headers=headers,
    traceparent=st.none() | short,
)
@example(
    event_id=b"e-cc", aggregate_type=b"o", aggregate_id=b"1", type_=b"T", payload=b"{}",
    row_headers=b'{"CC": "audit"}', traceparent=None,
)  # fmt: skip
@example(
    event_id=b"e-float", aggregate_type=b"o", aggregate_id=b"1", type_=b"T", payload=b"{}",
    row_headers=b'{"score": 0.5, "huge": 1e400, "big": 1180591620717411303424}',
    traceparent=None,
)  # fmt: skip
def test_hostile_rows_are_delivered_exactly_or_refused_before_sending(
    broker: Broker,
    event_id: bytes | None,
    aggregate_type: bytes,
    aggregate_id: bytes,
    type_: bytes,
    payload: bytes | None,
    row_headers: bytes | None,
    traceparent: bytes | None,
) -> None:
    values = _row_values(
        event_id, aggregate_type, aggregate_id, type_, payload, row_headers, traceparent
    )
    before = broker.rig.tag
    out = broker.event_or_refusal(broker.row(**values))
    if isinstance(out, InvalidEvent):
        label(f"refused: {out.column}")
        assert broker.rig.tag == before, "nothing was sent for a refused row"
        assert broker.consumer.empty()
        # its dead letter carries the raw row, and the broker takes it too
        dead = broker.builder.dead_letter(out, TX, broker.rig.exchange)
        got = broker.roundtrip(dead)
        body = json.loads(got.body)
        assert body["kind"] == "invalid_event"
        for name, raw in values.items():  # every value the row had, byte for byte
            if raw is None:
                assert body["row"].get(name) is None
            elif name in body["row"]:
                assert body["row"][name].encode() == raw
            else:
                assert base64.b64decode(body["row_base64"][name]) == raw
        return
    label("delivered")
    got = broker.roundtrip(out)
    assert got.properties["headers"]["aggregate_id"] == aggregate_id.decode()
    # the payload travels verbatim, numbers of any length included: read them as text
    assert json.loads(got.body, parse_int=str)["id"] == out.message_id


# --- the cases from the review, one by one -------------------------------------------------------

ROW = _row_values(b"e-1", b"order", b"42", b"OrderPlaced", b'{"n": 1}', None, None)


def _refused(broker: Broker, **changes: bytes | None) -> InvalidEvent:
    out = broker.event_or_refusal(broker.row(**{**ROW, **changes}))
    assert isinstance(out, InvalidEvent), "should have been refused before sending"
    return out


def _delivered(broker: Broker, **changes: bytes | None) -> Got:
    out = broker.event_or_refusal(broker.row(**{**ROW, **changes}))
    assert isinstance(out, OutgoingMessage), out
    return broker.roundtrip(out)


def test_cc_header_is_refused_before_the_broker_sees_it(broker: Broker) -> None:
    err = _refused(broker, headers=b'{"CC": "audit"}')
    assert err.column == "headers" and "reserved" in err.problem


def test_float_header_is_delivered_as_a_double(broker: Broker) -> None:
    got = _delivered(broker, headers=b'{"score": 0.5}')
    assert got.properties["headers"]["score"] == 0.5


def test_integer_beyond_64_bits_is_delivered_as_its_digits(broker: Broker) -> None:
    got = _delivered(broker, headers=json.dumps({"big": 2**70}).encode())
    assert got.properties["headers"]["big"] == str(2**70)


def test_200_kb_headers_are_refused_for_the_frame(broker: Broker) -> None:
    err = _refused(broker, headers=json.dumps({"blob": "x" * 200_000}).encode())
    assert err.column == "headers" and "frame_max 131072" in err.problem


def test_200_kb_aggregate_id_is_refused_for_the_frame(broker: Broker) -> None:
    err = _refused(broker, aggregateid=b"A" * 200_000)
    assert err.column == "aggregateid" and "frame_max" in err.problem


def test_300_byte_id_is_refused(broker: Broker) -> None:
    err = _refused(broker, id=b"i" * 300)
    assert err.column == "id" and "255" in err.problem
    dead = broker.builder.dead_letter(err, TX, broker.rig.exchange)
    got = broker.roundtrip(dead)
    assert got.properties["message_id"].startswith("invalid:")


def test_a_content_header_of_exactly_frame_max_is_accepted(broker: Broker) -> None:
    """The builder's frame arithmetic is the broker's: the largest header that fits, goes."""
    small = broker.event_or_refusal(broker.row(**{**ROW, "aggregateid": b""}))
    assert isinstance(small, OutgoingMessage)
    room = broker.builder.frame_max - 20 - len(small.properties)
    got = _delivered(broker, aggregateid=b"a" * room)
    assert len(got.properties["headers"]["aggregate_id"]) == room
    _refused(broker, aggregateid=b"a" * (room + 1))


def test_oversize_stub_of_a_frame_filling_event_is_accepted(broker: Broker) -> None:
    small = broker.event_or_refusal(broker.row(**{**ROW, "aggregateid": b""}))
    assert isinstance(small, OutgoingMessage)
    room = broker.builder.frame_max - 20 - len(small.properties)
    event = broker.mapper.event(broker.row(**{**ROW, "aggregateid": b"a" * room}), Lsn(0x4000))
    assert event is not None
    out = broker.builder.build(event, TX)
    stub = broker.builder.oversize(event, TX, out, broker.rig.exchange, "too large for a test")
    got = broker.roundtrip(stub)
    assert got.properties["headers"]["x-cdc-relay-payload"] == "omitted"


def test_numbers_jsonb_accepts_travel_in_headers(broker: Broker) -> None:
    tree = {"n": RawNumber("1e400"), "m": RawNumber("1" + "0" * 5000), "f": 2.5}
    got = _delivered(broker, headers=to_json(tree).encode())
    assert got.properties["headers"]["n"] == "1e400"
    assert got.properties["headers"]["m"] == "1" + "0" * 5000
    assert got.properties["headers"]["f"] == 2.5
