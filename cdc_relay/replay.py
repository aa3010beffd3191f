"""``cdc-relay replay``: publish retained outbox rows again, the repair for a consumer that lost
data or a queue that was purged.

A replayed event is the original event: same ``message_id``, routing key, headers and envelope
fields from the row, so consumers that dedupe by id (all of them must: the relay delivers at
least once) treat a replay of something they have as a duplicate. What the table cannot give
back is the WAL position, so the envelope says ``source.snapshot: true`` with ``0/0`` positions,
and the ``x-cdc-relay-replay`` header carries this replay's id. The slot is not touched: a
replay runs beside a streaming relay. Completion is gated on confirms: the result says how many
of the selected rows the broker confirmed, and the command exits 0 only if that is all of them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc_relay import catalog
from cdc_relay.config import Config
from cdc_relay.confirms import ConfirmedPublisher
from cdc_relay.errors import RelayError
from cdc_relay.lsn import Lsn
from cdc_relay.retained import OutboxTable, RowReader, Selection, commit_timestamps, message
from cdc_relay.retained import builder as retained_builder
from cdc_relay.signals import StopSignal

log = logging.getLogger("cdc_relay.replay")

NO_POSITION = Lsn(0)


@dataclass(frozen=True, slots=True)
class Replayed:
    replay_id: str
    selected: int
    published: int
    confirmed: int
    diverted: int  # sent to the dead-letter exchange (invalid or oversize rows)
    dry_run: bool
    error: RelayError | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.confirmed == self.selected


def replay(
    cfg: Config,
    selection: Selection,
    *,
    dry_run: bool = False,
    stop: StopSignal | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Replayed:
    """Publish the selected rows of every outbox table, in (created_at, id) order.

    A failure after the first publish is not raised but returned in ``error`` with the count
    confirmed, so the caller can say how far it got; re-running sends the same ids again.
    """
    replay_id = str(uuid.uuid4())
    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "reading rows to replay"):
        catalog.check_server(conn)
        catalog.check_encoding(conn)
        commit_times = commit_timestamps(conn)
        tables = [OutboxTable(conn, cfg, s, n) for s, n in cfg.tables]
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        selected = 0
        for table in tables:
            query, params = table.query(selection, None, commit_times)
            counted = conn.execute(
                sql.SQL("SELECT count(*) FROM ({}) AS selected").format(query), params
            ).fetchone()
            selected += int(str(counted[0])) if counted else 0
        if dry_run or selected == 0:
            conn.rollback()
            return Replayed(replay_id, selected, 0, 0, 0, dry_run)
        published = diverted = 0
        pub: ConfirmedPublisher[int] = ConfirmedPublisher(cfg, stop)
        try:
            with pub:
                builder = retained_builder(cfg, str(conn.info.dbname), pub.frame_max)
                last = time.monotonic()
                for table in tables:
                    reader = RowReader(cfg, table, NO_POSITION, replay=replay_id)
                    for batch in reader.rows(conn, selection, None, commit_times):
                        for row in batch:
                            out, why = message(cfg, builder, row)
                            published += 1
                            diverted += bool(why)
                            pub.publish(out, published)
                        pub.wait_room()
                        if progress is not None and time.monotonic() - last >= 1.0:
                            last = time.monotonic()
                            progress(pub.confirmed, selected)
                        if stop is not None and stop.requested:
                            break
                pub.wait_all(cfg.stop_timeout)
        except RelayError as err:
            log.error(
                "replay failed",
                extra={"replay_id": replay_id, "confirmed": pub.confirmed, "error": str(err)},
            )
            return Replayed(replay_id, selected, published, pub.confirmed, diverted, False, err)
        finally:
            conn.rollback()
        return Replayed(replay_id, selected, published, pub.confirmed, diverted, False)
