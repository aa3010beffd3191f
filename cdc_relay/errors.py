"""The error tree of cdc-relay.

Every error says whether retrying can help (``retryable``) and which side it came from
(``side``: ``"postgres"``, ``"rabbitmq"`` or ``None`` for the relay's own data, config or logic),
so the restart policy and the reconnect counters are properties of the failure, never a guess
from its text. Errors carry context (slot, LSN, event id) but never payloads or credentials:
their text goes straight into logs.
"""

from __future__ import annotations

from typing import Any

POSTGRES = "postgres"
RABBITMQ = "rabbitmq"


class RelayError(Exception):
    """Base of every error cdc-relay raises on purpose."""

    retryable: bool = False
    side: str | None = None

    def __init__(self, message: str, *, side: str | None = None, **context: Any) -> None:
        self.message = message
        if side is not None:
            self.side = side
        self.context = {k: v for k, v in context.items() if v is not None}
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if not self.context:
            return self.message
        ctx = " ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({ctx})"


class ConfigError(RelayError):
    """A setting is missing or invalid. Fix the configuration; retrying cannot help."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"setting {key}: {problem}")

    def __str__(self) -> str:
        return self.message


class DecodeError(RelayError):
    """Bytes from the server did not form the message they claimed to be.

    Raised by the sans-I/O decoders for truncated or malformed input. A replay will read the
    same bytes again, so this is not retryable: it means a protocol mismatch or a bug.
    """

    side = POSTGRES

    def __init__(self, kind: str, offset: int, problem: str) -> None:
        self.kind = kind
        self.offset = offset
        self.problem = problem
        super().__init__(f"cannot decode {kind} message at byte {offset}: {problem}")

    def __str__(self) -> str:
        return self.message


class OutboxError(RelayError):
    """An outbox table or its configuration cannot produce events (e.g. a missing column).

    Not retryable: the same WAL will produce the same row. The operator must fix the table or the
    configuration; the slot is not advanced past the row, so nothing is lost meanwhile.
    """


class InvalidEvent(OutboxError):
    """One row (or logical message) that cannot become a faithful message, whatever the table.

    The value itself is the problem (NULL id, header the broker would refuse, id longer than
    AMQP allows, payload that is not JSON, ...), so ``invalid_event_policy`` decides: halt
    before it, or divert it whole to the dead-letter exchange and go on. ``row`` keeps the raw
    column values (bytes as PostgreSQL sent them) for that dead-letter message; it never reaches
    a log line.
    """

    def __init__(
        self,
        problem: str,
        *,
        column: str | None = None,
        event_id: str | None = None,
        lsn: object = None,
        relation: str | None = None,
        row: dict[str, bytes | None] | None = None,
        **context: Any,
    ) -> None:
        self.problem = problem
        self.column = column
        self.event_id = event_id
        self.lsn = lsn
        self.relation = relation
        self.row = row
        shown_id = event_id if event_id is None or len(event_id) <= 80 else event_id[:80] + "..."
        super().__init__(
            problem, relation=relation, column=column, event_id=shown_id, lsn=lsn, **context
        )


class SetupError(RelayError):
    """The database is not ready for the relay (slot, publication, wal_level, permissions).

    Not retryable: the message says what the operator has to change.
    """


class ConnectionLost(RelayError):
    """A server connection failed or dropped. Retrying with backoff is expected to help."""

    retryable = True


class SlotBusy(ConnectionLost):
    """The slot is streaming to another connection (another relay instance).

    Retryable: this instance waits as a standby and takes over when the holder goes away.
    ``holder_pid`` is the walsender that holds it, when known.
    """

    side = POSTGRES

    def __init__(self, message: str, *, holder_pid: int | None = None, **context: Any) -> None:
        self.holder_pid = holder_pid
        super().__init__(message, **context)


class PublishFailed(RelayError):
    """The broker refused, returned or did not confirm a message.

    Retryable: the relay reconnects and replays from the slot's confirmed position, so the event
    is sent again with the same message id.
    """

    retryable = True
    side = RABBITMQ


class Nacked(PublishFailed):
    """The broker nacked a message (queue full, internal error). Retry carefully."""


class Returned(Nacked):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class BrokerRefused(RelayError):
    """The broker will never accept this as sent (too large, access refused, bad arguments).

    Not retryable: resending the same bytes gets the same answer. The relay halts without
    moving the slot past the event; the message says which setting diverts or admits it.
    """

    side = RABBITMQ


class TlsFailed(RelayError):
    """A TLS handshake failed for a reason the same settings meet again: a certificate the
    other side does not trust, a name that does not match, an expired or missing client
    certificate. Not retryable: retrying would only repeat the handshake."""


class AuthenticationFailed(RelayError):
    """Credentials were rejected. Retrying would only hammer the server: not retryable."""


class InternalError(RelayError):
    """A bug: an exception nobody expected. The session's checkpoint freezes at once.

    Not retryable, and unlike a data error it does not wait for confirms: the state that would
    have to be trusted to count them is the state that just proved inconsistent.
    """
