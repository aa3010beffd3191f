"""Command line: argv → Config → command.

Operators meet the relay here first, so every failure they can cause (a bad setting, a missing
slot, a wrong password) ends in one readable line and a distinct exit code, never a traceback:
2 for configuration, 1 for anything else that stopped the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cdc_relay import __version__, catalog, config, logs, retention
from cdc_relay.errors import ConfigError, RelayError

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


def _epilog() -> str:
    return (
        "settings (TOML key, then environment variable; the environment wins):\n"
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
        epilog=_epilog(),
        help="create publication and slot (idempotent)",
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
    return parser


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(
        args.config, overrides={"log_level": args.log_level, "log_format": args.log_format}
    )


def cmd_run(cfg: config.Config, _args: argparse.Namespace) -> int:
    from cdc_relay.daemon import Relay

    return Relay(cfg).run()


def cmd_init(cfg: config.Config, args: argparse.Namespace) -> int:
    done = catalog.init(cfg, create_outbox=args.create_outbox)
    for line in done or ["nothing to do: outbox, publication and slot exist"]:
        print(line)
    return EXIT_OK


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
