"""Several RabbitMQ nodes in ``amqp_url``: parsing, the rotation over them, the TOML list."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cdc_relay import config
from cdc_relay.brokers import Brokers, split
from cdc_relay.errors import ConfigError


def test_urls_split_at_commas_before_a_scheme_only() -> None:
    assert split("amqp://a:5672/%2F, amqps://b:5671/v ,amqp://u:p@c/") == [
        "amqp://a:5672/%2F",
        "amqps://b:5671/v",
        "amqp://u:p@c/",
    ]
    # a comma inside a URL (a query value) is not a separator
    assert split("amqp://a/?client_properties=x,y") == ["amqp://a/?client_properties=x,y"]
    with pytest.raises(ConfigError, match="amqp_url"):
        split(" ")


def test_the_rotation_starts_at_the_node_after_a_lost_one() -> None:
    brokers = Brokers("amqp://a/,amqp://b/,amqp://c/")
    assert brokers.names == ["amqp://a:5672//", "amqp://b:5672//", "amqp://c:5672//"]
    assert brokers.order() == [0, 1, 2]
    brokers.connected(1)  # a did not answer, b did
    assert brokers.in_use == "amqp://b:5672//"
    assert brokers.order() == [1, 2, 0]  # a reconnect after a refusal elsewhere stays on b
    brokers.lost()
    assert brokers.in_use is None and brokers.order() == [2, 0, 1]
    brokers.connected(2)
    brokers.lost()
    assert brokers.order() == [0, 1, 2]  # wraps around


def test_shuffle_spreads_the_first_node_and_keeps_every_one() -> None:
    urls = ",".join(f"amqp://n{i}/" for i in range(6))
    firsts = {Brokers(urls, shuffle=True, rng=random.Random(seed)).names[0] for seed in range(30)}
    assert len(firsts) > 1
    shuffled = Brokers(urls, shuffle=True, rng=random.Random(1))
    assert sorted(shuffled.names) == sorted(Brokers(urls).names)


def test_names_never_carry_a_password() -> None:
    brokers = Brokers("amqp://relay:s3cret@a/,amqp://relay:s3cret@b/")
    assert all("s3cret" not in n for n in brokers.names)


def test_a_bad_node_url_is_named_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="amqp_url"):
        config.load(env={}, overrides={"pg_dsn": "x", "amqp_url": "amqp://a/,http://b/"})


def test_the_toml_list_form_is_the_comma_form(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\npg_dsn = "dbname=x"\namqp_url = ["amqp://a:5672/", "amqp://b:5673/"]\n'
    )
    cfg = config.load(path, env={})
    assert cfg.amqp_url == "amqp://a:5672/,amqp://b:5673/"
    assert Brokers(cfg.amqp_url).names == ["amqp://a:5672//", "amqp://b:5673//"]
