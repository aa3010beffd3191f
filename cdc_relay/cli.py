"""Command line: argv → Config → command.

Operators meet the relay here first, so every failure they can cause (a bad setting, a missing
slot, a wrong password) ends in one readable line and a distinct exit code, never a traceback:
2 for configuration, 1 for anything else that stopped the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cdc_relay import (
    __version__,
    backfill,
    catalog,
    config,
    logs,
    partitions,
    replay,
    retained,
    retention,
)
from cdc_relay.errors import ConfigError, RelayError
from cdc_relay.signals import StopSignal

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

DESCRIPTION = """\
cdc-relay streams committed outbox rows from PostgreSQL's WAL (logical replication, pgoutput)
to RabbitMQ with publisher confirms, and advances the replication slot only after the broker has
confirmed every event before that point: nothing committed is lost, duplicates after a crash
carry the same message_id, and order per aggregate holds.

quick start:
  export CDC_RELAY_PG_DSN=postgresql://relay:secret@localhost/app
  export CDC_RELAY_AMQP_URL=amqp://guest:guest@localhost:5672/%2F
  cdc-relay init --create-outbox     # outbox table, publication, slot (idempotent)
  cdc-relay run                      # the daemon; SIGTERM stops it cleanly
"""


PRUNE_EXAMPLES = """\
examples:
  cdc-relay prune --older-than 7d            # keep a week of rows for replay and audits
  cdc-relay prune --older-than 30d --dry-run # how many rows a prune would delete

"""


BACKFILL_EXAMPLES = """\
examples:
  cdc-relay init --backfill          # new slot; publish the rows already in the outbox first
  cdc-relay init --backfill          # again after a crash or SIGTERM: continues where it was
  cdc-relay init --create-outbox --partitions 4   # outbox_table = public.outbox: the table
                                     # partitioned by hash of the aggregate id into outbox_p0..p3,
                                     # and how to split the partitions over relays
  cdc-relay init --create-outbox --partitions 4   # with one relay's config listing some of
                                     # them: the same table if missing, then its publication, slot

"""

RECOVER_EXAMPLES = """\
examples:
  cdc-relay recover --since 2026-11-28T09:00:00Z   # slot lost: re-send rows from 09:00 on
  cdc-relay recover --since 6h                     # rows of the last six hours

"""

REPLAY_EXAMPLES = """\
examples:
  cdc-relay replay --since 2026-11-28T09:00Z --until 2026-11-28T10:00Z
  cdc-relay replay --aggregate-type order --aggregate-id 4711
  cdc-relay replay --ids lost-ids.txt           # one id per line
  cdc-relay replay --since 1h --dry-run         # how many rows it would send

"""


CONSUME_EXAMPLES = """\
examples:
  cdc-relay consume --init --queue warehouse            # create the inbox tables
  cdc-relay consume --queue warehouse --handler warehouse.apply:on_event

"""


AUDIT_EXAMPLES = """\
examples:
  cdc-relay audit --since 1h                      # the last hour, in 1-minute windows
  cdc-relay audit --since 2026-11-28T00:00Z --until 2026-11-29T00:00Z --window 15m --json
  cdc-relay audit --since 1h --repair             # re-send what the consumer misses

"""


def _epilog() -> str:
    return (
        "settings (TOML key, then environment variable; the environment wins; "
        "CDC_RELAY_<KEY>_FILE reads a value from a file, e.g. a mounted secret):\n"
        + config.describe_settings()
        + "\n\nexit codes: 0 ok, 1 failure (message says why), 2 invalid configuration"
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with settings (top level or under [relay])",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (setting log_level)",
    )
    common.add_argument(
        "--log-format", choices=["json", "logfmt"], help="log format (setting log_format)"
    )
    parser = argparse.ArgumentParser(
        prog="cdc-relay",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"cdc-relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "run",
        parents=[common],
        formatter_class=fmt,
        epilog=_epilog(),
        help="stream outbox events to RabbitMQ until SIGTERM/SIGINT",
        description="Run the relay daemon. Reconnects to either side with backoff. On "
        "SIGTERM/SIGINT it finishes the open transaction, waits (stop_timeout) for broker "
        "confirms, reports the final position and exits 0, so a restart re-sends nothing.",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "init",
        parents=[common],
        formatter_class=fmt,
        epilog=BACKFILL_EXAMPLES + _epilog(),
        help="create publication and slot (idempotent); --backfill: publish existing rows",
        description="Create the publication (outbox table only, inserts and truncates) and the "
        "pgoutput slot if they are missing. Safe to run any number of times. A slot it creates "
        "is recorded in the publication's comment, so `run` (even with create_slot) refuses to "
        "replace it if it is ever lost; running init is how an operator re-creates a lost slot "
        "deliberately, after reconciling from the outbox table.",
    )
    p.add_argument(
        "--create-outbox",
        action="store_true",
        help="also create the outbox table (same DDL as sql/outbox.sql) if it is missing",
    )
    p.add_argument(
        "--backfill",
        action="store_true",
        help="create the slot with an exported snapshot and publish (with confirms) every "
        "outbox row committed before it, ordered by created_at then id, marked "
        "source.snapshot = true; then `run` streams what follows. Interrupted, it continues "
        "on the next `init --backfill` or `run`",
    )
    p.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="create the outbox partitioned by hash of the aggregate id into N partitions "
        "<table>_p0 .. <table>_p{N-1} (idempotent; an existing table of another shape is "
        "refused). With outbox_table naming the root, only the table is created and a split "
        "over relays is printed; with a relay's config listing some partitions, its "
        "publication and slot follow",
    )
    p.add_argument(
        "--relays",
        type=int,
        metavar="M",
        help="with --partitions: print the split of the partitions over M relays (default 2)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "status",
        parents=[common],
        formatter_class=fmt,
        epilog=_epilog(),
        help="show the slot: active, confirmed_flush_lsn, lag, wal_status",
        description="Show the slot's state and how far it lags the server's WAL.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "drop",
        parents=[common],
        formatter_class=fmt,
        epilog=_epilog(),
        help="remove the slot and the publication",
        description="Drop the slot and the publication. Events not yet relayed stay in the "
        "outbox table but will no longer be streamed. Requires --yes.",
    )
    p.add_argument("--yes", action="store_true", help="confirm the drop")
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser(
        "prune",
        parents=[common],
        formatter_class=fmt,
        epilog=PRUNE_EXAMPLES + _epilog(),
        help="delete outbox rows older than a duration, in small batches",
        description="Delete outbox rows whose created_at is older than --older-than, in short "
        "batches that lock only their own rows, so it is safe to run (e.g. from cron) while the "
        "relay streams and the application writes: the relay reads events from the WAL, never "
        "from the table, so pruning a committed row never loses its event. Rows kept longer "
        "serve replay, recovery and audits; rows you never need again can instead be deleted "
        "in the same transaction that inserts them.",
    )
    p.add_argument(
        "--older-than",
        required=True,
        metavar="DURATION",
        help="age of the rows to delete, by created_at: 7d, 12h, 90m, 30s, 1d12h",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=retention.DEFAULT_BATCH,
        metavar="ROWS",
        help=f"rows per delete transaction (default {retention.DEFAULT_BATCH})",
    )
    p.add_argument("--dry-run", action="store_true", help="count the rows, delete nothing")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "recover",
        parents=[common],
        formatter_class=fmt,
        epilog=RECOVER_EXAMPLES + _epilog(),
        help="replace a lost slot and re-send the retained rows it may not have relayed",
        description="For a slot that is lost (wal_status = lost, dropped, or missing after a "
        "failover or restore): drop the invalidated slot, create a new one with an exported "
        "snapshot, publish (with confirms) every retained outbox row of time TIMESTAMP or "
        "later in that snapshot, then leave the slot to `run`, which streams everything after "
        "it. A row's time is its commit time when track_commit_timestamp is on, else its "
        "created_at. Choose TIMESTAMP at or before the last event you know was delivered: "
        "rows delivered before are sent again with the same message_id (consumers dedupe), "
        "rows older than TIMESTAMP are not sent. Rows already pruned cannot be recovered.",
    )
    p.add_argument(
        "--since",
        metavar="TIMESTAMP",
        help="ISO 8601 time (no zone: UTC), or a duration ago such as 6h or 1d12h; left out, "
        "recover prints the time it suggests (from the relay's last recorded confirmed commit) "
        "and exits 2",
    )
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser(
        "replay",
        parents=[common],
        formatter_class=fmt,
        epilog=REPLAY_EXAMPLES + _epilog(),
        help="publish retained outbox rows again (same message_id), e.g. after a queue purge",
        description="Publish selected rows of the outbox table again, as the same events: "
        "same message_id, routing key, headers and envelope, plus the header "
        "x-cdc-relay-replay (this replay's id) and source.snapshot = true with positions 0/0 "
        "(a row's WAL position is not in the table). Filters combine (AND); at least one, or "
        "--all, is required. The slot is not touched, so it is safe beside a running relay. "
        "Exit 0 only when the broker confirmed every selected row.",
    )
    p.add_argument("--since", metavar="TIMESTAMP", help="rows of this time or later")
    p.add_argument("--until", metavar="TIMESTAMP", help="rows before this time")
    p.add_argument("--aggregate-type", metavar="TYPE", help="rows of this aggregate type")
    p.add_argument("--aggregate-id", metavar="ID", help="rows of this aggregate id")
    p.add_argument("--ids", type=Path, metavar="FILE", help="rows whose id is listed, one per line")
    p.add_argument("--all", action="store_true", help="every retained row")
    p.add_argument("--dry-run", action="store_true", help="print how many rows, send nothing")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "consume",
        parents=[common],
        formatter_class=fmt,
        epilog=CONSUME_EXAMPLES + _epilog(),
        help="apply events from a queue exactly once, in order per aggregate (inbox consumer)",
        description="Consume a queue with manual acks and calls HANDLER(event, conn) for each "
        "event inside a transaction on the consumer's own database (inbox_dsn) that also "
        "records the event's id in the inbox table (sql/inbox.sql); commits, then acks. A "
        "redelivered or replayed id is acked without calling the handler; an event older than "
        "one applied for its aggregate follows ordering_policy; a handler that keeps raising, "
        "or a body that is not an envelope, goes to dead_letter_exchange. Needs amqp_url and "
        "inbox_dsn (not pg_dsn). SIGTERM stops after the message in hand.",
    )
    p.add_argument("--queue", required=True, metavar="NAME", help="the queue to consume")
    p.add_argument(
        "--handler",
        metavar="MODULE:FUNCTION",
        help="called as FUNCTION(event: EnvelopeV1, conn: psycopg.Connection) per event",
    )
    p.add_argument(
        "--init", action="store_true", help="create the inbox tables (sql/inbox.sql) and exit"
    )
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser(
        "audit",
        parents=[common],
        formatter_class=fmt,
        epilog=AUDIT_EXAMPLES + _epilog(),
        help="compare what the source committed with what a consumer applied, window by window",
        description="Compare the retained outbox rows (pg_dsn) with a consumer's inbox "
        "(inbox_dsn), in windows of created_at: counts and an order-independent hash per "
        "window; windows that differ list the missing and unexpected ids. The newest --settle "
        "leaves in-flight events out. Exit 0: they agree; 1: drift; 2: usage error. --repair "
        "re-publishes the missing ids (replay: same message ids; needs amqp_url), waits for "
        "the consumer to take them, and audits again.",
    )
    p.add_argument("--since", required=True, metavar="TIMESTAMP", help="ISO 8601 or 6h (ago)")
    p.add_argument("--until", metavar="TIMESTAMP", help="end of the audit (default: now)")
    p.add_argument("--window", default="1m", metavar="DURATION", help="window size (1m)")
    p.add_argument("--settle", default="10s", metavar="DURATION", help="leave out the newest (10s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repair", action="store_true", help="re-publish missing ids, audit again")
    p.add_argument(
        "--source",
        choices=("auto", "outbox", "ledger"),
        default="auto",
        help="the source side: the retained outbox rows, or the delivery ledger (names "
        "transactions, not ids; cannot repair); auto: the ledger when ledger = true",
    )
    p.set_defaults(func=cmd_audit)
    return parser


def _load(args: argparse.Namespace) -> config.Config:
    required = {
        "consume": config.CONSUMER_REQUIRED,
        "audit": ("pg_dsn", "inbox_dsn"),
    }.get(args.command, config.REQUIRED)
    return config.load(
        args.config,
        overrides={"log_level": args.log_level, "log_format": args.log_format},
        required=required,
    )


def cmd_run(cfg: config.Config, _args: argparse.Namespace) -> int:
    from cdc_relay.daemon import Relay

    return Relay(cfg).run()


def cmd_init(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.relays is not None and args.partitions is None:
        raise ConfigError("relays", "--relays only goes with --partitions")
    if args.partitions is not None and _init_partitions(cfg, args.partitions, args.relays):
        return EXIT_OK
    if args.backfill:
        stop = StopSignal()
        stop.install()
        result = backfill.start(
            cfg, create_outbox=args.create_outbox, stop=stop, progress=_progress_display()
        )
        if result is None:
            print(
                f"nothing to backfill: slot {cfg.slot} exists and has no backfill pending "
                "(to send retained rows again, use `cdc-relay replay`)"
            )
            _init_ledger(cfg)
            return EXIT_OK
        _init_ledger(cfg)
        return _backfilled(result, "init --backfill")
    done = catalog.init(cfg, create_outbox=args.create_outbox)
    for line in done or ["nothing to do: outbox, publication and slot exist"]:
        print(line)
    _init_ledger(cfg)
    return EXIT_OK


def _init_partitions(cfg: config.Config, count: int, relays: int | None) -> bool:
    """Create the partitioned outbox; True when that is all ``init`` does (outbox_table names
    only roots: a relay over the root is one ``init`` without --partitions away, members each
    run their own)."""
    relays = min(2, count) if relays is None else relays
    partitions.check_count(count, relays)
    made = catalog.create_partitioned(cfg, count)
    for line in made or [f"nothing to create: the outbox has its {count} partitions"]:
        print(line)
    if any(partitions.parse_partition(name) for _, name in cfg.tables):
        return False  # a member's config: its publication and slot next
    for schema, root in partitions.roots(cfg.tables, count):
        for line in partitions.plan(schema, root, count, relays):
            print(line)
    print(
        "no publication or slot created: outbox_table names the root. Run `cdc-relay init` "
        "with each relay's config, or once more with this one without --partitions for a "
        "single relay over every partition"
    )
    return True


def _init_ledger(cfg: config.Config) -> None:
    if not cfg.ledger:
        return
    from cdc_relay import ledger

    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "creating the delivery ledger"):
        ledger.setup(conn, cfg)
    print(f"delivery ledger ready: {cfg.outbox_schema}.{ledger.TABLE}")


def _backfilled(result: backfill.Result, again: str) -> int:
    for line in result.lines:
        print(line)
    if not result.complete:
        print(
            f"cdc-relay: backfill stopped after {result.rows} confirmed rows; `cdc-relay "
            f"{again}` or `cdc-relay run` continues it (nothing is lost meanwhile: the slot "
            "keeps every later change)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _progress_display() -> backfill.OnProgress:
    """A bar on a terminal; otherwise a structured log line every 5 s."""
    log = logging.getLogger("cdc_relay.backfill")
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(p: backfill.Progress) -> None:
        now = time.monotonic()
        finished = not p.table
        if now - last[0] < (0.2 if tty else 5.0) and not finished:
            return
        last[0] = now
        rate = p.rows / p.elapsed if p.elapsed > 0 else 0.0
        if tty:
            share = p.rows / p.total if p.total else 1.0
            bar = "#" * int(share * 30)
            sys.stderr.write(
                f"\rbackfill [{bar:<30}] {share:4.0%} {p.rows:,}/{p.total:,} rows "
                f"{rate:,.0f}/s" + ("\n" if finished else "")
            )
            sys.stderr.flush()
        else:
            log.info(
                "backfill progress",
                extra={
                    "rows": p.rows,
                    "total": p.total,
                    "table": p.table,
                    "rows_per_s": round(rate),
                },
            )

    return show


def cmd_recover(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.since is None:
        found = backfill.suggested_since(cfg)
        hint = (
            "the relay recorded nothing to suggest one from: use the committed_at of the last "
            "event your consumers have"
            if found is None
            else f"suggested: --since {found[0].strftime('%Y-%m-%dT%H:%M:%SZ')} ({found[1]})"
        )
        raise ConfigError("since", f"recover needs --since TIMESTAMP; {hint}")
    since = parse_time(args.since, "since")
    stop = StopSignal()
    stop.install()
    result = backfill.recover(cfg, since, stop=stop, progress=_progress_display())
    code = _backfilled(result, f"recover --since {since.isoformat()}")
    if code == EXIT_OK:
        print(f"recovered: start (or restart) `cdc-relay run` to stream slot {cfg.slot}")
    return code


def cmd_replay(cfg: config.Config, args: argparse.Namespace) -> int:
    ids = None
    if args.ids is not None:
        try:
            text = args.ids.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("ids", f"cannot read {args.ids}: {exc}") from None
        ids = tuple(line.strip() for line in text.splitlines() if line.strip())
    selection = retained.Selection(
        since=None if args.since is None else parse_time(args.since, "since"),
        until=None if args.until is None else parse_time(args.until, "until"),
        aggregate_type=args.aggregate_type,
        aggregate_id=args.aggregate_id,
        ids=ids,
    )
    if selection == retained.Selection() and not args.all:
        raise ConfigError(
            "replay",
            "say which rows: --since/--until, --aggregate-type/--aggregate-id, --ids, "
            "or --all for every retained row",
        )
    stop = StopSignal()
    stop.install()

    def progress(confirmed: int, selected: int) -> None:
        logging.getLogger("cdc_relay.replay").info(
            "replay progress", extra={"confirmed": confirmed, "selected": selected}
        )

    done = replay.replay(cfg, selection, dry_run=args.dry_run, stop=stop, progress=progress)
    what = selection.describe()
    if done.dry_run:
        print(f"would replay {done.selected} rows ({what})")
        return EXIT_OK
    line = (
        f"replay {done.replay_id}: {done.confirmed} of {done.selected} rows confirmed ({what})"
        + (f", {done.diverted} to the dead-letter exchange" if done.diverted else "")
    )
    if done.complete:
        print(line)
        return EXIT_OK
    reason = f": {config.redact(str(done.error))}" if done.error else " (stopped)"
    print(f"cdc-relay: {line}{reason}; run it again to send the rest", file=sys.stderr)
    return EXIT_FAILURE


def cmd_consume(cfg: config.Config, args: argparse.Namespace) -> int:
    from cdc_relay import consumer

    if args.init:
        consumer.open_inbox(cfg).close()
        print(
            "inbox tables ready: cdc_relay_inbox, cdc_relay_inbox_positions, cdc_relay_inbox_parked"
        )
        return EXIT_OK
    if not args.handler:
        raise ConfigError("handler", "consume needs --handler MODULE:FUNCTION (or --init)")
    from cdc_relay.health import HealthServer
    from cdc_relay.telemetry import Stats, Tracing, tracing_requested

    handler = consumer.load_handler(args.handler)
    stop = StopSignal()
    stop.install()
    log = logging.getLogger("cdc_relay.consumer")
    stats, metrics = Stats(), consumer.ConsumerMetrics(args.queue)
    tracing = Tracing(tracing_requested())
    health = None
    if cfg.http_address:
        health = HealthServer(cfg.http_address, stats, metrics, cfg.health_timeout).start()
    checker = None
    if cfg.audit_interval:
        from cdc_relay import audit

        if not cfg.pg_dsn:
            raise ConfigError("pg_dsn", "audit_interval audits against the source: set pg_dsn")
        drift = consumer.DriftAlert(metrics)
        checker = audit.PeriodicAudit(cfg, drift.report, drift.error).start()
    delay = cfg.reconnect_min
    from cdc_relay.brokers import Brokers

    brokers = Brokers(cfg.amqp_url, cfg.amqp_shuffle)  # the rotation outlives a session
    try:
        while not stop.requested:
            worker = consumer.Consumer(
                cfg, args.queue, handler, stop, stats, metrics, tracing, brokers
            )
            try:
                worker.run()
            except RelayError as err:
                if not err.retryable:
                    raise
                stats.consecutive_failures += 1
                log.warning("consumer retrying after failure", extra={"error": str(err)})
                stop.wait(delay)
                delay = min(cfg.reconnect_max, delay * 2)
                continue
            break
    finally:
        if checker is not None:
            checker.stop()
        if health is not None:
            health.stop()
        tracing.shutdown()
    return EXIT_OK


def cmd_audit(cfg: config.Config, args: argparse.Namespace) -> int:
    from cdc_relay import audit

    since = parse_time(args.since, "since")
    until = None if args.until is None else parse_time(args.until, "until")
    window = retention.parse_duration(args.window, "window")
    settle = retention.parse_duration(args.settle, "settle")
    if args.repair and not cfg.amqp_url:
        raise ConfigError("amqp_url", "--repair publishes: set amqp_url")
    source = args.source if args.source != "auto" else ("ledger" if cfg.ledger else "outbox")
    report = audit.audit(cfg, since, until, window, settle, source)
    if args.repair and source == "ledger" and report.drift:
        print(
            "repair: the ledger keeps no ids to re-publish; if the outbox still holds the rows, "
            "run audit --source outbox --repair"
        )
    if args.repair and report.missing:
        missing = report.missing
        done = replay.replay(cfg, retained.Selection(ids=missing))
        print(f"repair: replayed {done.confirmed} of {len(missing)} missing events")
        if not audit.wait_taken(cfg, missing, timeout=120):
            print("repair: the consumer has not taken them all after 120 s (is it running?)")
        report = audit.audit(cfg, since, until, window, settle, source)
    _print_audit(report, args.json)
    return EXIT_OK if not report.drift else EXIT_FAILURE


def _print_audit(report: Any, as_json: bool) -> None:
    drift = report.drift
    if as_json:
        print(
            json.dumps(
                {
                    "source": report.source,
                    "since": report.since.isoformat(),
                    "until": report.until.isoformat(),
                    "window_s": report.window.total_seconds(),
                    "windows": len(report.windows),
                    "agree": not drift,
                    "drift": [
                        {
                            "window": w.start.isoformat(),
                            "source": w.source_count,
                            "inbox": w.inbox_count,
                            "missing": list(w.missing),
                            "unexpected": list(w.unexpected),
                            "held_by_ordering_guard": list(w.held),
                            "transactions": [
                                {
                                    "commit_lsn": t.commit_lsn,
                                    "source": t.source_count,
                                    "inbox": t.inbox_count,
                                }
                                for t in w.transactions
                            ],
                        }
                        for w in drift
                    ],
                }
            )
        )
        return
    total = sum(w.source_count for w in report.windows)
    print(
        f"audited {len(report.windows)} windows of {report.window.total_seconds():g} s, "
        f"{total} source events ({report.source}), {report.since.isoformat()} .. "
        f"{report.until.isoformat()}: " + ("agree" if not drift else f"{len(drift)} windows differ")
    )
    for w in drift:
        print(
            f"  {w.start.isoformat()}: source {w.source_count}, inbox {w.inbox_count}; "
            f"missing {', '.join(w.missing) or '-'}; unexpected {', '.join(w.unexpected) or '-'}"
            + (
                f"; taken but skipped or parked by the ordering guard: {', '.join(w.held)} "
                "(apply them with ordering_policy = apply, or see cdc_relay_inbox_parked)"
                if w.held
                else ""
            )
        )
        for t in w.transactions:
            print(
                f"    transaction {t.commit_lsn}: source {t.source_count} events, "
                f"inbox {t.inbox_count} applied"
                + (" (or other ids)" if t.source_count == t.inbox_count else "")
            )


def parse_time(text: str, setting: str) -> dt.datetime:
    """An ISO 8601 time (no zone means UTC) or a duration ago (``6h``, ``1d12h``)."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            ago = retention.parse_duration(text, setting)
        except ConfigError:
            raise ConfigError(
                setting,
                f"not a time (expected ISO 8601 such as 2026-11-28T09:00:00Z) or a "
                f"duration ago (such as 6h): {text!r}",
            ) from None
        return dt.datetime.now(dt.UTC) - ago
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    st = catalog.status(cfg)
    data: dict[str, Any] = {
        "slot": st.slot,
        "exists": st.exists,
        "active": st.active,
        "active_pid": st.active_pid,
        "confirmed_flush_lsn": None
        if st.confirmed_flush_lsn is None
        else str(st.confirmed_flush_lsn),
        "current_wal_lsn": str(st.current_wal_lsn),
        "lag_bytes": st.lag_bytes,
        "wal_status": st.wal_status,
        "plugin": st.plugin,
        "database": st.database,
        "publication": cfg.publication,
        "publication_exists": st.publication_exists,
        "publication_tables": list(st.publication_tables),
    }
    if args.json:
        print(json.dumps(data))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            shown = (", ".join(value) or "-") if isinstance(value, list) else value
            print(f"{key:<{width}}  {'-' if shown is None else shown}")
    return EXIT_OK if st.exists else EXIT_FAILURE


def cmd_drop(cfg: config.Config, args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            "cdc-relay: drop needs --yes (it removes the slot and the publication)", file=sys.stderr
        )
        return EXIT_CONFIG
    for line in catalog.drop(cfg) or ["nothing to drop"]:
        print(line)
    return EXIT_OK


def cmd_prune(cfg: config.Config, args: argparse.Namespace) -> int:
    older_than = retention.parse_duration(args.older_than)
    log = logging.getLogger("cdc_relay.prune")
    last = [0.0]

    def progress(table: str, rows: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:  # a line a second at most
            last[0] = now
            log.info("pruning", extra={"table": table, "deleted": rows})

    for done in retention.prune(
        cfg, older_than, batch=args.batch, dry_run=args.dry_run, progress=progress
    ):
        verb = "would delete" if done.dry_run else "deleted"
        print(
            f"{done.table}: {verb} {done.rows} rows with {done.column} before "
            f"{done.cutoff.isoformat()}" + ("" if done.dry_run else f" ({done.batches} batches)")
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        cfg = _load(args)
    except ConfigError as err:
        print(f"cdc-relay: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        return int(args.func(cfg, args))
    except ConfigError as err:
        print(f"cdc-relay: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RelayError as err:
        logging.getLogger("cdc_relay").debug("command failed", exc_info=True)
        print(f"cdc-relay: {config.redact(str(err))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
