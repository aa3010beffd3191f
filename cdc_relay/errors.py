"""The error tree of cdc-relay.

Every error says whether retrying can help (``retryable``), so the daemon's restart policy is a
property of the failure rather than a guess at the call site. Errors carry context (slot, LSN,
event id) but never payloads or credentials: their text goes straight into logs.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error cdc-relay raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, **context: object) -> None:
        self.message = message
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

    def __init__(self, kind: str, offset: int, problem: str) -> None:
        self.kind = kind
        self.offset = offset
        self.problem = problem
        super().__init__(f"cannot decode {kind} message at byte {offset}: {problem}")

    def __str__(self) -> str:
        return self.message


class OutboxError(RelayError):
    """An outbox row cannot become an event (missing column, unusable value).

    Not retryable: the same WAL will produce the same row. The operator must fix the table or the
    configuration; the slot is not advanced past the row, so nothing is lost meanwhile.
    """


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
    """


class PublishFailed(RelayError):
    """The broker refused, returned or did not confirm a message.

    Retryable: the relay reconnects and replays from the slot's confirmed position, so the event
    is sent again with the same message id.
    """

    retryable = True


class Nacked(PublishFailed):
    """The broker nacked or returned a message (queue full, unroutable). Retry carefully."""


class BrokerRefused(RelayError):
    """The broker will never accept this message as sent (e.g. larger than its limit).

    Not retryable: resending the same bytes gets the same answer. The relay halts without
    moving the slot past the event; the message says which setting diverts or admits it.
    """


class AuthenticationFailed(RelayError):
    """Credentials were rejected. Retrying would only hammer the server: not retryable."""
