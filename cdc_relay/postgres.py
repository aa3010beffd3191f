"""The replication connection: a thin adapter over ``psycopg.pq`` (libpq).

psycopg's high-level API has no logical-replication support, and the relay needs exact control
of what leaves the process (a flush LSN is a promise that the events before it are safe), so this
speaks the streaming replication protocol over libpq's COPY_BOTH mode directly:
``START_REPLICATION`` via non-blocking ``send_query`` + ``consume_input``/``is_busy`` (the same
split as psycopg's own ``generators``/``waiting``: this module says what to do with the socket,
the caller's event loop does the waiting), then ``get_copy_data(1)`` to read and
``put_copy_data`` + ``flush`` to write. All framing and decoding lives in the sans-I/O modules;
this file only moves bytes and turns libpq failures into typed errors.

Failures are classified by SQLSTATE, never by the English text of a message (servers answer in
their ``lc_messages`` language). Only connection-time failures, for which libpq has no SQLSTATE,
fall back to text, in one place: ``connect_failure``.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_relay import tls
from cdc_relay.config import redact
from cdc_relay.errors import (
    POSTGRES,
    AuthenticationFailed,
    ConnectionLost,
    RelayError,
    SetupError,
    SlotBusy,
)
from cdc_relay.lsn import Lsn

# Session settings the decoder relies on: timestamptz text as ISO 8601 in UTC, bytea as hex
# whatever ``ALTER DATABASE/ROLE ... SET bytea_output`` says (client settings win over those).
SESSION_OPTIONS = (
    "-c DateStyle=ISO,YMD -c TimeZone=UTC -c IntervalStyle=iso_8601 -c bytea_output=hex"
)
# pgoutput converts names and text values to the client encoding, and the decoder reads UTF-8.
# Passed as the conninfo key (a startup parameter applied after ``options``), so it always wins.
CLIENT_ENCODING = "UTF8"
APPLICATION_NAME = "cdc-relay"

# TCP liveness, overridable in pg_dsn. Without these a half-open connection (peer gone, no RST:
# a partition, a crashed VM, a dropped NAT entry) looks healthy until the kernel's retransmission
# gives up after ~15 minutes, and an idle replication connection can be silent for hours.
# Keepalives probe an idle socket after 15 s, every 5 s, and give up after 3 misses (~30 s);
# tcp_user_timeout drops a connection whose sent data stays unacknowledged for 30 s (keepalives
# alone never fire while data is queued). 30 s matches the replication_timeout default and stays
# below PostgreSQL's default wal_sender_timeout (60 s), so both ends agree the peer is gone.
LIVENESS_DEFAULTS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "connect_timeout": "10",
}
TCP_USER_TIMEOUT_LIBPQ = 120000  # libpq learnt tcp_user_timeout in version 12

# SQLSTATEs a retry can fix: connection exceptions, operator intervention (shutdown, terminate),
# transaction rollback (serialization, deadlock) and too many connections
TRANSIENT_SQLSTATES = ("08", "57P", "40", "53300")
OBJECT_IN_USE = "55006"  # "replication slot ... is active for PID ..."
_HOLDER_PID_RE = re.compile(r"\bPID\s*(\d+)", re.IGNORECASE)

# Connection-time failures carry no SQLSTATE in libpq, so these are matched as text (English
# server messages; anything unrecognised stays a retryable ConnectionLost).
_CREDENTIALS_REFUSED = (
    "password authentication failed",
    "authentication failed for user",  # ident, peer, LDAP, RADIUS, cert, ...
    "no pg_hba.conf entry",
    "no password supplied",
)
_REPLICATION_REFUSED = (
    "must be superuser or replication role",  # PostgreSQL 14-15
    "permission denied",  # 16+: "permission denied to start WAL sender"
)


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """The answer to IDENTIFY_SYSTEM."""

    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str


# -- connection strings ------------------------------------------------------------------------
def _parse_dsn(dsn: str) -> dict[str, str | int | None]:
    try:
        return dict(conninfo_to_dict(dsn))
    except psycopg.Error:
        # libpq's parse error may quote a fragment of the password: never echo it
        raise SetupError(
            "pg_dsn is not a valid connection string (check quoting and %-encoding)"
        ) from None


def session_conninfo(
    dsn: str, *, replication: bool = False, application_name: str = APPLICATION_NAME
) -> str:
    """The user's DSN plus the session settings every relay connection needs.

    Forced (the decoder depends on them): ``client_encoding``, the ``options`` in
    ``SESSION_OPTIONS`` (appended, so they win over the user's), ``replication=database`` for
    the replication connection. Defaults the DSN may override: ``application_name`` and the TCP
    liveness settings in ``LIVENESS_DEFAULTS``.
    """
    params = _parse_dsn(dsn)
    options = str(params.get("options") or "")
    params["options"] = f"{options} {SESSION_OPTIONS}".strip()
    params["client_encoding"] = CLIENT_ENCODING
    if replication:
        params["replication"] = "database"
    params.setdefault("application_name", application_name)
    for key, value in LIVENESS_DEFAULTS.items():
        if key == "tcp_user_timeout" and pq.version() < TCP_USER_TIMEOUT_LIBPQ:
            continue
        params.setdefault(key, value)
    return make_conninfo("", **params)


def replication_conninfo(dsn: str) -> str:
    """The user's DSN plus ``replication=database`` and the session settings we need."""
    return session_conninfo(dsn, replication=True)


def quote_ident(name: str) -> str:
    """Quote an identifier for the replication grammar (double quotes, doubled inside)."""
    if "\x00" in name:
        raise SetupError("identifier contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    if "\x00" in text:
        raise SetupError("literal contains a NUL byte")
    return "'" + text.replace("'", "''") + "'"


# -- classifying failures ----------------------------------------------------------------------
def is_transient_sqlstate(sqlstate: str | None) -> bool:
    """True for SQLSTATEs a reconnect can fix (see ``TRANSIENT_SQLSTATES``)."""
    return bool(sqlstate) and str(sqlstate).startswith(TRANSIENT_SQLSTATES)


def holder_pid(text: str) -> int | None:
    """The walsender pid in a "slot is active for PID n" message; a hint only (may be None)."""
    m = _HOLDER_PID_RE.search(text)
    return int(m.group(1)) if m else None


def server_error(
    sqlstate: str | None, text: str, *, what: str, connection_bad: bool, slot: str | None = None
) -> RelayError:
    """The typed error for a failed command, decided by SQLSTATE and the connection's state.

    55006 (object in use): the slot streams to another connection → ``SlotBusy``. A broken
    connection or a transient SQLSTATE → ``ConnectionLost``. Anything else (42704: no such
    slot, 42501: no privilege, a client-side error on a healthy connection) → ``SetupError``:
    the same command would fail the same way again.
    """
    if sqlstate == OBJECT_IN_USE:
        pid = holder_pid(text)
        return SlotBusy(
            f"slot {slot} is in use by another connection ({text}); waiting as a standby",
            holder_pid=pid,
            slot=slot,
        )
    if connection_bad or is_transient_sqlstate(sqlstate):
        return ConnectionLost(f"{what} failed: {text}", side=POSTGRES, slot=slot)
    return SetupError(f"{what} failed: {text} [SQLSTATE {sqlstate or 'none'}]", slot=slot)


_NO_DATABASE = re.compile(r'database ".*" does not exist')


def connect_failure(text: str, *, replication: bool, slot: str | None = None) -> RelayError:
    """The typed error for a connection attempt that failed (``text`` is already redacted).

    libpq reports no SQLSTATE for these, so this is the one place that reads message text:
    rejected credentials, and a role without REPLICATION on a ``replication`` connection, are
    not worth retrying; everything else (refused, timed out, starting up, too many clients) is.
    """
    text = one_line(text)
    tls_failed = tls.failure(text, POSTGRES)
    if tls_failed is not None:
        return tls_failed
    if _NO_DATABASE.search(text):
        return SetupError(
            f"cannot connect to PostgreSQL: {text}: check the database name in pg_dsn",
            slot=slot,
        )
    if any(s in text for s in _CREDENTIALS_REFUSED):
        return AuthenticationFailed(f"PostgreSQL refused the credentials: {text}", side=POSTGRES)
    if replication and any(s in text for s in _REPLICATION_REFUSED):
        return AuthenticationFailed(f"PostgreSQL refused replication: {text}", side=POSTGRES)
    return ConnectionLost(f"cannot connect to PostgreSQL: {text}", side=POSTGRES, slot=slot)


def encoding_problem(server_encoding: str | None, client_encoding: str | None) -> str | None:
    """Why a session cannot carry UTF-8 text, or None if it can.

    Any real server encoding (LATIN1, WIN1252, ...) is converted to the client encoding by the
    server; SQL_ASCII is not an encoding but "bytes as stored", which the server never converts,
    so events could carry bytes that are not UTF-8.
    """
    if (server_encoding or "").upper() == "SQL_ASCII":
        return (
            "the database's encoding is SQL_ASCII, which PostgreSQL cannot convert to UTF-8 "
            "(it stores bytes without an encoding), so events could carry invalid text: move the "
            "outbox to a database created WITH ENCODING 'UTF8' (any real encoding works)"
        )
    if client_encoding is not None and client_encoding.upper() not in ("UTF8", "UNICODE"):
        return (
            f"the session's client_encoding is {client_encoding}, not UTF8 (a connection pooler "
            "or server setting overrides it): connect the relay to PostgreSQL directly"
        )
    return None


def one_line(text: str) -> str:
    """libpq's messages span lines (DETAIL, HINT, one line per host tried); logs want one."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_TEXT_FIELDS = (
    pq.DiagnosticField.MESSAGE_PRIMARY,
    pq.DiagnosticField.MESSAGE_DETAIL,
    pq.DiagnosticField.MESSAGE_HINT,
)


def _result_text(res: pq.abc.PGresult | None, pgconn: pq.abc.PGconn) -> str:
    """A failed result's message (with detail and hint) on one line, passwords redacted."""
    parts = [res.error_field(f) for f in _TEXT_FIELDS] if res is not None else []
    if parts and parts[0]:
        text = " ".join(p.decode(errors="replace").strip() for p in parts if p)
    else:
        raw = (res.error_message if res is not None else b"") or pgconn.error_message
        text = one_line(raw.decode(errors="replace"))
    return redact(text)


def _sqlstate(res: pq.abc.PGresult | None) -> str | None:
    if res is None:
        return None
    raw = res.error_field(pq.DiagnosticField.SQLSTATE)
    return raw.decode(errors="replace") if raw else None


def _error_text(pgconn: pq.abc.PGconn) -> str:
    return redact(pgconn.error_message.decode(errors="replace").strip())


# -- the stream --------------------------------------------------------------------------------
class ReplicationStream:
    """One logical replication connection streaming pgoutput from one slot."""

    def __init__(self, dsn: str, slot: str) -> None:
        self._conninfo = replication_conninfo(dsn)
        self._slot = slot
        self._pgconn: pq.abc.PGconn | None = None
        self._backend_pid: int | None = None
        self._started = False

    @property
    def pgconn(self) -> pq.abc.PGconn:
        if self._pgconn is None:
            raise ConnectionLost(
                "replication connection is not open", side=POSTGRES, slot=self._slot
            )
        return self._pgconn

    @property
    def backend_pid(self) -> int | None:
        """The walsender's pid of the latest connection (None before the first).

        Stays readable after ``close()``: the server may still show that walsender holding the
        slot for a moment, and the next session must recognise it as its own, not a rival's.
        """
        return self._backend_pid

    def connect(self) -> SystemInfo:
        """Blocking connect and IDENTIFY_SYSTEM (bounded by connect_timeout and TCP timeouts)."""
        self._started = False
        pgconn = pq.PGconn.connect(self._conninfo.encode())
        if pgconn.status != pq.ConnStatus.OK:
            text = _error_text(pgconn)
            pgconn.finish()
            raise connect_failure(text, replication=True, slot=self._slot)
        self._pgconn = pgconn
        self._backend_pid = pgconn.backend_pid
        problem = encoding_problem(
            _parameter(pgconn, b"server_encoding"), _parameter(pgconn, b"client_encoding")
        )
        if problem is not None:
            self.close()
            raise SetupError(problem, slot=self._slot)
        res = self._exec("IDENTIFY_SYSTEM", pq.ExecStatus.TUPLES_OK)
        return SystemInfo(
            system_id=_get(res, 0),
            timeline=int(_get(res, 1)),
            xlogpos=Lsn.parse(_get(res, 2)),
            dbname=_get(res, 3),
        )

    def create_exported_slot(self) -> tuple[Lsn, str]:
        """Create the slot with an exported snapshot: (consistent point, snapshot name).

        Rows visible in that snapshot are exactly those committed before the slot's first
        change, so reading them there and then streaming the slot sees every row once. The
        snapshot can be imported (``SET TRANSACTION SNAPSHOT``) until this connection runs
        another command or closes. From PostgreSQL 17 on the slot is a failover slot.
        """
        version = self.pgconn.server_version
        name = quote_ident(self._slot)
        if version >= 150000:
            options = ["SNAPSHOT 'export'"]
            if version >= 170000:
                options.append("FAILOVER true")
            command = f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput ({', '.join(options)})"
        else:
            command = f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput EXPORT_SNAPSHOT"
        res = self._exec(command, pq.ExecStatus.TUPLES_OK)
        return Lsn.parse(_get(res, 1)), _get(res, 2)

    def _exec(self, command: str, expected: pq.ExecStatus) -> pq.abc.PGresult:
        """Run one replication command (blocking; only used before streaming starts)."""
        what = command.split(maxsplit=1)[0]
        with self._io(f"running {what}") as pgconn:
            res = pgconn.exec_(command.encode())
        if res.status != expected:
            raise self._failed(res, what)
        return res

    def _failed(self, res: pq.abc.PGresult | None, what: str) -> RelayError:
        pgconn = self.pgconn
        return server_error(
            _sqlstate(res),
            _result_text(res, pgconn),
            what=what,
            connection_bad=pgconn.status == pq.ConnStatus.BAD,
            slot=self._slot,
        )

    def start_async(self, publication: str, start: Lsn, messages: bool = False) -> None:
        """Send START_REPLICATION without waiting for the answer (see ``poll_start``).

        The socket is non-blocking from here on. The command is tiny and goes out at once in
        practice; if ``flush()`` still reports bytes pending, wait for the socket to be
        writable and flush again.
        """
        options = [
            "proto_version '1'",
            f"publication_names {quote_literal(quote_ident(publication))}",
        ]
        if messages:
            options.append("messages 'true'")
        command = (
            f"START_REPLICATION SLOT {quote_ident(self._slot)} LOGICAL {start} "
            f"({', '.join(options)})"
        )
        self._started = False
        with self._io("starting replication") as pgconn:
            pgconn.nonblocking = 1
            pgconn.send_query(command.encode())
        self.flush()

    def poll_start(self) -> bool:
        """Advance START_REPLICATION; never blocks. True once the stream is in COPY_BOTH.

        Call it whenever the socket is readable after ``start_async``. False means the answer
        has not fully arrived yet. A refusal raises ``SlotBusy``, ``ConnectionLost`` or
        ``SetupError`` (see ``server_error``).
        """
        if self._started:
            return True
        with self._io("starting replication") as pgconn:
            if pgconn.flush() == 1:
                return False
            pgconn.consume_input()
            if pgconn.is_busy():
                return False
            res = pgconn.get_result()
        if res is not None and res.status == pq.ExecStatus.COPY_BOTH:
            self._started = True
            return True
        raise self._failed(res, "START_REPLICATION")

    def fileno(self) -> int:
        with self._io("looking up the socket") as pgconn:
            return pgconn.socket

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[pq.abc.PGconn]:
        """Every libpq failure on the wire is a lost connection (psycopg raises some)."""
        pgconn = self.pgconn
        try:
            yield pgconn
        except psycopg.Error as exc:
            raise ConnectionLost(
                f"replication connection lost while {what}: {redact(str(exc)).strip()}",
                side=POSTGRES,
                slot=self._slot,
            ) from None

    def consume(self) -> None:
        """Pull whatever the socket has into libpq's buffer (never blocks)."""
        with self._io("reading") as pgconn:
            pgconn.consume_input()

    def read(self) -> memoryview | None:
        """The next complete CopyData message already buffered, or None if none is.

        Called once per WAL message, so it catches psycopg's errors itself rather than through
        ``_io`` (a generator context manager costs about a microsecond per call).
        """
        pgconn = self.pgconn
        try:
            n, data = pgconn.get_copy_data(1)
        except psycopg.Error as exc:
            raise ConnectionLost(
                f"replication connection lost while reading: {redact(str(exc)).strip()}",
                side=POSTGRES,
                slot=self._slot,
            ) from None
        if n > 0:
            return data
        if n == 0:
            return None
        with self._io("reading") as pgconn:
            # -1: the server ended the COPY: fetch the final result for its reason
            # (psycopg raises for -2 itself)
            res = pgconn.get_result()
            reason = (
                _result_text(res, pgconn) if res is not None else ""
            ) or "server ended the replication stream"
            raise ConnectionLost(reason, side=POSTGRES, slot=self._slot)

    def send(self, data: bytes) -> bool:
        """Queue one CopyData message and try to flush; True if bytes are still pending."""
        with self._io("sending") as pgconn:
            if pgconn.put_copy_data(data) != 1:
                raise ConnectionLost(
                    f"cannot send to the replication connection: {_error_text(pgconn)}",
                    side=POSTGRES,
                    slot=self._slot,
                )
        return self.flush()

    def send_final(self, data: bytes, timeout: float = 2.0) -> bool:
        """Send one last message before closing; True if it left with the connection still up.

        Never blocks past ``timeout`` seconds and never raises: a partitioned server (socket
        open, nothing acknowledged) must not hold up a shutdown, and a server that is gone
        simply leaves the slot a little behind, which a restart replays safely. False means
        it gave up or the server is gone.
        """
        deadline = time.monotonic() + timeout
        pgconn = self._pgconn
        if pgconn is None:
            return False
        try:
            pgconn.nonblocking = 1
            while pgconn.put_copy_data(data) != 1:  # 0: libpq's buffer is full for now
                if not _wait_writable(pgconn, deadline):
                    return False
            while pgconn.flush() == 1:
                if not _wait_writable(pgconn, deadline):
                    return False
            # libpq hides a failed write until it reads the connection's end, so read: the
            # first read takes what the server sent (its goodbye, say), a second one then
            # meets EOF if the server is gone (and returns at once if it is not)
            pgconn.consume_input()
            pgconn.consume_input()
        except (psycopg.Error, OSError, ValueError):
            return False
        return pgconn.status == pq.ConnStatus.OK

    def flush(self) -> bool:
        """Push queued bytes; True while some remain (wait for the socket to be writable)."""
        with self._io("flushing") as pgconn:
            return pgconn.flush() == 1  # psycopg raises for -1

    def close(self) -> None:
        self._started = False
        if self._pgconn is not None:
            pgconn, self._pgconn = self._pgconn, None
            pgconn.finish()


def _wait_writable(pgconn: pq.abc.PGconn, deadline: float) -> bool:
    """Wait until the socket takes more bytes; False once the deadline has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    with selectors.DefaultSelector() as sel:
        sel.register(pgconn.socket, selectors.EVENT_WRITE)
        sel.select(remaining)
    return True


def _parameter(pgconn: pq.abc.PGconn, name: bytes) -> str | None:
    value = pgconn.parameter_status(name)
    return None if value is None else value.decode(errors="replace")


def _get(res: pq.abc.PGresult, col: int) -> str:
    value = res.get_value(0, col)
    return "" if value is None else value.decode()
