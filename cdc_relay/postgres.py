"""The replication connection: a thin adapter over ``psycopg.pq`` (libpq).

psycopg's high-level API has no logical-replication support, and the relay needs exact control
of what leaves the process (a flush LSN is a promise that the events before it are safe), so this
speaks the streaming replication protocol over libpq's COPY_BOTH mode directly:
``START_REPLICATION`` via ``send_query``, then non-blocking ``consume_input`` +
``get_copy_data(1)`` to read and ``put_copy_data`` + ``flush`` to write. All framing and decoding
lives in the sans-I/O modules; this file only moves bytes and turns libpq failures into
``ConnectionLost`` / ``AuthenticationFailed`` / ``SetupError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_relay.config import redact
from cdc_relay.errors import AuthenticationFailed, ConnectionLost, SetupError, SlotBusy
from cdc_relay.lsn import Lsn

# Session settings the decoder relies on: timestamptz text as ISO 8601 in UTC.
SESSION_OPTIONS = "-c DateStyle=ISO,YMD -c TimeZone=UTC -c IntervalStyle=iso_8601"
APPLICATION_NAME = "cdc-relay"


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """The answer to IDENTIFY_SYSTEM."""

    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str


def replication_conninfo(dsn: str) -> str:
    """The user's DSN plus ``replication=database`` and the session options we need."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        # libpq's parse error may quote a fragment of the password: never echo it
        raise SetupError(
            "pg_dsn is not a valid connection string (check quoting and %-encoding)"
        ) from None
    options = str(params.get("options") or "")
    params["options"] = f"{options} {SESSION_OPTIONS}".strip()
    params["replication"] = "database"
    params.setdefault("application_name", APPLICATION_NAME)
    params.setdefault("connect_timeout", "10")
    return make_conninfo("", **params)


def quote_ident(name: str) -> str:
    """Quote an identifier for the replication grammar (double quotes, doubled inside)."""
    if "\x00" in name:
        raise SetupError("identifier contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    if "\x00" in text:
        raise SetupError("literal contains a NUL byte")
    return "'" + text.replace("'", "''") + "'"


def _error_text(pgconn: pq.abc.PGconn) -> str:
    return redact(pgconn.error_message.decode(errors="replace").strip())


class ReplicationStream:
    """One logical replication connection streaming pgoutput from one slot."""

    def __init__(self, dsn: str, slot: str) -> None:
        self._conninfo = replication_conninfo(dsn)
        self._slot = slot
        self._pgconn: pq.abc.PGconn | None = None

    @property
    def pgconn(self) -> pq.abc.PGconn:
        if self._pgconn is None:
            raise ConnectionLost("replication connection is not open", slot=self._slot)
        return self._pgconn

    def connect(self) -> SystemInfo:
        """Blocking connect and IDENTIFY_SYSTEM (bounded by connect_timeout)."""
        pgconn = pq.PGconn.connect(self._conninfo.encode())
        if pgconn.status != pq.ConnStatus.OK:
            text = _error_text(pgconn)
            pgconn.finish()
            if "password authentication failed" in text or "no pg_hba.conf entry" in text:
                raise AuthenticationFailed(f"PostgreSQL refused the credentials: {text}")
            if "must be superuser or replication role" in text or "permission denied" in text:
                raise AuthenticationFailed(f"PostgreSQL refused replication: {text}")
            raise ConnectionLost(f"cannot connect to PostgreSQL: {text}", slot=self._slot)
        self._pgconn = pgconn
        res = self._exec("IDENTIFY_SYSTEM", pq.ExecStatus.TUPLES_OK)
        return SystemInfo(
            system_id=_get(res, 0),
            timeline=int(_get(res, 1)),
            xlogpos=Lsn.parse(_get(res, 2)),
            dbname=_get(res, 3),
        )

    def _exec(self, command: str, expected: pq.ExecStatus) -> pq.abc.PGresult:
        res = self.pgconn.exec_(command.encode())
        if res.status != expected:
            text = redact(res.error_message.decode(errors="replace").strip()) or _error_text(
                self.pgconn
            )
            raise ConnectionLost(f"{command.split(maxsplit=1)[0]} failed: {text}", slot=self._slot)
        return res

    def start(self, publication: str, start: Lsn, messages: bool = False) -> None:
        """START_REPLICATION, then switch the socket to non-blocking for the event loop."""
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
        pgconn = self.pgconn
        pgconn.send_query(command.encode())
        res = pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            text = (
                redact(res.error_message.decode(errors="replace").strip())
                if res is not None
                else ""
            ) or _error_text(pgconn)
            if "is active for PID" in text:
                raise SlotBusy(
                    f"slot {self._slot} is in use by another connection ({text}); "
                    "waiting as a standby",
                    slot=self._slot,
                )
            raise SetupError(f"START_REPLICATION failed: {text}", slot=self._slot)
        pgconn.nonblocking = 1

    def fileno(self) -> int:
        return self.pgconn.socket

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[pq.abc.PGconn]:
        """Every libpq failure while streaming is a lost connection (psycopg raises some)."""
        pgconn = self.pgconn
        try:
            yield pgconn
        except psycopg.Error as exc:
            raise ConnectionLost(
                f"replication connection lost while {what}: {redact(str(exc)).strip()}",
                slot=self._slot,
            ) from None

    def consume(self) -> None:
        """Pull whatever the socket has into libpq's buffer (never blocks)."""
        with self._io("reading") as pgconn:
            pgconn.consume_input()

    def read(self) -> memoryview | None:
        """The next complete CopyData message already buffered, or None if none is."""
        with self._io("reading") as pgconn:
            n, data = pgconn.get_copy_data(1)
            if n > 0:
                return data
            if n == 0:
                return None
            if n == -1:
                # the server ended the COPY: fetch the final result for its reason
                res = pgconn.get_result()
                reason = (
                    redact(res.error_message.decode(errors="replace").strip()) if res else ""
                ) or "server ended the replication stream"
                raise ConnectionLost(reason, slot=self._slot)
            raise ConnectionLost(
                f"replication stream failed: {_error_text(pgconn)}", slot=self._slot
            )

    def send(self, data: bytes) -> bool:
        """Queue one CopyData message and try to flush; True if bytes are still pending."""
        with self._io("sending") as pgconn:
            if pgconn.put_copy_data(data) != 1:
                raise ConnectionLost(
                    f"cannot send to the replication connection: {_error_text(pgconn)}",
                    slot=self._slot,
                )
        return self.flush()

    def send_final(self, data: bytes) -> None:
        """Send one last message and wait until libpq has written it (used before closing)."""
        with self._io("sending the final status update") as pgconn:
            pgconn.nonblocking = 0
            if pgconn.put_copy_data(data) != 1 or pgconn.flush() != 0:
                raise ConnectionLost(
                    f"cannot send the final status update: {_error_text(pgconn)}",
                    slot=self._slot,
                )

    def flush(self) -> bool:
        """Push queued bytes; True while some remain (wait for the socket to be writable)."""
        with self._io("flushing") as pgconn:
            rc = pgconn.flush()
        if rc < 0:
            raise ConnectionLost(
                f"cannot flush the replication connection: {_error_text(self.pgconn)}",
                slot=self._slot,
            )
        return rc == 1

    def close(self) -> None:
        if self._pgconn is not None:
            pgconn, self._pgconn = self._pgconn, None
            pgconn.finish()


def _get(res: pq.abc.PGresult, col: int) -> str:
    value = res.get_value(0, col)
    return "" if value is None else value.decode()
