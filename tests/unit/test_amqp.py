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
