"""``amqp_url``: RabbitMQ's own URI conventions, TLS included, turned into pika's parameters.

Operators already write TLS settings for RabbitMQ clients as URI query parameters
(``amqps://host/vhost?cacertfile=…&certfile=…&keyfile=…&verify=verify_peer``), as RabbitMQ's
URI spec and its Erlang and .NET clients read them; pika instead wants a Python dict literal in
``ssl_options=``. This module reads the RabbitMQ form and builds a real ``ssl.SSLContext``:
peer verification and the hostname check are on unless ``verify=verify_none`` says otherwise,
the system CA store is used when no ``cacertfile`` is given, and a client certificate may
authenticate the connection (``auth_mechanism=external``, RabbitMQ's EXTERNAL mechanism).
Every other parameter (``heartbeat``, ``connection_attempts``, …) goes to pika as it is.

Mistakes are ``ConfigError`` naming the parameter and the file, found before any connection is
tried: a missing CA file, a key that does not match its certificate, a wrong key password, TLS
options on a plain ``amqp://`` URL.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.credentials

from cdc_relay.config import redact
from cdc_relay.errors import ConfigError

SETTING = "amqp_url"
# RabbitMQ URI query parameters for TLS (https://www.rabbitmq.com/docs/uri-query-parameters)
TLS_PARAMETERS = (
    "cacertfile",
    "certfile",
    "keyfile",
    "password",
    "verify",
    "server_name_indication",
    "fail_if_no_peer_cert",
    "auth_mechanism",
)
_VERIFY = ("verify_peer", "verify_none")


def parameters(url: str) -> pika.URLParameters:
    """pika parameters for ``url``, with an ``SSLContext`` for ``amqps://``."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigError(SETTING, "is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ConfigError(
            SETTING, f"must start with amqp:// or amqps:// (TLS), not {parts.scheme or '(none)'}://"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    tls = {k.lower(): v for k, v in query if k.lower() in TLS_PARAMETERS}
    rest = [(k, v) for k, v in query if k.lower() not in TLS_PARAMETERS]
    if "ssl_options" in {k for k, _ in rest}:
        raise ConfigError(
            SETTING,
            "ssl_options is pika's own form; use RabbitMQ's URI parameters instead "
            "(cacertfile, certfile, keyfile, verify, server_name_indication)",
        )
    external = tls.get("auth_mechanism", "plain").lower()
    if external not in ("plain", "external"):
        raise ConfigError(SETTING, f"auth_mechanism must be plain or external, not {external!r}")
    if scheme == "amqp":
        if tls:
            raise ConfigError(
                SETTING,
                f"{', '.join(sorted(tls))} only apply to TLS: use an amqps:// URL",
            )
        return _pika(urlunsplit(parts._replace(query=urlencode(rest))))
    params = _pika(urlunsplit(parts._replace(query=urlencode(rest))))
    server_name = tls.get("server_name_indication") or params.host
    context = _context(tls, server_name)
    params.ssl_options = pika.SSLOptions(
        context, server_hostname=None if server_name == "disable" else server_name
    )
    if external == "external":
        if "certfile" not in tls:
            raise ConfigError(
                SETTING,
                "auth_mechanism=external authenticates with a client certificate: "
                "set certfile (and keyfile)",
            )
        params.credentials = pika.credentials.ExternalCredentials()
    return params


def describe(params: pika.ConnectionParameters) -> str:
    """Where the relay connects, for logs and status: never a password."""
    scheme = "amqps" if params.ssl_options is not None else "amqp"
    return f"{scheme}://{params.host}:{params.port}/{params.virtual_host}"


def _pika(url: str) -> pika.URLParameters:
    try:
        return pika.URLParameters(url)
    except Exception as exc:  # noqa: BLE001 - pika raises assorted types for bad URLs
        raise ConfigError(SETTING, f"is not a valid AMQP URL: {redact(str(exc))}") from None


def _context(tls: dict[str, str], server_name: str) -> ssl.SSLContext:
    verify = tls.get("verify", "verify_peer").lower()
    if verify not in _VERIFY:
        raise ConfigError(SETTING, f"verify must be verify_peer or verify_none, not {verify!r}")
    cafile = tls.get("cacertfile") or None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except FileNotFoundError:
        raise ConfigError(SETTING, f"cacertfile {cafile}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            SETTING, f"cacertfile {cafile}: not a PEM CA bundle ({_why(exc)})"
        ) from None
    if verify == "verify_none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif server_name == "disable":
        context.check_hostname = False  # no name to check against; the chain still is
    certfile = tls.get("certfile")
    keyfile = tls.get("keyfile")
    if keyfile and not certfile:
        raise ConfigError(SETTING, "keyfile without certfile: set both for a client certificate")
    if certfile:
        password = tls.get("password")
        try:
            context.load_cert_chain(certfile, keyfile or None, password=password or None)
        except FileNotFoundError as exc:
            raise ConfigError(SETTING, f"{_which(exc, certfile, keyfile)}: no such file") from None
        except ssl.SSLError as exc:
            raise ConfigError(
                SETTING,
                f"certfile {certfile} / keyfile {keyfile or certfile}: {_why(exc)} (is the key "
                "the certificate's, and its password right?)",
            ) from None
        except OSError as exc:
            raise ConfigError(SETTING, f"certfile {certfile}: {_why(exc)}") from None
    return context


def _which(exc: FileNotFoundError, certfile: str, keyfile: str | None) -> str:
    """Which of the two is missing (ssl does not always say)."""
    if keyfile is not None and (exc.filename == keyfile or os.path.exists(certfile)):
        return f"keyfile {keyfile}"
    return f"certfile {certfile}"


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or type(exc).__name__).lower().replace("_", " ")
