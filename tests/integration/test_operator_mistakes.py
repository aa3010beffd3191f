"""Operator actions the relay must survive without losing an event or looping: a publication
altered under it, a broker object declared with other arguments, a quiet database."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.harness import Env, insert_events, outbox_row

pytestmark = pytest.mark.integration


def _healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_publication_altered_while_streaming_halts_before_the_slot_moves_past_rows(
    env: Env,
) -> None:
    env.init()
    relay = env.start_relay(publication_check_interval="0.5")
    relay.wait_streaming()
    first = [outbox_row("P", 0)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, first)
    assert [d.message_id for d in env.consume(1)] == [first[0][0]]
    with env.sql() as conn:
        conn.execute("CREATE TABLE other (x int)")
        conn.execute(f'ALTER PUBLICATION "{env.name}" SET TABLE other')
        before_rows = env.current_lsn()
        lost = [outbox_row("P", i) for i in range(1, 4)]
        with conn.transaction():
            insert_events(conn, lost)
        # a busy database beside the now-unpublished outbox: WAL keeps coming
        for _ in range(20):
            conn.execute("INSERT INTO other SELECT generate_series(1, 200)")
    assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "the publication changed while streaming" in log
    assert "retrying" not in log
    assert env.slot_flush() <= before_rows, "the slot moved through WAL pgoutput did not send"
    assert "re-publish them from the outbox table" in log, "the way forward is named"
    # The operator restores the publication. PostgreSQL decodes the rows written meanwhile with
    # the publication as it was then, so they never come through the slot (that is why the
    # relay halts and says so): new rows do, and the lost ones are still in the table.
    with env.sql() as conn:
        conn.execute(f'ALTER PUBLICATION "{env.name}" SET TABLE outbox')
    relay2 = env.start_relay()
    relay2.wait_streaming()
    after = [outbox_row("P", 9)]
    with env.sql() as conn, conn.transaction():
        insert_events(conn, after)
    got = env.consume(1, settle=1.0)
    assert [d.message_id for d in got] == [after[0][0]]
    with env.sql() as conn:
        kept = conn.execute(
            "SELECT count(*) FROM outbox WHERE id = ANY(%s::uuid[])", ([r[0] for r in lost],)
        ).fetchone()
    assert kept == (len(lost),)
    assert relay2.terminate() == 0


def test_exchange_declared_with_another_type_is_one_clear_line_not_a_retry_loop(
    env: Env,
) -> None:
    env.init()
    exchange = f"{env.exchange}.direct"
    with env.channel() as ch:
        ch.exchange_declare(exchange, "direct", durable=True)
    relay = env.start_relay(exchange=exchange)  # the relay declares it as a topic exchange
    assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "retrying" not in log, "a conflicting declaration cannot be fixed by retrying"
    last = json.loads(log.strip().splitlines()[-1])
    assert last["level"] == "error" and exchange in last["msg"]
    assert "type" in last["msg"], last["msg"]


def test_idle_relay_stays_healthy_with_a_short_health_timeout(env: Env) -> None:
    """The walsender sends nothing on an idle database; reply requests keep the relay's view of
    it fresh, and an idle relay is not a failing one."""
    env.init()
    relay = env.start_relay(health_timeout="2", status_interval="10")
    relay.wait_streaming()
    port = relay.http_port()
    seen = []
    for _ in range(12):
        seen.append(_healthz(port))
        time.sleep(0.5)
    assert all(code == 200 for code, _ in seen), seen
    assert all(body["consecutive_failures"] == 0 for _, body in seen)
    assert relay.terminate() == 0
