"""The session core, driven with plain method calls: no sockets, no servers, no clock.

Each test feeds the pipeline what a replication stream and a broker would say (CopyData bytes
built with the test encoder, acks, nacks, ticks) and checks the effects it answers with.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import struct
from typing import Any

import pytest

from cdc_relay.config import Config, load
from cdc_relay.errors import (
    POSTGRES,
    BrokerRefused,
    ConnectionLost,
    InternalError,
    InvalidEvent,
    Nacked,
    SetupError,
)
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder
from cdc_relay.outbox import OutboxMapper
from cdc_relay.pgoutput import Begin, Column, Commit, Insert, Message, Relation
from cdc_relay.pipeline import (
    PAUSE,
    PROGRESSED,
    RESUME,
    Acked,
    Committed,
    Delivered,
    Effect,
    Finish,
    Phase,
    Pipeline,
    Publish,
    ScheduleFlush,
    ScheduleStopTimeout,
    SendStatus,
)
from tests.unit.pgoutput_encoder import encode

OID = 16400
START = Lsn(0x1000)
COLUMNS = ("id", "aggregatetype", "aggregateid", "type", "payload", "headers")
TYPES = (2950, 25, 25, 25, 3802, 3802)


def config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {"pg_dsn": "dbname=x", "amqp_url": "amqp://localhost/"}
    settings.update(overrides)
    return load(env={}, overrides=settings)


def xlog(payload: bytes, at: int, wal_end: int | None = None) -> bytes:
    return b"w" + struct.pack("!QQq", at, wal_end or at, 0) + payload


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + struct.pack("!QqB", wal_end, 0, 1 if reply else 0)


class Feed:
    """A pipeline plus a WAL writer: positions grow as a server's would."""

    def __init__(self, careful: bool = False, **settings: Any) -> None:
        self.cfg = config(**settings)
        self.pipeline = Pipeline(
            self.cfg,
            START,
            OutboxMapper(self.cfg.tables),
            MessageBuilder(self.cfg.slot, "db", self.cfg.routing_key, self.cfg.exchange),
            careful=careful,
        )
        self.lsn = int(START) + 0x100
        self.now = 100.0
        self.effects: list[Effect] = []
        self.take(self.pipeline.streaming_started(self.now))
        self.send(encode(relation()))

    def take(self, effects: list[Effect]) -> list[Effect]:
        self.effects += effects
        return effects

    def send(self, payload: bytes) -> list[Effect]:
        self.lsn += 0x40
        return self.take(self.pipeline.copy_data(xlog(payload, self.lsn), self.now))

    def begin(self) -> list[Effect]:
        return self.send(encode(Begin(final_lsn=Lsn(self.lsn + 0x1000), commit_time=0, xid=7)))

    def insert(self, **values: bytes | None) -> list[Effect]:
        row: dict[str, bytes | None] = {
            "id": b"e-1",
            "aggregatetype": b"order",
            "aggregateid": b"42",
            "type": b"Placed",
            "payload": b'{"n": 1}',
            "headers": None,
        }
        row.update(values)
        return self.send(encode(Insert(relation_oid=OID, new=tuple(row[c] for c in COLUMNS))))

    def commit(self) -> tuple[Lsn, list[Effect]]:
        at = self.lsn + 0x40  # where send() will place the Commit
        end = Lsn(at + 0x20)
        effects = self.send(encode(Commit(flags=0, commit_lsn=Lsn(at), end_lsn=end, commit_time=0)))
        return end, effects

    def tx(self, *ids: str) -> Lsn:
        self.begin()
        for i in ids:
            self.insert(id=i.encode(), aggregateid=i.encode())
        return self.commit()[0]

    def ack(self, tag: int, multiple: bool = False) -> list[Effect]:
        return self.take(self.pipeline.ack(tag, multiple))

    def phase(self) -> Phase:
        return self.pipeline.phase

    def published(self) -> list[Publish]:
        return [e for e in self.effects if isinstance(e, Publish)]

    def finish(self) -> Finish:
        done = [e for e in self.effects if isinstance(e, Finish)]
        assert len(done) == 1, self.effects
        return done[0]


def relation() -> Relation:
    return Relation(
        oid=OID,
        namespace="public",
        name="outbox",
        replica_identity=ord("d"),
        columns=tuple(
            Column(flags=0, name=n, type_oid=t, type_modifier=-1)
            for n, t in zip(COLUMNS, TYPES, strict=True)
        ),
    )


# -- the ordinary path ---------------------------------------------------------------------------
def test_event_is_published_then_confirmed_then_reported() -> None:
    f = Feed()
    assert f.pipeline.reading and f.effects == [RESUME]
    f.begin()
    effects = f.insert()
    assert [type(e) for e in effects] == [Publish]
    publish = effects[0]
    assert isinstance(publish, Publish) and publish.tag == 1
    assert publish.message.message_id == "e-1"
    end, effects = f.commit()
    assert isinstance(effects[0], Committed)
    assert effects == [Committed(end, effects[0].committed_at, 1)]
    effects = f.ack(1)
    assert effects[0] == Acked(1, 1, end)
    assert PROGRESSED in effects and ScheduleFlush(f.cfg.flush_delay) in effects
    assert f.pipeline.flush_due() == [SendStatus(end, end, False)]
    assert f.pipeline.flush_due() == []  # nothing new to report


def test_confirmed_point_waits_for_every_event_of_the_transaction() -> None:
    f = Feed()
    end = f.tx("a", "b", "c")
    f.ack(1)
    f.ack(3)
    assert f.pipeline.tracker.confirmed == START
    f.ack(2)
    assert f.pipeline.tracker.confirmed == end


def test_transaction_without_events_advances_at_its_commit_up_to_the_last_check() -> None:
    f = Feed()
    f.take(f.pipeline.publication_checked(Lsn(0x1100)))
    end = f.tx()
    assert end > Lsn(0x1100)
    assert f.pipeline.tracker.confirmed == Lsn(0x1100), "no check vouches for WAL past 0/1100"
    assert ScheduleFlush(f.cfg.flush_delay) in f.effects
    f.take(f.pipeline.publication_checked(Lsn(0x9000)))
    end = f.tx()
    assert f.pipeline.tracker.confirmed == end


def test_transaction_with_events_is_confirmed_whole_whatever_the_last_check() -> None:
    f = Feed()
    end = f.tx("a")
    f.ack(1)
    assert f.pipeline.tracker.confirmed == end


# -- graceful stop -------------------------------------------------------------------------------
def test_graceful_stop_mid_transaction_reads_to_commit_then_waits_for_confirms() -> None:
    f = Feed()
    f.begin()
    f.insert(id=b"a")
    effects = f.take(f.pipeline.stop_requested())
    assert f.phase() is Phase.DRAINING
    assert ScheduleStopTimeout(f.cfg.stop_timeout) in effects
    assert f.pipeline.reading, "the open transaction must be read to its Commit"
    f.insert(id=b"b")
    end, effects = f.commit()
    assert f.phase() is Phase.SETTLING
    assert PAUSE in effects and not f.pipeline.reading
    assert not [e for e in f.effects if isinstance(e, Finish)]
    f.ack(2, multiple=True)
    done = f.finish()
    assert done.error is None and done.final_flush == end
    assert f.phase() is Phase.CLOSED


def test_graceful_stop_between_transactions_finishes_once_confirms_arrive() -> None:
    f = Feed()
    end = f.tx("a")
    f.take(f.pipeline.stop_requested())
    assert f.phase() is Phase.SETTLING and not f.pipeline.reading
    f.ack(1)
    assert f.finish() == Finish(None, end, f.pipeline.tracker.written)


def test_stop_before_streaming_finishes_without_a_status_update() -> None:
    cfg = config()
    p = Pipeline(cfg, START, OutboxMapper(cfg.tables), MessageBuilder("s", "db", "{type}"))
    effects = p.stop_requested()
    assert len(effects) == 1 and isinstance(effects[0], Finish)
    assert effects[0].final_flush is None and effects[0].error is None


def test_stop_timeout_gives_up_on_missing_confirms() -> None:
    f = Feed()
    f.tx("a")
    f.take(f.pipeline.stop_requested())
    f.take(f.pipeline.stop_timeout())
    done = f.finish()
    assert done.final_flush == START and f.pipeline.tracker.failed
    assert f.ack(1) == [], "acks after the timeout change nothing"


# -- rows the relay cannot publish ---------------------------------------------------------------
def test_invalid_row_halts_after_the_events_before_it_are_confirmed() -> None:
    f = Feed()
    first = f.tx("a")
    f.begin()
    f.insert(id=b"b")
    before = f.pipeline.tracker.last_tag
    effects = f.insert(id=None)
    assert f.pipeline.tracker.last_tag == before, "no tag for a row that was not published"
    assert PAUSE in effects and f.phase() is Phase.HALTING
    assert not [e for e in f.effects if isinstance(e, Finish)], "confirms are awaited first"
    f.ack(2, multiple=True)
    done = f.finish()
    assert isinstance(done.error, InvalidEvent)
    assert done.final_flush == first, "the slot stays before the transaction of the bad row"
    text = str(done.error)
    assert "column=id" in text and "commit_lsn=" in text and "invalid_event_policy" in text


def test_invalid_row_is_dead_lettered_under_the_policy_and_streaming_goes_on() -> None:
    f = Feed(invalid_event_policy="dead_letter", dead_letter_exchange="dlx")
    f.begin()
    f.insert(id=b"a")
    f.insert(headers=b'{"CC": "audit"}', id=b"b")
    f.insert(id=b"c")
    end, _ = f.commit()
    published = f.published()
    assert [p.tag for p in published] == [1, 2, 3]
    assert [p.dead_letter for p in published] == ["", "invalid", ""]
    assert published[1].message.exchange == "dlx"
    assert f.pipeline.reading and f.phase() is Phase.STREAMING
    f.ack(3, multiple=True)
    assert f.pipeline.tracker.confirmed == end


def test_oversize_event_without_dead_letter_exchange_halts() -> None:
    f = Feed(max_message_size=64)
    f.begin()
    f.insert(payload=b'{"blob": "' + b"x" * 100 + b'"}')
    done = f.finish()
    assert isinstance(done.error, BrokerRefused) and not f.published()


def test_non_transactional_outbox_message_warns_once_and_publishes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = Feed()
    message = Message(transactional=False, lsn=Lsn(f.lsn), prefix="outbox", content=b"{}")
    with caplog.at_level(logging.WARNING, logger="cdc_relay"):
        f.send(encode(message))
        f.send(encode(message))
    warnings = [r for r in caplog.records if "non-transactional" in r.getMessage()]
    assert len(warnings) == 1, "warned once per prefix, loudly"
    assert f.pipeline.ignored_messages == 2 and not f.published()


# -- failures ------------------------------------------------------------------------------------
def test_connection_loss_freezes_the_checkpoint() -> None:
    f = Feed()
    f.tx("a")
    err = ConnectionLost("gone", side=POSTGRES)
    f.take(f.pipeline.failure(err))
    done = f.finish()
    assert done.error is err and done.final_flush == START and f.pipeline.tracker.failed
    assert f.ack(1) == [] and f.pipeline.tracker.confirmed == START


def test_nack_fails_the_session_and_asks_for_care_next_time() -> None:
    f = Feed()
    f.tx("a", "b")
    f.take(f.pipeline.nack(1, False))
    assert isinstance(f.finish().error, Nacked)
    assert f.pipeline.outcome().careful and not f.pipeline.outcome().healthy


def test_ack_of_a_tag_never_issued_freezes_instead_of_trusting_later_acks() -> None:
    f = Feed()
    f.tx("a")
    f.ack(5)
    done = f.finish()
    assert isinstance(done.error, InternalError) and f.pipeline.tracker.failed
    assert done.final_flush == START


def test_bytes_that_do_not_decode_halt_with_a_typed_error() -> None:
    f = Feed()
    f.begin()
    f.send(b"I\x00\x00")
    assert f.phase() is Phase.CLOSED  # nothing in flight: the halt finishes at once
    assert f.finish().error is not None and f.finish().error.retryable is False  # type: ignore[union-attr]


def test_unexpected_exception_is_an_internal_error_and_freezes() -> None:
    f = Feed()
    f.tx("a")
    f.begin()
    f.send(encode(Begin(final_lsn=Lsn(1), commit_time=0, xid=1)))  # Begin inside a Begin
    done = f.finish()
    assert isinstance(done.error, InternalError) and f.pipeline.tracker.failed


def test_publication_drift_halts() -> None:
    f = Feed()
    f.tx("a")
    f.take(f.pipeline.publication_drifted(SetupError("publication changed")))
    assert f.phase() is Phase.HALTING
    f.ack(1)
    assert isinstance(f.finish().error, SetupError)


# -- windows and order ---------------------------------------------------------------------------
def test_careful_mode_publishes_one_at_a_time_until_a_window_was_accepted() -> None:
    f = Feed(careful=True, max_in_flight=3)
    f.begin()
    effects = f.insert(id=b"a")
    assert PAUSE in effects and not f.pipeline.reading
    assert RESUME in f.ack(1)
    f.insert(id=b"b")
    assert not f.pipeline.reading
    f.ack(2)
    f.insert(id=b"c")
    f.ack(3)
    f.insert(id=b"d")
    assert f.pipeline.reading, "after max_in_flight confirms the full window is back"


def test_window_pauses_at_the_limit_and_resumes_at_half() -> None:
    f = Feed(max_in_flight=4)
    f.begin()
    for i in range(4):
        f.insert(id=f"e{i}".encode())
    assert not f.pipeline.reading
    f.ack(1)
    assert not f.pipeline.reading
    assert RESUME in f.ack(2, multiple=True)


def test_byte_window_bounds_memory_whatever_the_count() -> None:
    f = Feed(max_in_flight_bytes=1000)
    f.begin()
    big = b'{"blob": "' + b"x" * 600 + b'"}'
    f.insert(id=b"a", payload=big)
    assert f.pipeline.reading
    f.insert(id=b"b", payload=big)
    assert not f.pipeline.reading and f.pipeline.bytes_in_flight > 1000
    f.ack(1)
    assert not f.pipeline.reading, "still above half of the byte window"
    f.ack(2)
    assert f.pipeline.reading and f.pipeline.bytes_in_flight == 0


def test_per_aggregate_hold_keeps_order_under_a_refusal() -> None:
    f = Feed(max_in_flight_per_aggregate=1)
    f.begin()
    f.insert(id=b"a1", aggregateid=b"A")
    f.insert(id=b"b1", aggregateid=b"B")
    effects = f.insert(id=b"a2", aggregateid=b"A")
    assert PAUSE in effects and [p.message.message_id for p in f.published()] == ["a1", "b1"]
    f.take(f.pipeline.nack(1, False))  # a1 refused: a2 must never overtake it
    assert [p.message.message_id for p in f.published()] == ["a1", "b1"]
    assert isinstance(f.finish().error, Nacked)


def test_per_aggregate_hold_releases_after_the_previous_confirm() -> None:
    f = Feed(max_in_flight_per_aggregate=1)
    f.begin()
    f.insert(id=b"a1", aggregateid=b"A")
    f.insert(id=b"a2", aggregateid=b"A")
    effects = f.ack(1)
    assert [p.message.message_id for p in f.published()] == ["a1", "a2"]
    assert RESUME in effects
    end, _ = f.commit()
    f.ack(2)
    assert f.pipeline.tracker.confirmed == end


# -- keepalives, status updates and liveness -----------------------------------------------------
def test_idle_advance_is_capped_by_the_last_publication_check() -> None:
    f = Feed()
    f.tx()
    assert f.pipeline.tracker.confirmed == START, "no check vouches for that commit yet"
    f.take(f.pipeline.copy_data(keepalive(0x900000), f.now))
    assert f.pipeline.tracker.confirmed == START, "no check vouches for that WAL yet"
    f.take(f.pipeline.publication_checked(Lsn(0x5000)))
    f.take(f.pipeline.copy_data(keepalive(0x900000), f.now))
    assert f.pipeline.tracker.confirmed == Lsn(0x5000)
    f.take(f.pipeline.publication_checked(Lsn(0xA00000)))
    f.take(f.pipeline.copy_data(keepalive(0x900000), f.now))
    assert f.pipeline.tracker.confirmed == Lsn(0x900000)


def test_no_idle_advance_inside_an_open_transaction() -> None:
    f = Feed()
    f.take(f.pipeline.publication_checked(Lsn(0xA00000)))
    f.begin()
    f.take(f.pipeline.copy_data(keepalive(0x900000), f.now))
    assert f.pipeline.tracker.confirmed == START


def test_reply_request_is_answered_at_once() -> None:
    f = Feed()
    effects = f.take(f.pipeline.copy_data(keepalive(0x2000, reply=True), f.now))
    assert SendStatus(Lsn(0x2000), START, False) in effects


def test_silence_gets_a_reply_request_then_counts_as_a_lost_connection() -> None:
    f = Feed(replication_timeout=9, status_interval=10, health_timeout=60)
    quiet = f.pipeline.tick(f.now + 1)
    assert not any(isinstance(e, SendStatus) and e.reply_requested for e in quiet)
    asked = f.pipeline.tick(f.now + 3.5)
    assert any(isinstance(e, SendStatus) and e.reply_requested for e in asked)
    f.take(f.pipeline.copy_data(keepalive(0x2000), f.now + 4))  # the server answered
    assert not [e for e in f.pipeline.tick(f.now + 8) if isinstance(e, Finish)]
    f.take(f.pipeline.tick(f.now + 14))
    err = f.finish().error
    assert isinstance(err, ConnectionLost) and err.side == POSTGRES and err.retryable


def test_paused_reading_sends_status_every_tick_and_never_times_out() -> None:
    f = Feed(max_in_flight=1, replication_timeout=5)
    f.begin()
    f.insert()
    assert not f.pipeline.reading
    for second in range(1, 30):
        effects = f.pipeline.tick(f.now + second)
        assert any(isinstance(e, SendStatus) for e in effects)
        assert not any(isinstance(e, Finish) for e in effects)


def test_copy_data_while_paused_is_refused_not_dropped() -> None:
    f = Feed(max_in_flight=1)
    f.begin()
    f.insert()
    f.insert(id=b"late")
    err = f.finish().error
    assert isinstance(err, InternalError) and f.pipeline.tracker.failed


def test_outcome_is_healthy_only_when_the_slot_moved() -> None:
    f = Feed()
    f.begin()
    f.insert()
    f.ack(1)
    assert not f.pipeline.outcome().healthy, (
        "acks inside an unfinished transaction are not progress"
    )
    f.commit()
    assert f.pipeline.outcome().healthy


def test_a_long_idle_session_counts_as_healthy() -> None:
    f = Feed()
    for second in (20, 40):
        f.take(f.pipeline.copy_data(keepalive(0x1000), f.now + second))
    assert not f.pipeline.outcome().healthy
    f.take(f.pipeline.copy_data(keepalive(0x1000), f.now + 61))
    assert f.pipeline.outcome().healthy, "a day on an idle database was not a failed session"


def test_invalid_row_too_large_to_dead_letter_halts() -> None:
    f = Feed(invalid_event_policy="dead_letter", dead_letter_exchange="dlx", max_message_size=300)
    f.begin()
    f.insert(id=None, payload=b'{"blob": "' + b"x" * 400 + b'"}')
    err = f.finish().error
    assert isinstance(err, BrokerRefused) and "too large to dead-letter" in str(err)
    assert not f.published()


def _delivered(effects: list[Effect]) -> list[Delivered]:
    return [e for e in effects if isinstance(e, Delivered)]


def test_the_ledger_gets_each_transaction_once_all_its_events_are_confirmed() -> None:
    f = Feed(ledger=True)
    first = f.tx("a", "b")
    second = f.tx("c")
    assert _delivered(f.effects) == []  # read to the commit, nothing confirmed yet
    assert _delivered(f.ack(3)) == []  # the second is confirmed, the first is not: wait
    done = _delivered(f.ack(2, multiple=True))
    assert [d.end_lsn for d in done] == [first, second]  # in commit order, together
    assert [d.ids for d in done] == [("a", "b"), ("c",)]
    published = [e.message for e in f.effects if isinstance(e, Publish)]
    # the envelopes' commit_lsn and committed_at, the ones a consumer's inbox keeps
    for delivered, message in ((done[0], published[0]), (done[1], published[2])):
        body = json.loads(message.body)
        assert str(delivered.commit_lsn) == body["source"]["commit_lsn"]
        assert delivered.committed_at == dt.datetime.fromisoformat(body["committed_at"])
    third = f.tx("d")
    assert _delivered(f.ack(4)) == [
        Delivered(_delivered(f.effects)[-1].commit_lsn, third, done[0].committed_at, ("d",))
    ]


def test_without_the_ledger_no_transaction_is_handed_over() -> None:
    f = Feed()
    f.tx("a")
    f.ack(1)
    assert _delivered(f.effects) == []


def test_a_nack_keeps_the_ledger_from_recording_what_follows() -> None:
    f = Feed(ledger=True)
    f.tx("a")
    f.tx("b")
    f.take(f.pipeline.nack(1, False))
    f.ack(2)
    assert _delivered(f.effects) == []
