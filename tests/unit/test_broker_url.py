"""amqp_url: RabbitMQ's URI parameters for TLS become an SSLContext; mistakes are config errors
that name the parameter and never the key's password."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import quote

import pika.credentials
import pytest

from cdc_relay import broker_url
from cdc_relay.errors import ConfigError
from tests.tls import Authority, make_authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("pki"))


def _q(p: Path) -> str:
    return quote(str(p), safe="/")


def test_plain_url_is_pikas_own() -> None:
    params = broker_url.parameters("amqp://u:p@mq.internal:5673/v1?heartbeat=7")
    assert params.ssl_options is None
    assert (params.host, params.port, params.virtual_host, params.heartbeat) == (
        "mq.internal",
        5673,
        "v1",
        7,
    )
    assert broker_url.describe(params) == "amqp://mq.internal:5673/v1"


def test_amqps_without_options_verifies_against_the_system_store() -> None:
    params = broker_url.parameters("amqps://u:p@mq.internal/%2F")
    assert params.port == 5671
    options = params.ssl_options
    assert options is not None and options.server_hostname == "mq.internal"
    assert options.context.verify_mode == ssl.CERT_REQUIRED
    assert options.context.check_hostname is True
    assert broker_url.describe(params) == "amqps://mq.internal:5671//"


def test_rabbitmq_uri_parameters_build_the_context(pki: Authority) -> None:
    url = (
        f"amqps://mq.internal:5671/%2F?cacertfile={_q(pki.ca)}&certfile={_q(pki.client.cert)}"
        f"&keyfile={_q(pki.client.key)}&auth_mechanism=external"
        "&server_name_indication=broker.example&heartbeat=5"
    )
    params = broker_url.parameters(url)
    options = params.ssl_options
    assert options is not None and options.server_hostname == "broker.example"
    assert options.context.verify_mode == ssl.CERT_REQUIRED and options.context.check_hostname
    assert isinstance(params.credentials, pika.credentials.ExternalCredentials)
    assert params.heartbeat == 5
    encrypted = (
        f"amqps://mq/%2F?certfile={_q(pki.client.cert)}&keyfile={_q(pki.client_encrypted.key)}"
        f"&password={pki.client_key_password}"
    )
    assert broker_url.parameters(encrypted).ssl_options is not None


def test_verify_none_turns_both_checks_off() -> None:
    options = broker_url.parameters("amqps://mq/%2F?verify=verify_none").ssl_options
    assert options is not None
    assert options.context.verify_mode == ssl.CERT_NONE and not options.context.check_hostname


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("cacertfile=/nonexistent/ca.pem", "cacertfile /nonexistent/ca.pem: no such file"),
        ("certfile=/nonexistent/c.pem", "certfile /nonexistent/c.pem: no such file"),
        ("keyfile=/k.pem", "keyfile without certfile"),
        ("verify=maybe", "verify must be verify_peer or verify_none"),
        ("auth_mechanism=kerberos", "auth_mechanism must be plain or external"),
        (
            "auth_mechanism=external",
            "auth_mechanism=external authenticates with a client certificate",
        ),
        ("ssl_options=%7B%7D", "ssl_options is pika's own form"),
        ("nonsense=1", "Unknown URL parameter"),
    ],
)
def test_bad_tls_settings_name_the_parameter(query: str, says: str) -> None:
    with pytest.raises(ConfigError, match="setting amqp_url") as info:
        broker_url.parameters(f"amqps://u:secret@mq/%2F?{query}")
    assert says in str(info.value)
    assert "secret" not in str(info.value)


def test_a_wrong_key_password_or_mismatched_key_is_named_not_shown(pki: Authority) -> None:
    wrong = (
        f"amqps://mq/%2F?certfile={_q(pki.client.cert)}&keyfile={_q(pki.client_encrypted.key)}"
        "&password=Wr0ngPassw0rd"
    )
    with pytest.raises(ConfigError) as info:
        broker_url.parameters(wrong)
    assert "keyfile" in str(info.value) and "Wr0ngPassw0rd" not in str(info.value)
    mismatched = f"amqps://mq/%2F?certfile={_q(pki.client.cert)}&keyfile={_q(pki.server.key)}"
    with pytest.raises(ConfigError, match="is the key the certificate's"):
        broker_url.parameters(mismatched)


def test_tls_options_on_a_plain_url_and_other_schemes_are_refused() -> None:
    with pytest.raises(ConfigError, match="only apply to TLS: use an amqps:// URL"):
        broker_url.parameters("amqp://mq/%2F?cacertfile=/ca.pem")
    with pytest.raises(ConfigError, match="must start with amqp:// or amqps://"):
        broker_url.parameters("http://mq/")
