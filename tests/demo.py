"""`make demo`: watch supply-chain events flow from PostgreSQL through cdc-relay to RabbitMQ.

Starts a sandbox PostgreSQL + RabbitMQ under ``.sandbox/`` unless ``CDC_RELAY_PG_DSN`` and
``CDC_RELAY_AMQP_URL`` point at servers of your own, creates the outbox, starts the relay, then
writes orders the way an application would — business row and outbox row in one transaction —
and prints each event as a consumer receives it. Ctrl-C stops everything the demo started.
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, customer text, total numeric);
CREATE TABLE IF NOT EXISTS inventory (sku text PRIMARY KEY, on_hand int, reserved int);
CREATE TABLE IF NOT EXISTS shipments (id text PRIMARY KEY, order_id text, carrier text);
INSERT INTO inventory VALUES ('SKU-PALLET-01', 500, 0), ('SKU-CRATE-07', 80, 0)
ON CONFLICT DO NOTHING;
"""


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
            print(f"consumer bound queue {QUEUE!r} to exchange {exchange!r} with '#'\n")

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
        print(f"\n{received} events received for {written} written; stopping.")
        return 0 if received >= written else 1
    finally:
        if relay is not None and relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(40)
            except subprocess.TimeoutExpired:
                relay.kill()
        if started_sandbox:
            print("stopping the sandbox servers ...", flush=True)
            sandbox.down(REPO / ".sandbox")


if __name__ == "__main__":
    sys.exit(main())
