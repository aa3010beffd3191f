"""Configuration: TOML file < CDC_RELAY_* environment < overrides, validated at load time."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay import config
from cdc_relay.config import Config, describe_settings, env_name, load, redact
from cdc_relay.errors import ConfigError
from cdc_relay.retention import parse_duration

DSN = "postgresql://relay:pgsecret@db/app"
AMQP = "amqp://relay:mqsecret@mq:5672/%2F"
BASE_ENV = {"CDC_RELAY_PG_DSN": DSN, "CDC_RELAY_AMQP_URL": AMQP}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_env(**settings: str) -> Config:
    """Load from the environment only: the required URLs plus ``settings`` (key → text)."""
    env = dict(BASE_ENV)
    env.update({env_name(k): v for k, v in settings.items()})
    return load(None, env)


def config_error(**settings: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_env(**settings)
    return info.value


# --- sources and precedence ----------------------------------------------------------------------


def test_defaults_with_only_required_settings() -> None:
    cfg = load_env()
    assert cfg.pg_dsn == DSN
    assert cfg.amqp_url == AMQP
    assert cfg.slot == "cdc_relay"
    assert cfg.publication == "cdc_relay"
    assert cfg.outbox_table == "public.outbox"
    assert (cfg.outbox_schema, cfg.outbox_name) == ("public", "outbox")
    assert cfg.exchange == "outbox"
    assert cfg.routing_key == "{aggregatetype}.{type}"
    assert cfg.create_slot is False
    assert cfg.max_in_flight == 2000


def test_top_level_toml_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'pg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nslot = "from_file"\nmax_in_flight = 7\n',
    )
    cfg = load(path, {})
    assert cfg.pg_dsn == DSN
    assert cfg.slot == "from_file"
    assert cfg.max_in_flight == 7


def test_relay_section_toml_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[relay]\n"
        f'pg_dsn = "{DSN}"\n'
        f'amqp_url = "{AMQP}"\n'
        'outbox_table = "events.outbox"\n'
        "status_interval = 5\n"
        "create_slot = true\n",
    )
    cfg = load(path, {})
    assert cfg.outbox_schema == "events"
    assert cfg.outbox_name == "outbox"
    assert cfg.status_interval == 5.0
    assert isinstance(cfg.status_interval, float)
    assert cfg.create_slot is True


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'pg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nslot = "from_file"\n')
    cfg = load(path, {"CDC_RELAY_SLOT": "from_env"})
    assert cfg.slot == "from_env"
    assert cfg.pg_dsn == DSN  # untouched file values stay


def test_overrides_win_over_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'pg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nslot = "from_file"\n')
    cfg = load(path, {"CDC_RELAY_SLOT": "from_env"}, {"slot": "from_override"})
    assert cfg.slot == "from_override"


def test_none_overrides_are_ignored() -> None:
    cfg = load(None, {**BASE_ENV, "CDC_RELAY_SLOT": "from_env"}, {"slot": None})
    assert cfg.slot == "from_env"


def test_unrelated_environment_variables_are_ignored() -> None:
    cfg = load(None, {**BASE_ENV, "CDC_RELAY_NOT_A_SETTING": "x", "SLOT": "nope"})
    assert cfg.slot == "cdc_relay"


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in BASE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CDC_RELAY_EXCHANGE", "from_os_environ")
    assert load().exchange == "from_os_environ"


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("max_in_flight", "500", 500),
        ("amqp_heartbeat", "0", 0),
        ("create_slot", "true", True),
        ("create_slot", "false", False),
        ("declare_exchange", "false", False),
        ("status_interval", "2.5", 2.5),
        ("flush_delay", "0", 0.0),
        ("reconnect_max", "60", 60.0),
        ("log_level", "debug", "debug"),
        ("log_format", "logfmt", "logfmt"),
        ("exchange_type", "fanout", "fanout"),
    ],
)
def test_environment_strings_are_converted(key: str, text: str, value: object) -> None:
    got = getattr(load_env(**{key: text}), key)
    assert got == value
    assert type(got) is type(value)


def test_config_is_frozen() -> None:
    cfg = load_env()
    with pytest.raises(AttributeError):
        cfg.slot = "other"  # type: ignore[misc]


# --- every failure is a ConfigError naming the setting -------------------------------------------


@pytest.mark.parametrize("missing", ["pg_dsn", "amqp_url"])
def test_missing_required_setting(missing: str) -> None:
    env = {k: v for k, v in BASE_ENV.items() if k != env_name(missing)}
    with pytest.raises(ConfigError) as info:
        load(None, env)
    assert info.value.key == missing
    assert env_name(missing) in str(info.value)


@pytest.mark.parametrize("empty", ["pg_dsn", "amqp_url"])
def test_blank_required_setting(empty: str) -> None:
    err = config_error(**{empty: "   "})
    assert err.key == empty


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'pg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nslott = "typo"\n')
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert info.value.key == "slott"


def test_unknown_key_in_relay_section(tmp_path: Path) -> None:
    path = write(tmp_path, f'[relay]\npg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nbogus = 1\n')
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert info.value.key == "bogus"


def test_relay_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "relay = 5\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert info.value.key == "--config"


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("max_in_flight", "lots"),
        ("max_in_flight", "1.5"),
        ("amqp_heartbeat", ""),
        ("status_interval", "soon"),
        ("create_slot", "maybe"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
        ("exchange_type", "x-delayed"),
    ],
)
def test_unconvertible_environment_value(key: str, text: str) -> None:
    err = config_error(**{key: text})
    assert err.key == key
    assert env_name(key) in str(err)


def test_bad_type_in_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, f'pg_dsn = "{DSN}"\namqp_url = "{AMQP}"\nmax_in_flight = [1]\n')
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert info.value.key == "max_in_flight"


@pytest.mark.parametrize("key", ["slot", "publication"])
@pytest.mark.parametrize("name", ["Bad-Name", "x;drop", "a" * 64, "", "UPPER", "sp ace", "é"])
def test_bad_slot_or_publication_name(key: str, name: str) -> None:
    err = config_error(**{key: name})
    assert err.key == key


@pytest.mark.parametrize("key", ["slot", "publication"])
def test_longest_valid_name(key: str) -> None:
    assert getattr(load_env(**{key: "a" * 63}), key) == "a" * 63


@pytest.mark.parametrize(
    "table", ["a.b.c", '"x"', "public.", ".outbox", "1abc", "pub lic.outbox", "x;drop", "a" * 64]
)
def test_bad_outbox_table(table: str) -> None:
    err = config_error(outbox_table=table)
    assert err.key == "outbox_table"


def test_bare_outbox_table_lives_in_public() -> None:
    cfg = load_env(outbox_table="my_outbox")
    assert (cfg.outbox_schema, cfg.outbox_name) == ("public", "my_outbox")


@pytest.mark.parametrize("key", [k for k in config.HELP if k.startswith("column_")])
def test_bad_column_name(key: str) -> None:
    err = config_error(**{key: "bad-name"})
    assert err.key == key


@pytest.mark.parametrize(
    "template",
    [
        "{foo}",
        "{aggregatetype}.{foo}",
        "{}",
        "{0}",
        "{aggregatetype",
        "aggregatetype}",
        "{type}}",
        "{{type}",
        "{type.upper}",
        "{type[0]}",
    ],
)
def test_bad_routing_key_template(template: str) -> None:
    err = config_error(routing_key=template)
    assert err.key == "routing_key"


@pytest.mark.parametrize(
    "template",
    [
        # accepted by the field check today, but str.format can never render them
        "{type:d}",  # ValueError: Unknown format code 'd' for object of type 'str'
        "{type!x}",  # ValueError: Unknown conversion specifier x
        "{type:{foo}}",  # KeyError: 'foo' (nested field in the format spec)
    ],
)
def test_routing_key_template_that_cannot_render_is_rejected_at_load(template: str) -> None:
    err = config_error(routing_key=template)
    assert err.key == "routing_key"


@pytest.mark.parametrize(
    "template",
    ["{aggregatetype}.{type}", "{aggregateid}", "fixed", "{{literal}}.{type}", "a.{type}.b", ""],
)
def test_good_routing_key_templates(template: str) -> None:
    assert load_env(routing_key=template).routing_key == template


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("max_in_flight", "-1"),
        ("max_in_flight", "0"),
        ("status_interval", "0"),
        ("status_interval", "-inf"),
        ("stop_timeout", "-1"),
        ("reconnect_min", "0"),
        ("flush_delay", "-0.1"),
        ("amqp_heartbeat", "-5"),
    ],
)
def test_out_of_range_numbers(key: str, text: str) -> None:
    err = config_error(**{key: text})
    assert err.key == key


@pytest.mark.parametrize(
    "key", ["status_interval", "flush_delay", "stop_timeout", "reconnect_min", "reconnect_max"]
)
def test_nan_is_not_a_valid_duration(key: str) -> None:
    # every comparison with NaN is False, so "<= 0" style checks let it through
    err = config_error(**{key: "nan"})
    assert err.key == key


def test_reconnect_max_below_reconnect_min() -> None:
    err = config_error(reconnect_min="5", reconnect_max="1")
    assert err.key == "reconnect_max"


def test_reconnect_max_equal_to_min_is_fine() -> None:
    cfg = load_env(reconnect_min="2", reconnect_max="2")
    assert cfg.reconnect_max == cfg.reconnect_min == 2.0


def test_exchange_longer_than_255() -> None:
    assert config_error(exchange="e" * 256).key == "exchange"
    assert load_env(exchange="e" * 255).exchange == "e" * 255


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, 'pg_dsn = "unterminated\n')
    with pytest.raises(ConfigError) as info:
        load(path, BASE_ENV)
    assert info.value.key == "--config"
    assert "TOML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, BASE_ENV)
    assert info.value.key == "--config"
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, BASE_ENV)
    assert info.value.key == "--config"


def test_config_error_is_not_retryable_and_text_names_key() -> None:
    err = config_error(slot="Bad-Name")
    assert not err.retryable
    assert str(err).startswith("setting slot:")


def test_config_errors_do_not_echo_the_dsn_password() -> None:
    err = config_error(max_in_flight="x")
    assert "pgsecret" not in str(err)
    assert "mqsecret" not in str(err)


# --- redact --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("postgresql://u:secret@h/db", "secret", ["postgresql://u:", "@h/db"]),
        ("amqp://guest:pw@h:5672/%2F", "pw@", ["amqp://guest:", "@h:5672/%2F"]),
        ("host=h password=secret user=u", "secret", ["host=h", "user=u"]),
        ("password='se cret'", "cret", ["password="]),
        ("password='se cret' host=h", "se cret", ["host=h"]),
        (r"password='a\' b' host=h", "a\\'", ["host=h"]),
        ("host=h PASSWORD = secret", "secret", ["host=h"]),
        ("amqps://user:p:a:ss@broker/vh", "p:a:ss", ["amqps://user:", "@broker/vh"]),
        ("postgresql://:secret@h/db", "secret", ["@h/db"]),
        ("cannot connect to postgres://u:secret@h:5432/db: timeout", "secret", ["timeout"]),
        ("postgresql://h/db?password=secret", "secret", ["postgresql://h/db?"]),
    ],
)
def test_redact_hides_passwords(text: str, secret: str, kept: list[str]) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out
    for part in kept:
        assert part in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unencoded '@' (review 5): pika splits at the last '@', so all of p@ss is the password
        ("amqp://relay:p@ss@mq:5672/%2F", "amqp://relay:***@mq:5672/%2F"),
        ("amqp://relay:p@s@s@@mq:5672/%2F", "amqp://relay:***@mq:5672/%2F"),
        ("amqps://relay:@@mq/vh", "amqps://relay:***@mq/vh"),
        ("postgres://relay:a@b:c/d@db:5432/app", "postgres://relay:***@db:5432/app"),
        (
            "postgresql://relay:x@y@db/app?sslmode=require",
            "postgresql://relay:***@db/app?sslmode=require",
        ),
        # ':' and '/' in the password
        ("amqp://relay:pa:ss:@mq/%2F", "amqp://relay:***@mq/%2F"),
        ("amqp://relay:pa/ss@mq/%2F", "amqp://relay:***@mq/%2F"),
        ("postgresql://relay:/a//b/@db/app", "postgresql://relay:***@db/app"),
        ("amqp://relay:%2F%40x@mq/%2F", "amqp://relay:***@mq/%2F"),
        # an '@' in the user name: the user still ends at the first ':'
        ("amqp://us@er:pw@mq/%2F", "amqp://us@er:***@mq/%2F"),
        # any scheme, inside free text, next to other words and punctuation
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("git+ssh://me:pw@host/repo.git", "git+ssh://me:***@host/repo.git"),
        (
            "connect to amqp://relay:p@ss@mq:5672/%2F failed: timed out",
            "connect to amqp://relay:***@mq:5672/%2F failed: timed out",
        ),
        (
            "(postgresql://u:s@cret@db/app)\nretrying",
            "(postgresql://u:***@db/app)\nretrying",
        ),
        (
            "pg postgresql://a:o@ne@h/db, mq amqp://b:t:wo@m/%2F",
            "pg postgresql://a:***@h/db, mq amqp://b:***@m/%2F",
        ),
        # key=value DSNs: bare, quoted, escaped, sslpassword, any case, spaces around '='
        ("host=h password=p@ss:w/rd user=u", "host=h password=*** user=u"),
        ("host=h sslpassword=keypass user=u", "host=h sslpassword=*** user=u"),
        ("host=h Password = 'a b' user=u", "host=h Password = *** user=u"),
        (r"password='it\'s \\ ok' user=u", "password=*** user=u"),
        ("password='ab'cd user=u", "password=*** user=u"),
        ("user=u password='never closed", "user=u password=***"),
        (
            "postgresql://h/db?user=u&password=pw&sslmode=require",
            "postgresql://h/db?user=u&password=***",
        ),
        # a URL with a password and a key=value password in one text
        (
            "postgresql://u:one@h/db?sslpassword=two host=h password=three",
            "postgresql://u:***@h/db?sslpassword=*** host=h password=***",
        ),
    ],
)
def test_redact_exact_output(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_hides_several_passwords() -> None:
    out = redact("pg postgresql://a:one@h/db, mq amqp://b:two@m/%2F, dsn password=three")
    for secret in ("one", "two", "three"):
        assert secret not in out
    assert out == "pg postgresql://a:***@h/db, mq amqp://b:***@m/%2F, dsn password=***"


@pytest.mark.parametrize(
    "text",
    [
        "host=h user=u dbname=d",
        "postgresql://u@h:5432/db",
        "postgresql://u@h:5432/db: connection refused",
        "postgresql://h/db",
        "amqp://h:5672/%2F",
        "amqp://relay@mq:5672/%2F",
        "https://example.com/a@b",
        "mailto:someone@example.com",
        "user@host:5432 refused",
        'password authentication failed for user "u"',
        "slot cdc_relay is active for PID 42",
        "",
    ],
)
def test_redact_leaves_text_without_passwords_unchanged(text: str) -> None:
    assert redact(text) == text


# Passwords from any printable, non-whitespace characters (ASCII punctuation included, so '@',
# ':', '/', '?', '#', '%', quotes and backslashes all occur). Whitespace ends a URL in free text,
# so a URL password with raw whitespace is out of scope. Every password starts with a marker that
# the other parts of the text cannot contain, and is at least 6 characters long, so "the password
# does not appear in the output" cannot pass or fail by coincidence.
MARK = "\u00a7"  # '§': never in the scheme, user, host or path alphabets below, nor in "***"
_PW_CHARS = st.characters(
    blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="\x85\xa0"
)
passwords = st.builds(lambda s: MARK + s, st.text(_PW_CHARS, min_size=5, max_size=40))
schemes = st.sampled_from(["amqp", "amqps", "postgres", "postgresql", "redis", "x+y.z-1"])
users = st.text(
    st.sampled_from(string.ascii_letters + string.digits + "._-%~!$&'()*+,;@"), max_size=12
)
hosts = st.from_regex(r"\A[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?\Z")
paths = st.from_regex(r"\A(/[A-Za-z0-9%._~-]{0,10}){0,3}(\?[a-z]{1,6}=[a-z0-9]{0,6})?\Z")


@given(scheme=schemes, user=users, password=passwords, host=hosts, path=paths)
def test_redact_url_hides_any_password_whole(
    scheme: str, user: str, password: str, host: str, path: str
) -> None:
    url = f"{scheme}://{user}:{password}@{host}{path}"
    out = redact(url)
    assert password not in out
    assert out == f"{scheme}://{user}:***@{host}{path}"
    # the same inside an error message, twice, and with the parts around it kept
    text = f"cannot reach {url} (attempt 2); last error: {url}."
    out = redact(text)
    assert password not in out
    assert MARK not in out
    assert out.startswith(f"cannot reach {scheme}://{user}:***@{host}")


@given(password=passwords)
def test_redact_key_value_hides_any_password_whole(password: str) -> None:
    # libpq quoting: single quotes, with \' and \\ escaped
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    for value in (quoted, password if not password.startswith("'") else quoted):
        for key in ("password", "sslpassword", "PASSWORD"):
            text = f"host=db port=5432 {key}={value} user=relay dbname=app"
            out = redact(text)
            assert password not in out
            assert MARK not in out
            assert out.startswith("host=db port=5432 ")
            if value is quoted:
                assert out == f"host=db port=5432 {key}=*** user=relay dbname=app"


# --- describe_settings ---------------------------------------------------------------------------


def test_every_config_field_is_documented() -> None:
    fields = {f.name for f in msgspec.structs.fields(Config)}
    assert fields == set(config.HELP)


def test_describe_settings_mentions_every_key_and_env_var() -> None:
    text = describe_settings()
    for key in config.HELP:
        assert f"  {key} " in text
        assert env_name(key) in text
    assert "CDC_RELAY_PG_DSN" in text
    assert "required" in text
    assert "default 'cdc_relay'" in text


def test_env_name() -> None:
    assert env_name("max_in_flight") == "CDC_RELAY_MAX_IN_FLIGHT"


def test_overrides_can_carry_typed_values() -> None:
    overrides: dict[str, Any] = {"max_in_flight": 3, "create_slot": True}
    cfg = load(None, BASE_ENV, overrides)
    assert cfg.max_in_flight == 3
    assert cfg.create_slot is True


# --- durations (cdc-relay prune --older-than) ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("12h", 43200), ("90m", 5400), ("30s", 30), ("2w", 1209600),
     ("1d12h", 129600), ("0s", 0), (" 1.5h ", 5400), ("1D", 86400)],
)  # fmt: skip
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7 days", "1y", "-1d", "1d-2h", "7dd"])
def test_bad_durations_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text)
    assert "older_than: not a duration" in str(info.value)
