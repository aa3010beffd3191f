"""Lsn: parse and print like PostgreSQL, order like the 64-bit integer it is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay.errors import ConfigError
from cdc_relay.lsn import ZERO, Lsn

MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("0/0", 0),
        ("FFFFFFFF/FFFFFFFF", MAX),
        ("0/1", 1),
        ("1/0", 1 << 32),
    ],
)
def test_parse_and_format_round_trip(text: str, value: int) -> None:
    lsn = Lsn.parse(text)
    assert lsn == value
    assert isinstance(lsn, Lsn)
    assert str(lsn) == text
    assert Lsn.parse(str(lsn)) == lsn


def test_parse_accepts_lowercase_and_leading_zeros_and_prints_canonically() -> None:
    lsn = Lsn.parse("00000016/b374d848")
    assert lsn == Lsn.parse("16/B374D848")
    assert str(lsn) == "16/B374D848"


def test_parse_ignores_surrounding_whitespace() -> None:
    assert Lsn.parse("  16/B374D848\n") == Lsn.parse("16/B374D848")


def test_repr_shows_the_postgres_form() -> None:
    assert repr(Lsn.parse("16/B374D848")) == "Lsn('16/B374D848')"


def test_zero_constant() -> None:
    assert ZERO == 0
    assert str(ZERO) == "0/0"
    assert Lsn() == ZERO


def test_ordering_follows_the_integer_not_the_text() -> None:
    # textually "9/0" > "10/0", but the WAL position of 10/0 is later
    a = Lsn.parse("9/0")
    b = Lsn.parse("10/0")
    c = Lsn.parse("10/1")
    assert a < b < c
    assert max(c, a, b) == c
    assert sorted([c, b, a]) == [a, b, c]
    assert Lsn.parse("0/FFFFFFFF") < Lsn.parse("1/0")
    assert Lsn.parse("1/0") == Lsn(1 << 32)
    assert hash(Lsn.parse("1/0")) == hash(1 << 32)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "16",
        "16/",
        "/B374D848",
        "16B374D848",
        "16/B374D848/0",
        "G/0",
        "0/XYZ",
        "123456789/0",  # more than 8 hex digits per half
        "0/123456789",
        "-1/0",
        "0x16/B374D848",
        "16 /B374D848",
        "16/B374 D848",
        "16:B374D848",
    ],
)
def test_invalid_strings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Lsn.parse(text)
    assert info.value.key == "lsn"
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [-1, 1 << 64, -(1 << 64), (1 << 70)])
def test_out_of_range_values_are_value_errors(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Lsn(value)


def test_boundaries_are_in_range() -> None:
    assert Lsn(0) == 0
    assert Lsn(MAX) == MAX
    assert str(Lsn(MAX)) == "FFFFFFFF/FFFFFFFF"


@given(st.integers(min_value=0, max_value=MAX))
def test_round_trip_for_every_64_bit_value(value: int) -> None:
    lsn = Lsn(value)
    text = str(lsn)
    high, low = text.split("/")
    assert int(high, 16) == value >> 32
    assert int(low, 16) == value & 0xFFFFFFFF
    assert text == text.upper()
    parsed = Lsn.parse(text)
    assert parsed == value
    assert type(parsed) is Lsn


@given(st.integers(min_value=0, max_value=MAX), st.integers(min_value=0, max_value=MAX))
def test_ordering_matches_integers(a: int, b: int) -> None:
    la, lb = Lsn.parse(str(Lsn(a))), Lsn.parse(str(Lsn(b)))
    assert (la < lb) == (a < b)
    assert (la == lb) == (a == b)
