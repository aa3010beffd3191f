"""Capture real pgoutput bytes from a throwaway PostgreSQL 15 for the decoder's unit tests.

The decoder is tested against what a real server sends, not against what we believe it sends, so
the fixtures under ``tests/unit/captured/`` come from this script. It starts a private cluster in a
temporary directory (Unix socket only, no TCP), runs one workload per scenario, reads the
resulting messages through ``pg_logical_slot_get_binary_changes`` (the SQL face of the same
walsender decoding path) and writes one hex file per scenario. It also opens a real replication
connection and records the raw CopyData frames ('w' and 'k') for the framing tests. The server is
stopped and its directory removed at the end, whatever happens.

Regenerate (needs PostgreSQL 15 binaries; as root they run as the ``postgres`` user)::

    .venv/bin/python -m tests.unit.capture_pgoutput [--pg-bin DIR] [--out DIR]

File format: UTF-8 text, one message per line as lowercase hex. Lines starting with ``#`` are
comments; a ``# lsn=X/Y xid=N`` comment right before a message records the ``lsn`` and ``xid``
columns PostgreSQL returned with it, so the tests can check the decoded LSNs and xids against the
server's own view.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

CAPTURED_DIR = Path(__file__).resolve().parent / "captured"
DEFAULT_PG_BIN = Path(os.environ.get("CDC_RELAY_PG_BIN", "/usr/lib/postgresql/15/bin"))

PUBLICATION = "pub"
SLOT = "cap"
STREAM_SLOT = "cap_stream"
SQL_OPTIONS: tuple[str, ...] = (
    "proto_version",
    "1",
    "publication_names",
    PUBLICATION,
    "messages",
    "true",
)


class CapturedMessage(NamedTuple):
    """One captured message and, when the server reported them, its lsn and xid columns."""

    data: bytes
    lsn: str | None
    xid: int | None


def read_capture(path: Path) -> list[CapturedMessage]:
    """Read one hex capture file written by ``write_capture``."""
    messages: list[CapturedMessage] = []
    lsn: str | None = None
    xid: int | None = None
    for raw_line in path.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith("# lsn="):
            fields = dict(part.split("=", 1) for part in line[2:].split())
            lsn, xid = fields["lsn"], int(fields["xid"])
            continue
        if line.startswith("#"):
            continue
        messages.append(CapturedMessage(bytes.fromhex(line), lsn, xid))
        lsn = xid = None
    return messages


def write_capture(
    path: Path, header: Sequence[str], messages: Sequence[tuple[bytes, str | None, int | None]]
) -> None:
    lines = [f"# {text}" for text in header]
    for data, lsn, xid in messages:
        if lsn is not None:
            lines.append(f"# lsn={lsn} xid={xid}")
        lines.append(data.hex())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the workloads --------------------------------------------------------------------------------

SETUP_SQL: tuple[str, ...] = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    """CREATE TABLE outbox (
        id uuid PRIMARY KEY,
        aggregatetype text,
        aggregateid text,
        type text,
        payload jsonb,
        headers jsonb,
        traceparent text,
        created_at timestamptz DEFAULT now()
    )""",
    'CREATE TABLE accounts (id int PRIMARY KEY, "näme" text, balance numeric(12,2), mood mood)',
    "ALTER TABLE accounts REPLICA IDENTITY FULL",
    "CREATE TABLE documents (id int PRIMARY KEY, title text, body text)",
    # EXTERNAL: stored out of line without compression, so a repeated text is still TOASTed
    "ALTER TABLE documents ALTER COLUMN body SET STORAGE EXTERNAL",
    "CREATE TABLE not_published (id int PRIMARY KEY)",
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE outbox, accounts, documents"
    " WITH (publish = 'insert, update, delete, truncate')",
    "SELECT pg_replication_origin_create('o1')",
    f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')",
)

_OUTBOX_COLS = "id, aggregatetype, aggregateid, type, payload, headers, traceparent, created_at"
_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    sql: tuple[str, ...]
    options: tuple[str, ...] = SQL_OPTIONS


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "insert",
        "one outbox row inserted in its own transaction",
        (
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES ("
            "'6f1c2a9e-8d3b-4c1e-9f0a-1b2c3d4e5f60', 'order', 'o-1', 'OrderCreated',"
            ' \'{"total": 42, "items": ["a", "b"]}\', \'{"source": "shop"}\','
            f" '{_TRACEPARENT}', '2024-01-02 03:04:05.123456+00')",
        ),
    ),
    Scenario(
        "multi_insert",
        "three outbox rows from one INSERT: a NULL payload and non-ASCII text",
        (
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
            " ('00000000-0000-4000-8000-000000000001', 'order', 'o-2', 'OrderPaid',"
            " '{\"paid\": true}', NULL, NULL, '2024-01-02 03:04:06+00'),"
            " ('00000000-0000-4000-8000-000000000002', 'order', 'o-3', 'OrderVoided',"
            " NULL, NULL, NULL, '2024-01-02 03:04:07+00'),"
            " ('00000000-0000-4000-8000-000000000003', 'kunde', 'Grüße-東京-🚀', 'Angelegt',"
            ' \'{"name": "Zoë Ñúñez", "city": "Köln"}\', NULL, NULL,'
            " '2024-01-02 03:04:08+00')",
        ),
    ),
    Scenario(
        "sequence",
        "three transactions in a row (two single inserts, one two-row), for LSN ordering",
        tuple(
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
            f" ('00000000-0000-4000-8000-0000000001{i:02d}', 'seq', 's-{i}', 'Tick',"
            f" '{{\"n\": {i}}}', NULL, NULL, '2024-01-02 00:00:{i:02d}+00')"
            + (
                f", ('00000000-0000-4000-8000-0000000002{i:02d}', 'seq', 's-{i}b', 'Tock',"
                f" '{{\"n\": {i}}}', NULL, NULL, '2024-01-02 00:01:{i:02d}+00')"
                if i == 3
                else ""
            )
            for i in (1, 2, 3)
        ),
    ),
    Scenario(
        "update",
        "outbox UPDATE that leaves the primary key alone (no old key sent)",
        (
            "UPDATE outbox SET type = 'OrderShipped'"
            " WHERE id = '6f1c2a9e-8d3b-4c1e-9f0a-1b2c3d4e5f60'",
        ),
    ),
    Scenario(
        "update_key",
        "outbox UPDATE that changes the primary key ('K' old key, then 'N')",
        (
            "UPDATE outbox SET id = '00000000-0000-4000-8000-0000000000ff'"
            " WHERE id = '00000000-0000-4000-8000-000000000001'",
        ),
    ),
    Scenario(
        "update_full",
        "REPLICA IDENTITY FULL table with an enum column: insert then update ('O' old row)",
        (
            "INSERT INTO accounts VALUES (1, 'Zoë', 10.50, 'ok')",
            "UPDATE accounts SET balance = 99.99, mood = 'happy' WHERE id = 1",
        ),
    ),
    Scenario(
        "toast",
        "row with an out-of-line TOASTed body; an UPDATE of another column sends it as 'u'",
        (
            "INSERT INTO documents VALUES (1, 'draft', repeat('lorem ipsum ', 500))",
            "UPDATE documents SET title = 'final' WHERE id = 1",
        ),
    ),
    Scenario(
        "delete",
        "outbox DELETE (default replica identity: 'K' with the key only)",
        ("DELETE FROM outbox WHERE id = '00000000-0000-4000-8000-000000000002'",),
    ),
    Scenario(
        "delete_full",
        "REPLICA IDENTITY FULL DELETE ('O' with the whole old row)",
        ("DELETE FROM accounts WHERE id = 1",),
    ),
    Scenario(
        "truncate",
        "TRUNCATE of two tables with RESTART IDENTITY CASCADE, then a plain one",
        (
            "TRUNCATE accounts, documents RESTART IDENTITY CASCADE",
            "TRUNCATE outbox",
        ),
    ),
    Scenario(
        "message_transactional",
        "pg_logical_emit_message(true, ...) in its own transaction",
        ("SELECT pg_logical_emit_message(true, 'outbox', '{\"a\":1}')",),
    ),
    Scenario(
        "message_nontransactional",
        "pg_logical_emit_message(false, ...) with text and with binary content",
        (
            "SELECT pg_logical_emit_message(false, 'outbox-ctl', 'ping')",
            "SELECT pg_logical_emit_message(false, 'bin', '\\x00ff80'::bytea)",
            # A non-transactional message does not flush WAL by itself (PostgreSQL 17 added a
            # flush argument) and the SQL interface decodes only flushed WAL: commit something.
            "INSERT INTO not_published VALUES (0)",
        ),
    ),
    Scenario(
        "rollback",
        "rolled-back transaction with an insert and both kinds of message:"
        " only the non-transactional message is decoded",
        (
            "BEGIN",
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
            " ('00000000-0000-4000-8000-00000000dead', 'x', 'x', 'Lost', NULL, NULL, NULL,"
            " '2024-01-02 00:00:00+00')",
            "SELECT pg_logical_emit_message(true, 'outbox', 'lost')",
            "SELECT pg_logical_emit_message(false, 'audit', 'rolled back')",
            "ROLLBACK",
            "INSERT INTO not_published VALUES (1)",  # committed, but nothing to publish
        ),
    ),
    Scenario(
        "origin",
        "transaction replayed under replication origin 'o1' (Origin message after Begin)",
        (
            "SELECT pg_replication_origin_session_setup('o1')",
            "BEGIN",
            "SELECT pg_replication_origin_xact_setup('0/1234ABCD', '2024-01-02 03:04:05+00')",
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
            " ('00000000-0000-4000-8000-0000000000a1', 'order', 'o-9', 'Replicated',"
            " '{}', NULL, NULL, '2024-01-02 00:00:00+00')",
            "COMMIT",
            "SELECT pg_replication_origin_session_reset()",
        ),
    ),
    Scenario(
        "binary",
        "binary = true: column values in the types' send format ('b')",
        (
            f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
            " ('00000000-0000-4000-8000-0000000000b1', 'order', 'o-b', 'Binary',"
            " '{\"x\": 1}', NULL, NULL, '2000-01-01 00:00:01+00')",
            "INSERT INTO accounts VALUES (2, 'Bob', 1.25, 'sad')",
        ),
        (*SQL_OPTIONS, "binary", "true"),
    ),
)

STREAM_SQL = (
    f"INSERT INTO outbox ({_OUTBOX_COLS}) VALUES"
    " ('00000000-0000-4000-8000-0000000000c1', 'order', 'o-s', 'Streamed',"
    " '{\"s\": 1}', NULL, NULL, '2024-01-02 00:00:00+00')"
)


# --- the throwaway server -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_postgres(pg_bin: Path) -> Iterator[tuple[str, int]]:
    """A PostgreSQL cluster on a Unix socket in a temp dir; yields (socket dir, port)."""
    as_root = os.geteuid() == 0
    prefix: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="cdc-relay-capture-"))
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    port = _free_port()
    server_opts = shlex.join(
        [
            "-c",
            "wal_level=logical",
            "-c",
            "listen_addresses=",
            "-c",
            "wal_sender_timeout=2s",  # a reply-requested keepalive arrives within a second
            "-c",
            "fsync=off",
            "-k",
            str(root),
            "-p",
            str(port),
        ]
    )
    try:
        initdb = [str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        subprocess.run(
            [*prefix, *initdb, "--encoding=UTF8", "--locale=C"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        pg_ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w"]
        subprocess.run(
            [*prefix, *pg_ctl, "-o", server_opts, "start"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            yield str(root), port
        finally:
            subprocess.run(
                [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                check=False,
                stdout=subprocess.DEVNULL,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- capturing ------------------------------------------------------------------------------------


def _conninfo(host: str, port: int) -> str:
    return f"host={host} port={port} user=postgres dbname=postgres"


def capture_sql(host: str, port: int, out: Path) -> list[Path]:
    import psycopg

    written: list[Path] = []
    with psycopg.connect(_conninfo(host, port), autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        conn.execute("SET TimeZone = 'UTC'")
        for statement in SETUP_SQL:
            conn.execute(statement)
        for scenario in SCENARIOS:
            for statement in scenario.sql:
                conn.execute(statement)
            placeholders = ", ".join(["%s"] * len(scenario.options))
            rows = conn.execute(
                "SELECT lsn::text, xid::text::bigint, data"
                f" FROM pg_logical_slot_get_binary_changes('{SLOT}', NULL, NULL, {placeholders})",
                scenario.options,
            ).fetchall()
            header = [
                f"{scenario.name}: {scenario.what}",
                f"captured by tests/unit/capture_pgoutput.py from PostgreSQL {version}",
                "via pg_logical_slot_get_binary_changes options: " + " ".join(scenario.options),
                *(f"sql: {' '.join(s.split())}" for s in scenario.sql),
            ]
            path = out / f"{scenario.name}.hex"
            write_capture(path, header, [(bytes(r[2]), r[0], int(r[1])) for r in rows])
            written.append(path)
        conn.execute(f"SELECT pg_create_logical_replication_slot('{STREAM_SLOT}', 'pgoutput')")
        conn.execute(STREAM_SQL)
        written.append(capture_stream(host, port, out, version))
    return written


def capture_stream(host: str, port: int, out: Path, version: str) -> Path:
    """Record raw CopyData frames from a real walsender: 'w' frames, then keepalives."""
    from psycopg import pq

    conn = pq.PGconn.connect(f"{_conninfo(host, port)} replication=database".encode())
    if conn.status != pq.ConnStatus.OK:
        raise RuntimeError(conn.get_error_message())
    command = (
        f"START_REPLICATION SLOT {STREAM_SLOT} LOGICAL 0/0"
        f" (proto_version '1', publication_names '{PUBLICATION}', messages 'true')"
    )
    try:
        result = conn.exec_(command.encode())
        if result.status != pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(conn.get_error_message())
        frames: list[bytes] = []
        deadline = time.monotonic() + 30
        # Stop at the first keepalive with the reply flag: by then the walsender has sent the
        # transaction, a plain keepalive on catching up, and waited half of wal_sender_timeout.
        while time.monotonic() < deadline:
            nbytes, view = conn.get_copy_data(0)  # blocking; keepalives bound the wait
            if nbytes < 0:
                break
            frame = bytes(view)
            frames.append(frame)
            if frame[:1] == b"k" and frame[-1] == 1:
                break
        else:
            raise RuntimeError("no reply-requested keepalive within 30 s")
    finally:
        conn.finish()
    path = out / "stream_frames.hex"
    header = [
        "stream_frames: raw CopyData frames of START_REPLICATION ... LOGICAL (proto_version 1)",
        f"captured by tests/unit/capture_pgoutput.py from PostgreSQL {version}",
        "wal_sender_timeout=2s, no status updates sent: ends with a reply-requested keepalive",
        f"sql: {' '.join(STREAM_SQL.split())}",
    ]
    write_capture(path, header, [(frame, None, None) for frame in frames])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pg-bin", type=Path, default=DEFAULT_PG_BIN)
    parser.add_argument("--out", type=Path, default=CAPTURED_DIR)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with throwaway_postgres(args.pg_bin) as (host, port):
        written = capture_sql(host, port, out)
    for path in written:
        print(f"wrote {path} ({len(read_capture(path))} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
