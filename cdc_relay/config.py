"""Configuration: one frozen value built from a TOML file and ``CDC_RELAY_*`` variables.

Every setting has a TOML key (``slot``) and an environment variable (``CDC_RELAY_SLOT``); the
environment wins so that a container can override a baked-in file. Validation happens once, at
load time, and a bad value becomes a ``ConfigError`` naming the setting — the daemon never finds
out at 3 a.m. that a template refers to a column that does not exist.
"""

from __future__ import annotations

import math
import os
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from cdc_relay.errors import ConfigError

ENV_PREFIX = "CDC_RELAY_"
_NAME_RE = re.compile(r"^[a-z0-9_]{1,63}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
ROUTING_FIELDS = ("aggregatetype", "aggregateid", "type")


class Route(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-table destination overrides (several outbox tables, one per bounded context)."""

    exchange: str | None = None
    routing_key: str | None = None


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """All settings of the relay. Field docs feed ``cdc-relay --help``."""

    pg_dsn: str = ""  # required by every command but `consume` (see REQUIRED)
    amqp_url: str = ""
    amqp_shuffle: bool = False
    slot: str = "cdc_relay"
    publication: str = "cdc_relay"
    outbox_table: str = "public.outbox"
    exchange: str = "outbox"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    declare_exchange: bool = True
    routing_key: str = "{aggregatetype}.{type}"
    create_slot: bool = False
    backfill: bool = False
    max_in_flight: int = 2000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    max_in_flight_per_aggregate: int = 0
    status_interval: float = 10.0
    flush_delay: float = 0.05
    stop_timeout: float = 30.0
    replication_timeout: float = 30.0
    publication_check_interval: float = 10.0
    amqp_heartbeat: int = 30
    reconnect_min: float = 0.5
    reconnect_max: float = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "logfmt"] = "json"
    column_id: str = "id"
    column_aggregate_type: str = "aggregatetype"
    column_aggregate_id: str = "aggregateid"
    column_type: str = "type"
    column_payload: str = "payload"
    column_headers: str = "headers"
    column_traceparent: str = "traceparent"
    column_created_at: str = "created_at"
    alternate_exchange: bool = True
    unroutable_queue_type: Literal["quorum", "classic"] = "quorum"
    dead_letter_exchange: str = ""
    invalid_event_policy: Literal["halt", "dead_letter"] = "halt"
    max_message_size: int = 16 * 1024 * 1024
    http_address: str = "127.0.0.1:9187"
    health_timeout: float = 60.0
    alert_latency: float = 5.0
    logical_messages: bool = True
    message_prefix: str = "outbox"
    routes: dict[str, Route] = msgspec.field(default_factory=dict)
    ledger: bool = False
    inbox_dsn: str = ""
    consumer_prefetch: int = 300
    consumer_batch: int = 200
    handler_retries: int = 3
    ordering_policy: Literal["skip", "apply", "park"] = "skip"
    audit_interval: float = 0.0
    audit_lookback: float = 3600.0
    audit_window: float = 60.0
    audit_settle: float = 30.0

    @property
    def tables(self) -> tuple[tuple[str, str], ...]:
        """Every outbox table as (schema, name); ``outbox_table`` may list several."""
        return tuple(split_table(t.strip()) for t in self.outbox_table.split(","))

    @property
    def outbox_schema(self) -> str:
        return self.tables[0][0]

    @property
    def outbox_name(self) -> str:
        return self.tables[0][1]

    def columns(self, key: str) -> tuple[str, ...]:
        """Accepted names of one outbox column: ``column_type = "type,event_type"`` lets a
        rename be bridged (WAL written before and after the rename both map)."""
        return tuple(n.strip() for n in getattr(self, f"column_{key}").split(","))

    def route(self, schema: str, table: str) -> tuple[str, str]:
        """(exchange, routing-key template) for events of one outbox table."""
        r = self.routes.get(f"{schema}.{table}")
        if r is None:
            return self.exchange, self.routing_key
        return r.exchange or self.exchange, r.routing_key or self.routing_key


HELP: dict[str, str] = {
    "pg_dsn": "PostgreSQL connection string (URL or key=value); the role needs REPLICATION",
    "amqp_url": "RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2F; several nodes of a cluster "
    "as comma-separated URLs (or a TOML list): the first that answers is used, the next after "
    "a connection loss",
    "amqp_shuffle": "shuffle the nodes of amqp_url once at start (spreads relays and consumers "
    "over a cluster's nodes)",
    "slot": "logical replication slot the relay owns (pgoutput); ^[a-z0-9_]{1,63}$",
    "publication": "publication covering the outbox table; ^[a-z0-9_]{1,63}$",
    "outbox_table": "outbox table, schema-qualified; several tables separated by commas",
    "exchange": "RabbitMQ exchange events are published to",
    "exchange_type": "exchange type used when declaring it: topic, direct, fanout, headers",
    "declare_exchange": "declare the exchange (durable) at start; false if it is managed elsewhere",
    "routing_key": "routing key template; fields: {aggregatetype} {aggregateid} {type}",
    "create_slot": "let `run` create a missing slot and publication (otherwise `init` does)",
    "backfill": "with create_slot: a slot `run` creates first publishes the rows already in the "
    "outbox (as `init --backfill` does), then streams",
    "max_in_flight": "unconfirmed messages allowed before the relay stops reading the WAL",
    "max_in_flight_bytes": "unconfirmed message bytes allowed before the relay stops reading "
    "the WAL (bounds memory when events are large)",
    "max_in_flight_per_aggregate": "0: pipeline freely; 1: hold an aggregate's next event "
    "until its previous one is confirmed, so a nack or return can never let a later event of "
    "that aggregate arrive first (costs throughput when one aggregate has many events in a row)",
    "status_interval": "seconds between standby status updates (keep below wal_sender_timeout)",
    "flush_delay": "seconds to wait after progress before reporting it (batches status updates)",
    "stop_timeout": "seconds a graceful stop waits for the open transaction and its confirms "
    "(give the container a grace period of stop_timeout + 5 s)",
    "replication_timeout": "seconds PostgreSQL may stay silent after the relay asked it for a "
    "reply before the replication connection counts as lost (detects half-open connections)",
    "publication_check_interval": "seconds between re-checks of the publication while "
    "streaming (one short query on a kept connection); the slot is never moved through idle "
    "WAL past the last check, so an idle outbox retains about this much WAL",
    "amqp_heartbeat": "AMQP heartbeat seconds (detects a half-open broker connection)",
    "reconnect_min": "first reconnect backoff in seconds",
    "reconnect_max": "largest reconnect backoff in seconds",
    "log_level": "debug, info, warning or error",
    "log_format": "json or logfmt",
    "column_id": "outbox column holding the event id (becomes message_id)",
    "column_aggregate_type": "outbox column holding the aggregate type",
    "column_aggregate_id": "outbox column holding the aggregate id",
    "column_type": "outbox column holding the event type",
    "column_payload": "outbox column holding the JSON payload",
    "column_headers": "optional outbox column with extra AMQP headers (JSON object)",
    "column_traceparent": "optional outbox column with a W3C traceparent",
    "column_created_at": "optional outbox column with the event time",
    "alternate_exchange": "declare <exchange>.unroutable (fanout + durable queue) as the "
    "exchange's alternate exchange, so events no binding matches are kept, not dropped",
    "unroutable_queue_type": "type of the <exchange>.unroutable queue the relay declares: "
    "quorum (replicated over a cluster's nodes, survives losing one) or classic; an existing "
    "queue of the other type is used as it is, with a warning",
    "dead_letter_exchange": "existing exchange for events the broker can never accept "
    "(larger than max_message_size, or invalid under invalid_event_policy = dead_letter); "
    "empty: such an event halts the relay",
    "invalid_event_policy": "a row that cannot become a faithful message (NULL id, id or "
    "type over 255 bytes, unusable headers, payload not JSON): halt (stop before it, name it) "
    "or dead_letter (publish the raw row and the reason to dead_letter_exchange, then go on)",
    "max_message_size": "largest message body in bytes the broker accepts (RabbitMQ's "
    "max_message_size; 16 MiB by default since RabbitMQ 4.0)",
    "http_address": "host:port for /metrics, /healthz and /readyz (empty: off)",
    "health_timeout": "seconds without a loop tick, or of failing retries that never move the "
    "slot, before /healthz fails",
    "alert_latency": "seconds of commit-to-confirm latency or replication lag that raise the "
    "propagation alert",
    "logical_messages": "also publish pg_logical_emit_message(true, message_prefix, json) events",
    "message_prefix": "prefix of logical decoding messages that are outbox events",
    "routes": 'per-table exchange/routing_key overrides: [relay.routes."schema.table"] '
    "(environment: a JSON object)",
    "ledger": "record each confirmed transaction (commit LSN, commit time, event count, a hash "
    "of its ids) in cdc_relay_ledger in the source database, for `audit` when outbox rows are "
    "deleted right after they are written",
    "inbox_dsn": "`consume`: the consumer's own PostgreSQL, where its inbox and its handler's "
    "writes live (required by `consume`)",
    "consumer_prefetch": "`consume`: unacknowledged messages the broker may send ahead",
    "consumer_batch": "`consume`: most events applied in one inbox transaction and acknowledged "
    "together (a batch is what has arrived; the consumer never waits to fill one)",
    "handler_retries": "`consume`: retries of a handler that raised (with backoff) before the "
    "message goes to dead_letter_exchange",
    "ordering_policy": "`consume`: an event older than one applied for its aggregate is "
    "skipped (counted), applied anyway, or parked for an operator (skip, apply, park)",
    "audit_interval": "`consume`: seconds between audits of the inbox against the source "
    "(pg_dsn: the outbox, or the ledger when ledger = true), with a metric and a warning on "
    "drift (0: off)",
    "audit_lookback": "`consume`: seconds of history each periodic audit covers",
    "audit_window": "`consume`: window of a periodic audit, seconds",
    "audit_settle": "`consume`: newest seconds a periodic audit leaves out (still in flight)",
}

REQUIRED = ("pg_dsn", "amqp_url")  # for the relay's commands; `consume` needs CONSUMER_REQUIRED
CONSUMER_REQUIRED = ("amqp_url", "inbox_dsn")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def split_table(name: str) -> tuple[str, str]:
    """``"public.outbox"`` → ``("public", "outbox")``; a bare name lives in ``public``."""
    parts = name.split(".")
    if len(parts) == 1:
        return "public", parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigError("outbox_table", f"expected schema.table, got {name!r}")


def _validate(cfg: Config, required: tuple[str, ...] = REQUIRED) -> None:
    for key in ("slot", "publication"):
        value = getattr(cfg, key)
        if not _NAME_RE.match(value):
            raise ConfigError(
                key, f"{value!r} is not a valid name: use 1-63 of a-z, 0-9 and _ only"
            )
    tables = cfg.tables
    for table in tables:
        for part in table:
            if not _IDENT_RE.match(part):
                raise ConfigError(
                    "outbox_table", f"{cfg.outbox_table!r}: {part!r} is not a plain SQL identifier"
                )
    if len(set(tables)) != len(tables):
        raise ConfigError("outbox_table", "lists the same table twice")
    for key in HELP:
        if key.startswith("column_"):
            for name in cfg.columns(key.removeprefix("column_")):
                if not _IDENT_RE.match(name):
                    raise ConfigError(key, f"{name!r} is not a plain SQL identifier")
    _check_template("routing_key", cfg.routing_key)
    _check_exchange("exchange", cfg.exchange)
    if cfg.amqp_url:
        from cdc_relay.brokers import Brokers  # it needs redact() from here

        Brokers(cfg.amqp_url)  # every node's URL and TLS files are checked now, not at 3 a.m.
    known = {f"{s}.{t}" for s, t in tables}
    for name, route in cfg.routes.items():
        if name not in known:
            raise ConfigError(
                "routes", f"{name!r} is not one of the outbox tables ({cfg.outbox_table})"
            )
        if route.routing_key is not None:
            _check_template("routes", route.routing_key)
        if route.exchange is not None:
            _check_exchange("routes", route.exchange)
    if not cfg.message_prefix:
        raise ConfigError("message_prefix", "must not be empty")
    for key in (
        "status_interval",
        "flush_delay",
        "stop_timeout",
        "reconnect_min",
        "reconnect_max",
        "health_timeout",
        "alert_latency",
        "replication_timeout",
        "publication_check_interval",
        "audit_interval",
        "audit_lookback",
        "audit_window",
        "audit_settle",
    ):
        if not math.isfinite(getattr(cfg, key)):
            raise ConfigError(key, "must be a finite number of seconds")
    positive = (
        "max_in_flight",
        "max_in_flight_bytes",
        "replication_timeout",
        "publication_check_interval",
        "status_interval",
        "stop_timeout",
        "reconnect_min",
        "max_message_size",
        "health_timeout",
        "alert_latency",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, "must be greater than 0")
    if cfg.max_in_flight_per_aggregate not in (0, 1):
        raise ConfigError(
            "max_in_flight_per_aggregate", "must be 0 (pipeline freely) or 1 (strict order)"
        )
    if cfg.invalid_event_policy == "dead_letter" and not cfg.dead_letter_exchange:
        raise ConfigError(
            "invalid_event_policy",
            "dead_letter needs dead_letter_exchange set to an existing exchange",
        )
    if cfg.flush_delay < 0:
        raise ConfigError("flush_delay", "must be 0 or more")
    if cfg.reconnect_max < cfg.reconnect_min:
        raise ConfigError("reconnect_max", "must be at least reconnect_min")
    if cfg.amqp_heartbeat < 0:
        raise ConfigError("amqp_heartbeat", "must be 0 (off) or more")
    if cfg.consumer_prefetch < 1:
        raise ConfigError("consumer_prefetch", "must be at least 1")
    if cfg.consumer_batch < 1:
        raise ConfigError("consumer_batch", "must be at least 1")
    if cfg.audit_interval < 0:
        raise ConfigError("audit_interval", "must be 0 (off) or more")
    for key in ("audit_lookback", "audit_window"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, "must be more than 0 seconds")
    if cfg.audit_settle < 0:
        raise ConfigError("audit_settle", "must be 0 or more")
    if cfg.handler_retries < 0:
        raise ConfigError("handler_retries", "must be 0 or more")
    for key in required:
        if not getattr(cfg, key).strip():
            raise ConfigError(key, f"is empty; set {env_name(key)} or {key} in the config file")


def _check_template(key: str, template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(key, f"bad template {template!r}: {exc}") from None
    for f in fields:
        if f not in ROUTING_FIELDS:
            raise ConfigError(key, f"unknown field {{{f}}}; use {', '.join(ROUTING_FIELDS)}")
    try:  # catches format specs and conversions that could never render
        template.format(**dict.fromkeys(ROUTING_FIELDS, "x"))
    except (ValueError, KeyError, IndexError) as exc:
        raise ConfigError(key, f"template cannot be rendered: {exc}") from None


def _check_exchange(key: str, name: str) -> None:
    if len(name.encode()) > 255:
        raise ConfigError(key, f"exchange name longer than 255 bytes: {name[:40]!r}...")


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    if "relay" not in data:
        return data
    section = data["relay"]
    if not isinstance(section, dict):
        raise ConfigError("--config", "[relay] must be a table")
    for key in data:
        if key != "relay":
            raise ConfigError(key, f"outside [relay] in {path}; put every setting under [relay]")
    return dict(section)


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    required: tuple[str, ...] = REQUIRED,
) -> Config:
    """Merge file < environment < explicit overrides, then validate.

    Keys may sit at the top level of the TOML file or under ``[relay]``.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = _from_file(path) if path is not None else {}
    for key in raw:
        if key not in HELP:
            raise ConfigError(key, f"unknown setting in {path}; see `cdc-relay --help`")
    for key in HELP:
        value = _from_env(env, key)
        if value is not None:
            raw[key] = _routes_from_env(value) if key == "routes" else value
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(raw.get("amqp_url"), list):  # the TOML list form of several nodes
        raw["amqp_url"] = ",".join(str(u) for u in raw["amqp_url"])
    for key in required:
        if key not in raw:
            raise ConfigError(key, f"is required; set {env_name(key)} or {key} in the config file")
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _named(exc) from None
    _validate(cfg, required)
    return cfg


def _from_env(env: Mapping[str, str], key: str) -> str | None:
    """``CDC_RELAY_<KEY>``, or the contents of the file ``CDC_RELAY_<KEY>_FILE`` names (the
    Docker and Kubernetes secrets convention; one trailing newline is dropped)."""
    name = env_name(key)
    value = env.get(name)
    path = env.get(f"{name}_FILE")
    if path is None:
        return value
    if value is not None:
        raise ConfigError(key, f"both {name} and {name}_FILE are set: keep one")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(key, f"{name}_FILE: cannot read {path}: {reason}") from None
    return text.removesuffix("\n").removesuffix("\r")


def _routes_from_env(value: str) -> Any:
    try:
        return msgspec.json.decode(value)
    except msgspec.DecodeError:
        raise ConfigError("routes", f"{env_name('routes')} is not a JSON object") from None


def _named(exc: msgspec.ValidationError) -> ConfigError:
    text = str(exc)
    m = re.search(r"at `\$\.(\w+)", text)
    key = m.group(1) if m else "config"
    problem = text.split(" - at ", maxsplit=1)[0]
    return ConfigError(key, f"{problem} (from {env_name(key)} or the config file)")


# ``scheme://user:password@host``: the user ends at the first ':' and the password runs, greedily,
# to the *last* '@' before the next whitespace, as ``urlparse`` (and so pika) splits the userinfo
# (``rpartition('@')``). Passwords with unencoded '@', ':' or '/' are hidden whole; an '@' later
# in the path or query hides more than needed, never less. Whitespace ends a URL.
_URL_PW = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:\s]*:)(?P<pw>\S*)@")
# ``password=...`` and ``sslpassword=...`` (no word boundary on purpose), bare or libpq-quoted;
# whatever sticks to a closing quote, and an unterminated quote to the end, is hidden too.
_KV_PW = re.compile(
    r"(?P<key>password\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*(?:'\S*|\\?\Z)|\S+)", re.IGNORECASE
)


def redact(text: str) -> str:
    """Hide passwords in URLs and key=value DSNs so errors can be logged safely."""
    text = _URL_PW.sub(lambda m: m.group("head") + "***@", text)
    return _KV_PW.sub(lambda m: m.group("key") + "***", text)


def describe_settings() -> str:
    """The settings table shown by ``--help``."""
    lines = []
    defaults = {f.name: f.default for f in msgspec.structs.fields(Config)}
    for key, text in HELP.items():
        default = "required" if key in REQUIRED else f"default {defaults[key]!r}"
        lines.append(f"  {key:<22} {env_name(key)}\n      {text} ({default})")
    return "\n".join(lines)
