"""What a failed TLS handshake means, in the operator's words, for either side.

Neither libpq nor Python's ``ssl`` gives a code for *why* a handshake failed; both give
OpenSSL's reason text (``certificate verify failed``, ``alert certificate expired``, ...). This
is the one place that reads it: a handshake that failed for a certificate reason fails the same
way on every retry, so it becomes ``TlsFailed`` (exit 1, no retry storm) with a hint that says
which setting to look at. Anything else stays a connection failure and is retried.
"""

from __future__ import annotations

from cdc_relay.errors import POSTGRES, TlsFailed

# (what OpenSSL or the server says, lower case) → what to check; first match wins
_POSTGRES_HINTS = (
    (
        "does not match host name",
        "the server's certificate does not name the host pg_dsn "
        "connects to: use a host name it carries (hostaddr= can keep the address), or reissue it",
    ),
    (
        "certificate verify failed",
        "the server's certificate does not chain to sslrootcert (or "
        "to the system store with sslrootcert=system): point sslrootcert at the CA that signed it",
    ),
    (
        "requires a valid client certificate",
        "the server requires a client certificate: set sslcert and sslkey in pg_dsn",
    ),
    (
        "certificate expired",
        "a certificate has expired (the client's, if the server said so): renew it",
    ),
    ("unknown ca", "the server does not trust the CA of the client certificate (sslcert)"),
    ("bad certificate", "the server refused the client certificate (sslcert)"),
    ("certificate required", "the server requires a client certificate: set sslcert and sslkey"),
    ("root certificate file", "sslrootcert names a file that cannot be read"),
    (
        "private key",
        "sslkey cannot be used (missing, wrong permissions, or not the certificate's key)",
    ),
    ("certificate file", "sslcert cannot be read"),
    (
        "server does not support ssl",
        "the server does not offer TLS: enable ssl on it, or lower sslmode",
    ),
)
_RABBITMQ_HINTS = (
    (
        "hostname mismatch",
        "the broker's certificate does not name the host in amqp_url: use a "
        "name it carries, or set server_name_indication= to it",
    ),
    (
        "ip address mismatch",
        "the broker's certificate does not carry that IP address: connect by a name it carries",
    ),
    (
        "certificate verify failed",
        "the broker's certificate does not chain to cacertfile (or "
        "the system store when cacertfile is not set): point cacertfile at the CA that signed it",
    ),
    (
        "certificate expired",
        "a certificate has expired (the client's, if the broker said so): renew it",
    ),
    (
        "certificate required",
        "the broker requires a client certificate: set certfile and keyfile in amqp_url",
    ),
    ("unknown ca", "the broker does not trust the CA of the client certificate (certfile)"),
    ("bad certificate", "the broker refused the client certificate (certfile)"),
    (
        "handshake failure",
        "the broker refused the handshake (often: it requires a client "
        "certificate; set certfile and keyfile)",
    ),
    (
        "wrong version number",
        "the port does not speak TLS: use amqp:// for it, or the broker's TLS port",
    ),
)


def failure(text: str, side: str) -> TlsFailed | None:
    """``TlsFailed`` when ``text`` (already redacted, one line) reports a certificate problem
    that a retry meets again; None otherwise."""
    lowered = text.lower()
    hints = _POSTGRES_HINTS if side == POSTGRES else _RABBITMQ_HINTS
    for marker, hint in hints:
        if marker in lowered:
            name = "PostgreSQL" if side == POSTGRES else "RabbitMQ"
            return TlsFailed(f"TLS to {name} failed: {hint} ({text})", side=side)
    return None
