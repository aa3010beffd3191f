"""postgres.py without a server: quoting, connection strings, failure classification, and the
non-blocking START_REPLICATION / final status update against a fake libpq connection."""

from __future__ import annotations

import socket
import time
from typing import Any, cast

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.errors import (
    POSTGRES,
    AuthenticationFailed,
    ConnectionLost,
    SetupError,
    SlotBusy,
)
from cdc_relay.lsn import Lsn
from cdc_relay.postgres import (
    APPLICATION_NAME,
    LIVENESS_DEFAULTS,
    SESSION_OPTIONS,
    ReplicationStream,
    connect_failure,
    encoding_problem,
    holder_pid,
    is_transient_sqlstate,
    quote_ident,
    quote_literal,
    replication_conninfo,
    server_error,
    session_conninfo,
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
    assert "-c bytea_output=hex" in str(params["options"])
    assert params["client_encoding"] == "UTF8"
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


# --- session settings on every connection ---------------------------------------------------------


def test_liveness_defaults_are_added() -> None:
    params = _parsed("host=h")
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "15"
    assert params["keepalives_interval"] == "5"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "30000"
    assert params["connect_timeout"] == "10"
    assert {k: params[k] for k in LIVENESS_DEFAULTS} == LIVENESS_DEFAULTS


def test_user_liveness_settings_win() -> None:
    params = _parsed(
        "postgresql://h/d?keepalives=0&keepalives_idle=60&tcp_user_timeout=0&connect_timeout=2"
    )
    assert params["keepalives"] == "0"
    assert params["keepalives_idle"] == "60"
    assert params["tcp_user_timeout"] == "0"
    assert params["connect_timeout"] == "2"
    assert params["keepalives_count"] == "3"  # the ones not given still get ours


def test_client_encoding_is_forced() -> None:
    # the decoder reads UTF-8: a DSN that asks for another encoding must not get it
    assert _parsed("host=h client_encoding=LATIN1")["client_encoding"] == "UTF8"


def test_catalog_connection_gets_the_same_settings_without_replication() -> None:
    params = dict(conninfo_to_dict(session_conninfo("host=h dbname=app options='-c x=1'")))
    assert "replication" not in params
    assert params["client_encoding"] == "UTF8"
    assert params["options"] == f"-c x=1 {SESSION_OPTIONS}"
    assert params["connect_timeout"] == "10"
    assert params["keepalives_idle"] == "15"
    assert params["application_name"] == APPLICATION_NAME
    named = conninfo_to_dict(session_conninfo("host=h", application_name="cdc-relay-admin"))
    assert named["application_name"] == "cdc-relay-admin"


def test_session_conninfo_refuses_a_bad_dsn_without_the_password() -> None:
    with pytest.raises(SetupError) as info:
        session_conninfo("host=h password='hunter2")
    assert "hunter2" not in str(info.value)


# --- classifying failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("08006", True),
        ("08P01", True),
        ("57P01", True),
        ("57P03", True),
        ("53300", True),
        ("40001", True),
        ("40P01", True),
        ("57014", False),  # query cancelled: not a lost connection
        ("53100", False),  # disk full
        ("42704", False),
        ("55006", False),
        ("", False),
        (None, False),
    ],
)
def test_transient_sqlstates(sqlstate: str | None, transient: bool) -> None:
    assert is_transient_sqlstate(sqlstate) is transient


@pytest.mark.parametrize(
    ("text", "pid"),
    [
        ('replication slot "s" is active for PID 4242', 4242),
        ("le slot de réplication « s » est actif pour le PID 77", 77),
        ("Replikations-Slot »s1« ist aktiv für PID 31", 31),
        ('replication slot "s" is active for pid 5', 5),
        ('replication slot "slot_9" is active', None),
        ("", None),
    ],
)
def test_holder_pid_is_a_hint_from_the_message(text: str, pid: int | None) -> None:
    assert holder_pid(text) == pid


def test_object_in_use_is_slot_busy_whatever_the_language() -> None:
    err = server_error(
        "55006",
        "le slot de réplication « s » est actif pour le PID 77",
        what="START_REPLICATION",
        connection_bad=False,
        slot="s",
    )
    assert isinstance(err, SlotBusy)
    assert err.retryable
    assert err.side == POSTGRES
    assert err.holder_pid == 77
    assert "standby" in str(err)


def test_object_in_use_without_a_pid_is_still_slot_busy() -> None:
    err = server_error("55006", "belegt", what="START_REPLICATION", connection_bad=False)
    assert isinstance(err, SlotBusy)
    assert err.holder_pid is None


@pytest.mark.parametrize("sqlstate", ["08006", "57P01", "57P02", "53300", "40001"])
def test_transient_sqlstate_is_a_lost_connection(sqlstate: str) -> None:
    err = server_error(sqlstate, "bye", what="START_REPLICATION", connection_bad=False, slot="s")
    assert type(err) is ConnectionLost
    assert err.side == POSTGRES
    assert err.retryable
    assert "START_REPLICATION failed: bye" in str(err)


@pytest.mark.parametrize("sqlstate", [None, "42704", "XX000"])
def test_a_broken_connection_is_lost_whatever_the_sqlstate(sqlstate: str | None) -> None:
    err = server_error(
        sqlstate, "server closed the connection", what="IDENTIFY_SYSTEM", connection_bad=True
    )
    assert type(err) is ConnectionLost
    assert err.side == POSTGRES


@pytest.mark.parametrize("sqlstate", ["42704", "42501", "XX000", None])
def test_other_errors_on_a_healthy_connection_are_setup_errors(sqlstate: str | None) -> None:
    err = server_error(
        sqlstate,
        'replication slot "s" does not exist',
        what="START_REPLICATION",
        connection_bad=False,
        slot="s",
    )
    assert type(err) is SetupError
    assert not err.retryable
    assert f"SQLSTATE {sqlstate or 'none'}" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        'FATAL:  password authentication failed for user "relay"',
        'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "relay", database "app"',
        'FATAL:  Ident authentication failed for user "relay"',
        "fe_sendauth: no password supplied",
    ],
)
def test_refused_credentials_are_not_retried(text: str) -> None:
    for replication in (True, False):
        err = connect_failure(text, replication=replication)
        assert isinstance(err, AuthenticationFailed)
        assert not err.retryable
        assert err.side == POSTGRES
        assert "refused the credentials" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "FATAL:  must be superuser or replication role to start walsender",
        "FATAL:  permission denied to start WAL sender",
    ],
)
def test_a_role_without_replication_is_not_retried(text: str) -> None:
    err = connect_failure(text, replication=True, slot="s")
    assert isinstance(err, AuthenticationFailed)
    assert "refused replication" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "connection refused",
        "timeout expired",
        "FATAL:  the database system is starting up",
        "FATAL:  sorry, too many clients already",
        'could not translate host name "db" to address',
    ],
)
def test_other_connect_failures_are_retried(text: str) -> None:
    err = connect_failure(text, replication=True, slot="s")
    assert type(err) is ConnectionLost
    assert err.side == POSTGRES
    assert err.retryable
    assert f"cannot connect to PostgreSQL: {text}" in str(err)


def test_permission_denied_on_an_ordinary_connection_is_retried() -> None:
    err = connect_failure("FATAL:  permission denied for database app", replication=False)
    assert type(err) is ConnectionLost


@pytest.mark.parametrize("server", ["UTF8", "LATIN1", "WIN1252", "EUC_JP", None])
def test_real_encodings_are_converted_by_the_server(server: str | None) -> None:
    assert encoding_problem(server, "UTF8") is None


def test_sql_ascii_is_refused() -> None:
    problem = encoding_problem("SQL_ASCII", "UTF8")
    assert problem is not None
    assert "SQL_ASCII" in problem
    assert "cannot convert to UTF-8" in problem
    assert "ENCODING 'UTF8'" in problem


def test_a_session_that_is_not_utf8_is_refused() -> None:
    problem = encoding_problem("UTF8", "LATIN1")
    assert problem is not None
    assert "client_encoding is LATIN1" in problem


# --- the stream against a fake libpq connection --------------------------------------------------


class FakeResult:
    def __init__(
        self,
        status: pq.ExecStatus,
        sqlstate: str | None = None,
        message: str = "",
        fields: dict[pq.DiagnosticField, str] | None = None,
    ) -> None:
        self.status = status
        self.error_message = message.encode()
        self._fields = dict(fields or {})
        if sqlstate is not None:
            self._fields[pq.DiagnosticField.SQLSTATE] = sqlstate

    def error_field(self, field: pq.DiagnosticField) -> bytes | None:
        value = self._fields.get(field)
        return None if value is None else value.encode()


class FakePGconn:
    """The part of ``pq.PGconn`` the stream uses, scripted by the test."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.status = pq.ConnStatus.OK
        self.nonblocking = 0
        self.sent: list[bytes] = []
        self.copy_data: list[bytes] = []
        self.busy = [True]  # is_busy answers, consumed in order; the last one repeats
        self.results: list[FakeResult | None] = []
        self.flush_answers = [0]
        self.put_answers = [1]
        self.error_message = b""
        self.backend_pid = 4321
        self.finished = False
        self.raise_on: set[str] = set()
        self._sock = sock

    def _maybe_raise(self, what: str) -> None:
        if what in self.raise_on:
            raise psycopg.OperationalError(f"{what} failed: server closed the connection")

    @staticmethod
    def _next(answers: list[Any]) -> Any:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def send_query(self, command: bytes) -> None:
        self._maybe_raise("send_query")
        assert self.nonblocking == 1, "START_REPLICATION must be sent non-blocking"
        self.sent.append(command)

    def flush(self) -> int:
        self._maybe_raise("flush")
        return int(self._next(self.flush_answers))

    def consume_input(self) -> None:
        self._maybe_raise("consume_input")

    def is_busy(self) -> int:
        return int(self._next(self.busy))

    def get_result(self) -> FakeResult | None:
        return self.results.pop(0) if self.results else None

    def put_copy_data(self, data: bytes) -> int:
        self._maybe_raise("put_copy_data")
        rc = int(self._next(self.put_answers))
        if rc == 1:
            self.copy_data.append(bytes(data))
        return rc

    @property
    def socket(self) -> int:
        if self._sock is None:
            raise psycopg.OperationalError("the connection is lost")
        return self._sock.fileno()

    def finish(self) -> None:
        self.finished = True


def _stream(pgconn: FakePGconn) -> ReplicationStream:
    stream = ReplicationStream("host=h", "my_slot")
    stream._pgconn = cast("pq.abc.PGconn", pgconn)
    return stream


def test_start_async_sends_start_replication_non_blocking() -> None:
    pgconn = FakePGconn()
    stream = _stream(pgconn)
    stream.start_async("my_pub", Lsn(0x16_B374D848), messages=True)
    assert pgconn.nonblocking == 1
    assert pgconn.sent == [
        b'START_REPLICATION SLOT "my_slot" LOGICAL 16/B374D848 '
        b"(proto_version '1', publication_names '\"my_pub\"', messages 'true')"
    ]


def test_poll_start_waits_without_blocking_then_reports_copy_both() -> None:
    pgconn = FakePGconn()
    pgconn.busy = [True, True, False]
    pgconn.results = [FakeResult(pq.ExecStatus.COPY_BOTH)]
    stream = _stream(pgconn)
    stream.start_async("p", Lsn(0))
    assert stream.poll_start() is False
    assert stream.poll_start() is False
    assert stream.poll_start() is True
    assert stream.poll_start() is True  # idempotent once streaming


def test_poll_start_waits_while_the_command_is_not_sent() -> None:
    pgconn = FakePGconn()
    pgconn.flush_answers = [1, 1, 0]
    pgconn.busy = [False]
    pgconn.results = [FakeResult(pq.ExecStatus.COPY_BOTH)]
    stream = _stream(pgconn)
    stream.start_async("p", Lsn(0))  # first flush: still pending
    assert stream.flush() is True  # the loop learns it must wait for writable
    assert stream.poll_start() is True


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("55006", SlotBusy),
        ("57P01", ConnectionLost),
        ("08006", ConnectionLost),
        ("53300", ConnectionLost),
        ("42704", SetupError),
    ],
)
def test_poll_start_classifies_a_refusal_by_sqlstate(
    sqlstate: str, expected: type[Exception]
) -> None:
    pgconn = FakePGconn()
    pgconn.busy = [False]
    pgconn.results = [
        FakeResult(pq.ExecStatus.FATAL_ERROR, sqlstate, "ERROR:  whatever the language, pid 9\n")
    ]
    stream = _stream(pgconn)
    stream.start_async("p", Lsn(0))
    with pytest.raises(expected) as info:
        stream.poll_start()
    assert type(info.value) is expected
    assert getattr(info.value, "side", None) == POSTGRES or expected is SetupError
    if expected is SlotBusy:
        assert cast("SlotBusy", info.value).holder_pid == 9


def test_poll_start_on_a_broken_connection_is_a_lost_connection() -> None:
    pgconn = FakePGconn()
    pgconn.busy = [False]
    pgconn.status = pq.ConnStatus.BAD
    pgconn.error_message = b"server closed the connection unexpectedly\n"
    pgconn.results = [None]
    stream = _stream(pgconn)
    stream.start_async("p", Lsn(0))
    with pytest.raises(ConnectionLost) as info:
        stream.poll_start()
    assert type(info.value) is ConnectionLost
    assert "server closed the connection unexpectedly" in str(info.value)


@pytest.mark.parametrize("failing", ["send_query", "consume_input"])
def test_psycopg_errors_while_starting_are_lost_connections(failing: str) -> None:
    pgconn = FakePGconn()
    stream = _stream(pgconn)
    pgconn.raise_on = {failing}
    with pytest.raises(ConnectionLost) as info:
        stream.start_async("p", Lsn(0))
        stream.poll_start()
    assert type(info.value) is ConnectionLost
    assert info.value.side == POSTGRES
    assert info.value.retryable


def test_send_final_sends_and_reports_success() -> None:
    a, b = socket.socketpair()
    try:
        pgconn = FakePGconn(a)
        assert _stream(pgconn).send_final(b"r-final") is True
        assert pgconn.copy_data == [b"r-final"]
    finally:
        a.close()
        b.close()


def test_send_final_gives_up_at_the_deadline_when_the_socket_stays_full() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        with pytest.raises(BlockingIOError):  # fill the socket: it is not writable any more
            while True:
                a.send(b"x" * 65536)
        pgconn = FakePGconn(a)
        pgconn.flush_answers = [1]  # libpq can never get its bytes out
        started = time.monotonic()
        assert _stream(pgconn).send_final(b"r-final", timeout=0.3) is False
        assert 0.25 <= time.monotonic() - started < 1.0
    finally:
        a.close()
        b.close()


def test_send_final_waits_for_room_in_libpqs_buffer() -> None:
    a, b = socket.socketpair()
    try:
        pgconn = FakePGconn(a)
        pgconn.put_answers = [0, 0, 1]
        assert _stream(pgconn).send_final(b"r-final", timeout=1) is True
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("failing", ["put_copy_data", "flush"])
def test_send_final_never_raises_for_a_gone_server(failing: str) -> None:
    pgconn = FakePGconn()  # no socket either
    pgconn.raise_on = {failing}
    assert _stream(pgconn).send_final(b"r-final") is False
    pgconn = FakePGconn()
    pgconn.flush_answers = [1]  # needs to wait, but the socket is gone
    assert _stream(pgconn).send_final(b"r-final") is False


def test_send_final_without_a_connection_is_false() -> None:
    stream = ReplicationStream("host=h", "s")
    assert stream.send_final(b"r") is False
    assert stream.backend_pid is None


def test_backend_pid_survives_close() -> None:
    pgconn = FakePGconn()
    stream = _stream(pgconn)
    stream._backend_pid = pgconn.backend_pid  # as connect() records it
    stream.close()
    assert pgconn.finished
    assert stream.backend_pid == 4321
    with pytest.raises(ConnectionLost) as info:
        _ = stream.pgconn
    assert info.value.side == POSTGRES


def test_a_refusal_is_one_line_with_detail_and_hint_and_no_password() -> None:
    pgconn = FakePGconn()
    pgconn.busy = [False]
    pgconn.results = [
        FakeResult(
            pq.ExecStatus.FATAL_ERROR,
            "42704",
            "ERROR:  multi\nDETAIL:  line\n",
            fields={
                pq.DiagnosticField.MESSAGE_PRIMARY: 'replication slot "s" does not exist',
                pq.DiagnosticField.MESSAGE_DETAIL: "see password=hunter2",
                pq.DiagnosticField.MESSAGE_HINT: "Create it.",
            },
        )
    ]
    stream = _stream(pgconn)
    stream.start_async("p", Lsn(0))
    with pytest.raises(SetupError) as info:
        stream.poll_start()
    text = str(info.value)
    assert "\n" not in text
    assert "hunter2" not in text
    assert 'START_REPLICATION failed: replication slot "s" does not exist see password=***' in text
    assert "Create it." in text


def test_end_of_stream_reason_is_one_line() -> None:
    pgconn = FakePGconn()
    pgconn.results = [
        FakeResult(pq.ExecStatus.FATAL_ERROR, "57P01", "FATAL:  terminating\nDETAIL: x\n")
    ]
    pgconn.get_copy_data = lambda _async: (-1, b"")  # type: ignore[attr-defined]
    with pytest.raises(ConnectionLost) as info:
        _stream(pgconn).read()
    assert str(info.value) == "FATAL:  terminating DETAIL: x (slot=my_slot)"


def test_connect_failure_text_becomes_one_line() -> None:
    err = connect_failure(
        "connection failed: host a failed\n- host b: refused\n", replication=False
    )
    assert str(err) == (
        "cannot connect to PostgreSQL: connection failed: host a failed - host b: refused"
    )
