"""Several outbox tables, per-table routes and column aliases in the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_relay.config import load
from cdc_relay.errors import ConfigError

BASE = {"CDC_RELAY_PG_DSN": "postgresql://u@h/db", "CDC_RELAY_AMQP_URL": "amqp://h"}


def test_routes_from_toml(tmp_path: Path) -> None:
    f = tmp_path / "relay.toml"
    f.write_text(
        '[relay]\noutbox_table = "sales.outbox, billing.outbox"\n'
        '[relay.routes."billing.outbox"]\nexchange = "billing"\nrouting_key = "b.{type}"\n'
    )
    cfg = load(f, env=BASE)
    assert cfg.tables == (("sales", "outbox"), ("billing", "outbox"))
    assert cfg.route("sales", "outbox") == ("outbox", "{aggregatetype}.{type}")
    assert cfg.route("billing", "outbox") == ("billing", "b.{type}")


def test_routes_from_environment_json() -> None:
    env = {
        **BASE,
        "CDC_RELAY_OUTBOX_TABLE": "a.outbox,b.outbox",
        "CDC_RELAY_ROUTES": '{"b.outbox": {"exchange": "bx"}}',
    }
    cfg = load(None, env=env)
    assert cfg.route("b", "outbox") == ("bx", "{aggregatetype}.{type}")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CDC_RELAY_ROUTES": "not json"}, "routes"),
        ({"CDC_RELAY_ROUTES": '{"nope.outbox": {"exchange": "x"}}'}, "routes"),
        ({"CDC_RELAY_ROUTES": '{"public.outbox": {"routing_key": "{bad}"}}'}, "routes"),
        ({"CDC_RELAY_ROUTES": '{"public.outbox": {"colour": "red"}}'}, "routes"),
        ({"CDC_RELAY_OUTBOX_TABLE": "a.outbox,a.outbox"}, "outbox_table"),
        ({"CDC_RELAY_COLUMN_TYPE": "type,bad name"}, "column_type"),
        ({"CDC_RELAY_MESSAGE_PREFIX": ""}, "message_prefix"),
    ],
)
def test_bad_routes_and_aliases_name_the_setting(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(None, env={**BASE, **env})
    assert err.value.key == key


def test_column_aliases_are_listed_in_order() -> None:
    cfg = load(None, env={**BASE, "CDC_RELAY_COLUMN_TYPE": "type, event_type"})
    assert cfg.columns("type") == ("type", "event_type")
    assert cfg.columns("id") == ("id",)
