"""The fast AMQP property encoder must produce exactly what pika produces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika.spec import BasicProperties

from cdc_relay.amqp import encode_properties, string_headers


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
    with pytest.raises(ValueError, match="255"):
        encode_properties("application/json", {}, 2, "x" * 256, 0, "T", "cdc-relay")


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
    from cdc_relay.amqp import encode_publish

    props = encode_properties("application/json", {"a": "b"}, 2, "id-1", 7, "T", "cdc-relay")
    ours = encode_publish(channel, exchange, routing_key, True, props, body, frame_max)
    assert ours == _pika_publish(channel, exchange, routing_key, body, frame_max)
