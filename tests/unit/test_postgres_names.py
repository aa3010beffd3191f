"""Quoting for the replication grammar and the replication connection string."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.errors import SetupError
from cdc_relay.postgres import (
    APPLICATION_NAME,
    SESSION_OPTIONS,
    quote_ident,
    quote_literal,
    replication_conninfo,
)

# --- quote_ident / quote_literal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("cdc_relay", '"cdc_relay"'),
        ("MixedCase", '"MixedCase"'),
        ('we"ird', '"we""ird"'),
        ('""', '""""""'),
        ("", '""'),
        ("with space", '"with space"'),
        ("it's", '"it\'s"'),
        ("ünïcode", '"ünïcode"'),
    ],
)
def test_quote_ident(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("cdc_relay", "'cdc_relay'"),
        ("it's", "'it''s'"),
        ("''", "''''''"),
        ("", "''"),
        ('"pub"', "'\"pub\"'"),
        ("a\\b", "'a\\b'"),
    ],
)
def test_quote_literal(text: str, quoted: str) -> None:
    assert quote_literal(text) == quoted


def test_quote_literal_of_quoted_ident_nests_both_quotings() -> None:
    # how START_REPLICATION passes publication_names
    assert quote_literal(quote_ident("p'u\"b")) == "'\"p''u\"\"b\"'"


@pytest.mark.parametrize("fn", [quote_ident, quote_literal])
@pytest.mark.parametrize("text", ["\x00", "a\x00b", "abc\x00"])
def test_nul_byte_is_a_setup_error(fn: object, text: str) -> None:
    assert callable(fn)
    with pytest.raises(SetupError, match="NUL"):
        fn(text)


# --- replication_conninfo ------------------------------------------------------------------------


def _parsed(dsn: str) -> dict[str, object]:
    return dict(conninfo_to_dict(replication_conninfo(dsn)))


def test_key_value_dsn_gets_replication_and_session_options() -> None:
    params = _parsed("host=db.example port=5433 dbname=app user=relay password=secret")
    assert params["replication"] == "database"
    assert params["options"] == SESSION_OPTIONS
    assert "-c DateStyle=ISO,YMD" in str(params["options"])
    assert "-c TimeZone=UTC" in str(params["options"])
    assert params["host"] == "db.example"
    assert params["port"] == "5433"
    assert params["dbname"] == "app"
    assert params["user"] == "relay"
    assert params["password"] == "secret"
    assert params["application_name"] == APPLICATION_NAME
    assert params["connect_timeout"] == "10"


def test_url_dsn_gets_replication_and_session_options() -> None:
    params = _parsed("postgresql://relay:s3cr%40t@db.example:5433/app?sslmode=disable")
    assert params["replication"] == "database"
    assert params["options"] == SESSION_OPTIONS
    assert params["host"] == "db.example"
    assert params["port"] == "5433"
    assert params["dbname"] == "app"
    assert params["user"] == "relay"
    assert params["password"] == "s3cr@t"
    assert params["sslmode"] == "disable"


def test_user_options_are_kept_and_ours_come_after_them() -> None:
    options = str(_parsed("host=h dbname=d options='-c statement_timeout=0'")["options"])
    assert options.startswith("-c statement_timeout=0 ")
    assert options.endswith(SESSION_OPTIONS)
    # ours come last so they win over a user-supplied DateStyle/TimeZone
    url_options = str(
        _parsed("postgresql://h/d?options=-c%20TimeZone%3DEurope%2FBerlin")["options"]
    )
    assert url_options.startswith("-c TimeZone=Europe/Berlin ")
    assert url_options.index("TimeZone=Europe/Berlin") < url_options.index("TimeZone=UTC")


def test_user_application_name_and_timeout_are_kept() -> None:
    params = _parsed("host=h application_name=mine connect_timeout=3")
    assert params["application_name"] == "mine"
    assert params["connect_timeout"] == "3"


def test_user_replication_setting_is_overridden() -> None:
    assert _parsed("host=h replication=false")["replication"] == "database"


def test_empty_dsn_still_gets_our_settings() -> None:
    params = _parsed("")
    assert params["replication"] == "database"
    assert params["options"] == SESSION_OPTIONS


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("host=h password=hunter2 bogus_option=1", "hunter2"),
        ("host=h password='hunter2", "hunter2"),
        ("password=hunter2 host", "hunter2"),
        ("postgresql://u:hunter2@[::1/db", "hunter2"),
        ("postgresql://u:hunter2@h/db?bogus_option=1", "hunter2"),
        ("postgresql://u:hunter2@h/db?sslmode", "hunter2"),
        # a raw '%' in a URL password: libpq quotes the whole undecodable token in its error
        ("postgresql://u:50%off@h/db", "50%off"),
    ],
)
def test_invalid_dsn_is_a_setup_error_without_the_password(dsn: str, secret: str) -> None:
    with pytest.raises(SetupError) as info:
        replication_conninfo(dsn)
    text = str(info.value)
    assert "pg_dsn is not a valid connection string" in text
    assert secret not in text
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
