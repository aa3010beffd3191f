"""`make demo`: watch supply-chain events flow from PostgreSQL through cdc-relay to RabbitMQ.

Starts a sandbox PostgreSQL + RabbitMQ under ``.sandbox/`` unless ``CDC_RELAY_PG_DSN`` and
``CDC_RELAY_AMQP_URL`` point at servers of your own, creates the outbox, starts the relay, then
writes orders the way an application would — business row and outbox row in one transaction —
and prints each event as a consumer receives it. Beside it, a warehouse built with the kit
(`cdc-relay consume`) applies the reservations to its stock table exactly once; at the end the
demo runs `cdc-relay audit` to show that what the source committed is what the warehouse took.
Ctrl-C stops everything the demo started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import psycopg

from tests import sandbox

REPO = Path(__file__).resolve().parents[1]
QUEUE = "demo.warehouse"
CONSUMER_QUEUE = "demo.stock"  # the kit's inbox consumer reads this one

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, customer text, total numeric);
CREATE TABLE IF NOT EXISTS inventory (sku text PRIMARY KEY, on_hand int, reserved int);
CREATE TABLE IF NOT EXISTS shipments (id text PRIMARY KEY, order_id text, carrier text);
INSERT INTO inventory VALUES ('SKU-PALLET-01', 500, 0), ('SKU-CRATE-07', 80, 0)
ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS warehouse_stock (sku text PRIMARY KEY, reserved int NOT NULL);
"""


def apply_event(event: Any, conn: psycopg.Connection[Any]) -> None:
    """The warehouse's handler (`cdc-relay consume --handler tests.demo:apply_event`): it
    applies reservations to its own stock table; other events are only recorded in the inbox."""
    if event.type != "InventoryReserved":
        return
    p = json.loads(bytes(event.payload))
    conn.execute(
        "INSERT INTO warehouse_stock (sku, reserved) VALUES (%s, %s) ON CONFLICT (sku) "
        "DO UPDATE SET reserved = warehouse_stock.reserved + excluded.reserved",
        (p["sku"], p["qty"]),
    )


def _outbox(
    conn: psycopg.Connection[Any], agg_type: str, agg_id: str, type_: str, payload: dict[str, Any]
) -> None:
    conn.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
        "VALUES (%s, %s, %s, %s, %s)",
        (str(uuid.uuid4()), agg_type, agg_id, type_, json.dumps(payload)),
    )


def place_order(conn: psycopg.Connection[Any], n: int) -> None:
    """Three transactions, each a business change plus its event, as an application writes them."""
    order_id = f"ORD-{1000 + n}"
    sku = "SKU-PALLET-01" if n % 2 else "SKU-CRATE-07"
    qty = 1 + n % 3
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (%s, %s, %s)", (order_id, f"acme-{n}", 99.5 * qty))
        _outbox(conn, "order", order_id, "OrderPlaced", {"order": order_id, "sku": sku, "qty": qty})
    with conn.transaction():
        conn.execute("UPDATE inventory SET reserved = reserved + %s WHERE sku = %s", (qty, sku))
        _outbox(
            conn, "inventory", sku, "InventoryReserved", {"sku": sku, "qty": qty, "order": order_id}
        )
    with conn.transaction():
        conn.execute("INSERT INTO shipments VALUES (%s, %s, 'DHL')", (f"SHP-{n}", order_id))
        _outbox(
            conn,
            "shipment",
            f"SHP-{n}",
            "ShipmentDispatched",
            {"shipment": f"SHP-{n}", "order": order_id, "carrier": "DHL"},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=3, help="orders to write before idling")
    parser.add_argument("--once", action="store_true", help="exit after the first orders arrive")
    args = parser.parse_args(argv)

    started_sandbox = False
    env = dict(os.environ)
    if not (env.get("CDC_RELAY_PG_DSN") and env.get("CDC_RELAY_AMQP_URL")):
        print("starting sandbox PostgreSQL 15 + RabbitMQ under .sandbox/ ...", flush=True)
        env.update(sandbox.up(REPO / ".sandbox"))
        started_sandbox = True
    relay: subprocess.Popen[bytes] | None = None
    consumer: subprocess.Popen[bytes] | None = None
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with psycopg.connect(env["CDC_RELAY_PG_DSN"], autocommit=True) as conn:
            init = subprocess.run(
                [sys.executable, "-m", "cdc_relay.cli", "init", "--create-outbox"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if init.returncode != 0:
                print(init.stderr, file=sys.stderr)
                return 1
            print("cdc-relay init:", "; ".join(init.stdout.splitlines()))
            conn.execute(SCHEMA.encode())

            exchange = env.get("CDC_RELAY_EXCHANGE", "outbox")
            amqp = pika.BlockingConnection(pika.URLParameters(env["CDC_RELAY_AMQP_URL"]))
            ch = amqp.channel()
            ch.exchange_declare(  # as the relay declares it, with its alternate exchange
                exchange,
                "topic",
                durable=True,
                arguments={"alternate-exchange": f"{exchange}.unroutable"},
            )
            ch.queue_declare(QUEUE, durable=True)
            ch.queue_bind(QUEUE, exchange, "#")

            log_path = REPO / ".sandbox" / "relay.log"
            log_path.parent.mkdir(exist_ok=True)
            relay = subprocess.Popen(
                [sys.executable, "-m", "cdc_relay.cli", "run", "--log-format", "logfmt"],
                env=env,
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
            )
            print(f"relay started (pid {relay.pid}, log {log_path})")
            print(f"consumer bound queue {QUEUE!r} to exchange {exchange!r} with '#'")
            ch.queue_declare(CONSUMER_QUEUE, durable=True)
            ch.queue_bind(CONSUMER_QUEUE, exchange, "#")
            consumer_env = {
                **env,
                "CDC_RELAY_INBOX_DSN": env["CDC_RELAY_PG_DSN"],
                "CDC_RELAY_HTTP_ADDRESS": "127.0.0.1:0",
            }
            consumer = subprocess.Popen(
                [
                    *(sys.executable, "-m", "cdc_relay.cli", "consume", "--log-format", "logfmt"),
                    *("--queue", CONSUMER_QUEUE, "--handler", "tests.demo:apply_event"),
                ],
                env=consumer_env,
                stdout=(REPO / ".sandbox" / "consumer.log").open("wb"),
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            print(
                f"warehouse consumer (cdc-relay consume, pid {consumer.pid}) applies "
                f"InventoryReserved from {CONSUMER_QUEUE!r} exactly once\n"
            )

            written = 0
            received = 0
            next_order = time.monotonic()
            n = 0
            while not stop["now"]:
                if relay.poll() is not None:
                    print(f"relay exited with {relay.returncode}; see {log_path}", file=sys.stderr)
                    return 1
                if time.monotonic() >= next_order and (n < args.orders or not args.once):
                    place_order(conn, n)
                    written += 3
                    n += 1
                    next_order = time.monotonic() + (0.2 if n < args.orders else 3.0)
                method, props, body = ch.basic_get(QUEUE, auto_ack=True)
                if method is None:
                    amqp.sleep(0.05)
                    if args.once and n >= args.orders and received >= written:
                        break
                    continue
                received += 1
                event = json.loads(body)
                print(
                    f"received {method.routing_key:<30} id={props.message_id[:8]} "
                    f"lsn={event['source']['lsn']:<11} payload={json.dumps(event['payload'])}",
                    flush=True,
                )
            amqp.close()
            print(f"\n{received} events received for {written} written.")
            audited = _finish_warehouse(conn, consumer_env, written)
        return 0 if received >= written and audited else 1
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.send_signal(signal.SIGTERM)
            try:
                consumer.wait(30)
            except subprocess.TimeoutExpired:
                consumer.kill()
        if relay is not None and relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(40)
            except subprocess.TimeoutExpired:
                relay.kill()
        if started_sandbox:
            print("stopping the sandbox servers ...", flush=True)
            sandbox.down(REPO / ".sandbox")


def _finish_warehouse(conn: psycopg.Connection[Any], env: dict[str, str], written: int) -> bool:
    """Wait for the warehouse to take every event, show its stock, then audit source vs inbox."""
    deadline = time.monotonic() + 60
    taken = 0
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM cdc_relay_inbox").fetchone()
        taken = int(row[0]) if row else 0
        if taken >= written:
            break
        time.sleep(0.2)
    stock = conn.execute("SELECT sku, reserved FROM warehouse_stock ORDER BY sku").fetchall()
    print(
        f"warehouse took {taken} events; stock reserved: " + ", ".join(f"{s}={r}" for s, r in stock)
    )
    audit = subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", "audit", "--since", "1h", "--settle", "0s"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    print("cdc-relay audit:", audit.stdout.strip() or audit.stderr.strip())
    return audit.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
