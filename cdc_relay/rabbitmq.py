"""The broker side: pika's SelectConnection in confirm mode, as a thin adapter.

SelectConnection is the adapter measured to reach the broker's ceiling with pipelined confirms
(AsyncioConnection ~25% slower, blocking confirms an order of magnitude slower), and its IOLoop
lets the replication socket share the same loop: one thread, no queue, no lock. Everything the
broker says (ack, nack, return, close, blocked) is turned into a callback on the owner; this
module never decides whether an event is safe — the checkpoint tracker does.

It does classify what the broker says, because only here are the reply codes known: a close the
same bytes would cause again (access refused, a declaration that conflicts with what exists, a
message refused for its content, a frame the broker could not parse) is ``BrokerRefused`` and
halts the relay with one line saying what to change; anything else (a deleted exchange, a lost
connection, a nack) is retryable. Reply codes decide first; the little text parsing RabbitMQ's
reply texts need (which object, which argument) lives in ``parse_reply_text``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from cdc_relay import tls
from cdc_relay.amqp import publish_frames
from cdc_relay.brokers import Brokers
from cdc_relay.config import redact
from cdc_relay.errors import (
    RABBITMQ,
    AuthenticationFailed,
    BrokerRefused,
    ConnectionLost,
    PublishFailed,
    RelayError,
    Returned,
)
from cdc_relay.messages import OutgoingMessage

log = logging.getLogger(__name__)

OnConfirm = Callable[[int, bool, bool], None]  # (delivery_tag, multiple, ack)
OnFailure = Callable[[RelayError], None]


# Connection closes that mean "the broker could not parse what you sent": resending the same
# frames gets the same answer (501 FRAME_ERROR, 502 SYNTAX_ERROR, 505 UNEXPECTED_FRAME).
_FRAMING_CODES = frozenset((501, 502, 505))
# how pika reports a peer that hung up during the AMQP protocol header: what a TLS-only port
# does to a plain client
_CUT_AT_HELLO = ("EOF", "StreamLostError", "IncompatibleProtocolError", "ConnectionResetError")


@dataclass(frozen=True, slots=True)
class ReplyText:
    """What a RabbitMQ reply text names; None where it does not say."""

    kind: str | None = None  # "exchange" or "queue"
    name: str | None = None
    argument: str | None = None  # the argument of an "inequivalent arg" refusal
    too_large: bool = False  # a message over the broker's max_message_size


# RabbitMQ formats names unescaped as 'name' followed by " in vhost"
_OBJECT = re.compile(r"\b(exchange|queue) '(.*?)' in vhost")
_ARGUMENT = re.compile(r"inequivalent arg '(.*?)' for ")


def parse_reply_text(text: str) -> ReplyText:
    """The object, argument and size refusal a RabbitMQ reply text names (the only text parsing
    the relay does on broker replies: codes decide, this only fills in names for the message)."""
    obj = _OBJECT.search(text)
    arg = _ARGUMENT.search(text)
    return ReplyText(
        kind=obj.group(1) if obj else None,
        name=obj.group(2) if obj else None,
        argument=arg.group(1) if arg else None,
        too_large="max size" in text,
    )


def connection_failure(reason: BaseException | str) -> RelayError:
    """What a closed connection means: a frame the broker refused (halt), or a lost link."""
    if isinstance(reason, pika.exceptions.ConnectionClosedByBroker):
        code = int(reason.reply_code)
        if code in _FRAMING_CODES:
            return BrokerRefused(
                f"RabbitMQ closed the connection over a frame it could not accept ({code} "
                f"{reason.reply_text}): resending it would be refused again; the slot has not "
                "moved past the event"
            )
    return ConnectionLost(f"RabbitMQ connection lost: {redact(str(reason))}", side=RABBITMQ)


def _innermost(error: BaseException | str) -> str:
    """The reason under pika's connection-workflow wrappers (their own text is just a name):
    the last attempt's exception, down to the socket or TLS error that ended it."""
    seen = 0
    while isinstance(error, BaseException) and seen < 5:
        seen += 1
        inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed
        if inner:
            error = inner[-1]
            continue
        wrapped = getattr(error, "exception", None)  # AMQPConnectorTransportSetupError & co
        if isinstance(wrapped, BaseException):
            error = wrapped
            continue
        break
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _CoalescingConnection(SelectConnection):  # type: ignore[misc]  # pika is untyped
    """A SelectConnection that sends the frames produced in one loop turn with one write.

    pika hands every frame (three per published message) to its transport separately, and the
    transport issues one send() per frame; at broker speed those syscalls cost more than the
    encoding. ``_adapter_emit_data`` is pika's documented seam between the protocol and its
    I/O adapter, so buffering there keeps frame order intact for everything pika sends.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out: list[bytes | memoryview] = []
        self._out_due = False
        self._held = False
        super().__init__(*args, **kwargs)

    def hold(self) -> None:
        """Frames emitted until ``release`` wait for it instead of for the next loop turn: a
        caller that publishes a batch writes it with one call and no timer."""
        self._held = True

    def release(self) -> None:
        self._held = False
        if self._out:
            self._flush_out()

    @property
    def frame_max(self) -> int:
        """The negotiated frame size (pika stores the tuned value in its parameters)."""
        return int(self.params.frame_max)

    def emit_frames(self, parts: list[bytes | memoryview]) -> None:
        """Queue already-encoded frame parts behind everything pika has queued so far.

        Parts are kept as they are (a large body is a part, or memoryview slices of it) and
        joined once per loop turn, so a body is copied once on its way to the socket.
        """
        self._out += parts
        if not self._out_due and not self._held:
            self._out_due = True
            self.ioloop.call_later(0, self._flush_out)

    def _adapter_emit_data(self, data: bytes) -> None:
        self._out.append(data)
        if not self._out_due:
            self._out_due = True
            self.ioloop.call_later(0, self._flush_out)

    def _flush_out(self) -> None:
        self._out_due = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        transport = getattr(self, "_transport", None)
        if transport is not None:  # None: the connection is already gone, and so is the data
            transport.write(data)

    def _adapter_disconnect_stream(self) -> None:
        self._flush_out()
        super()._adapter_disconnect_stream()


class Publisher:
    """One AMQP connection and one confirm-mode channel publishing to one exchange."""

    def __init__(
        self,
        url: str | Brokers,
        exchanges: Sequence[str],
        exchange_type: str,
        declare: bool,
        heartbeat: int,
        ioloop: IOLoop,
        on_ready: Callable[[], None],
        on_confirm: OnConfirm,
        on_failure: OnFailure,
        on_closed: Callable[[], None],
        alternate_exchange: bool = True,
        dead_letter_exchange: str = "",
        unroutable_queue_type: str = "quorum",
    ) -> None:
        self._brokers = Brokers(url) if isinstance(url, str) else url
        for params in self._brokers.candidates:
            params.heartbeat = heartbeat
            params.blocked_connection_timeout = None
            params.client_properties = {"connection_name": "cdc-relay"}
        self._order: list[int] = self._brokers.order()
        self._attempt = 0  # position in _order of the node being tried
        self._params = self._brokers.candidates[self._order[0]]
        self.address = self._brokers.names[self._order[0]]  # for logs: never a password
        self._exchanges = tuple(dict.fromkeys(exchanges))
        self._exchange_type = exchange_type
        self._declare = declare
        self._alternate = alternate_exchange
        self._dead_letter = dead_letter_exchange
        # exchanges found to exist without our alternate exchange: used as they are
        self._without_alternate: set[str] = set()
        self._queue_type = unroutable_queue_type
        # unroutable queues found to exist with another type: used as they are (passive);
        # found unavailable (a classic queue whose node is down): left alone this session
        self._queue_as_is: set[str] = set()
        self._queue_unavailable: set[str] = set()
        self._inspector: Channel | None = None
        self._inspector_report: Callable[[str, int], None] | None = None
        self._step: tuple[str, dict[str, Any]] | None = None  # the declaration under way
        self._last_exchange = ""  # where the newest message went, to name it in a refusal
        self._ioloop = ioloop
        self._on_ready = on_ready
        self._on_confirm = on_confirm
        self._on_failure = on_failure
        self._on_closed = on_closed
        self._connection: _CoalescingConnection | None = None
        self._channel: Channel | None = None
        self._closing = False
        self.ready = False

    # -- lifecycle ----------------------------------------------------------------------------
    def connect(self) -> None:
        """Try the nodes of ``amqp_url`` in turn, from where the rotation stands."""
        self._order = self._brokers.order()
        self._attempt = 0
        self._open()

    def _open(self) -> None:
        index = self._order[self._attempt]
        self._params = self._brokers.candidates[index]
        self.address = self._brokers.names[index]
        self._connection = _CoalescingConnection(
            parameters=self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def close(self) -> None:
        """Close politely; ``on_closed`` fires once the connection is gone."""
        self._closing = True
        self.ready = False
        conn = self._connection
        if conn is None or conn.is_closed:
            self._on_closed()
            return
        if not conn.is_closing:
            try:
                conn.close()
            except pika.exceptions.ConnectionWrongStateError:
                self._on_closed()

    @property
    def closed(self) -> bool:
        return self._connection is None or self._connection.is_closed

    # -- publishing ---------------------------------------------------------------------------
    @property
    def frame_max(self) -> int:
        """The negotiated frame size (meaningful once ready): the builder's limit for headers."""
        connection = self._connection
        return connection.frame_max if connection is not None else int(self._params.frame_max)

    def hold(self) -> None:
        """Publishes from here to ``release`` leave together, written at ``release``."""
        if self._connection is not None:
            self._connection.hold()

    def release(self) -> None:
        if self._connection is not None:
            self._connection.release()

    def publish(self, msg: OutgoingMessage) -> None:
        """Queue one persistent, mandatory message; its confirm arrives via ``on_confirm``.

        ``msg.properties`` was encoded and checked against ``frame_max`` by the builder, so
        framing cannot fail here: the only refusal is a channel that is not open.
        """
        channel = self._channel
        connection = self._connection
        if channel is None or connection is None or not self.ready:
            raise PublishFailed("broker channel is not open", event_id=msg.message_id)
        self._last_exchange = msg.exchange
        # framed here and handed to the same ordered write buffer pika uses (pika's per-frame
        # objects cost more than the rest of the event's path)
        connection.emit_frames(
            publish_frames(
                channel.channel_number,
                msg.exchange,
                msg.routing_key,
                True,
                msg.properties,
                msg.body,
                connection.frame_max,
            )
        )

    # -- pika callbacks -----------------------------------------------------------------------
    def _on_connection_open(self, connection: Any) -> None:
        self._brokers.connected(self._order[self._attempt])
        log.info("connected to RabbitMQ", extra={"broker": self.address})
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._channel = connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, _connection: Any, error: BaseException | str) -> None:
        text = redact(_innermost(error))
        tls_failed = tls.failure(text, RABBITMQ)
        if tls_failed is not None:
            self._on_failure(tls_failed)
            self._on_closed()
            return
        if self._params.ssl_options is not None and "SSLEOFError" in text:
            text += (
                " (the broker closed the TLS connection during the handshake: if it refused the "
                "client certificate, a later attempt receives its alert and says why)"
            )
        elif self._params.ssl_options is None and any(m in text for m in _CUT_AT_HELLO):
            text += (
                f" (the broker at {self.address} closed the connection before speaking AMQP: "
                "if that port expects TLS, use an amqps:// URL)"
            )
        if isinstance(
            error,
            pika.exceptions.ProbableAuthenticationError
            | pika.exceptions.AuthenticationError
            | pika.exceptions.ProbableAccessDeniedError,
        ):
            self._on_failure(
                AuthenticationFailed(f"RabbitMQ refused the credentials: {text}", side=RABBITMQ)
            )
        elif self._attempt + 1 < len(self._order) and not self._closing:
            log.warning(
                "cannot connect to a RabbitMQ node; trying the next",
                extra={"broker": self.address, "error": text},
            )
            self._attempt += 1
            self._open()
            return
        else:
            tried = len(self._order)
            where = f" (tried all {tried} nodes of amqp_url)" if tried > 1 else ""
            self._on_failure(
                ConnectionLost(f"cannot connect to RabbitMQ: {text}{where}", side=RABBITMQ)
            )
        self._on_closed()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self.ready = False
        self._channel = None
        if not self._closing:
            self._brokers.lost()  # the next connection starts at the following node
            self._on_failure(connection_failure(reason))
        self._on_closed()

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_ack_nack, callback=self._on_confirm_ok)

    @staticmethod
    def unroutable_name(exchange: str) -> str:
        return f"{exchange}.unroutable"

    def _on_confirm_ok(self, _frame: Any) -> None:
        """Declare the topology step by step (each waits for the broker's answer)."""
        steps: list[tuple[str, dict[str, Any]]] = []
        for ex in self._exchanges if self._declare else ():
            if ex in self._without_alternate:
                steps.append(("exchange_declare", {"exchange": ex, "passive": True}))
                continue
            declare: dict[str, Any] = {
                "exchange": ex,
                "exchange_type": self._exchange_type,
                "durable": True,
            }
            if self._alternate:
                ae = self.unroutable_name(ex)
                steps.append(
                    (
                        "exchange_declare",
                        {"exchange": ae, "exchange_type": "fanout", "durable": True},
                    )
                )
                if ae in self._queue_as_is:
                    steps.append(("queue_declare", {"queue": ae, "passive": True}))
                elif ae not in self._queue_unavailable:
                    queue = {"queue": ae, "durable": True}
                    steps.append(("queue_declare", {**queue, "arguments": self._queue_arguments}))
                if ae not in self._queue_unavailable:
                    steps.append(("queue_bind", {"queue": ae, "exchange": ae}))
                declare["arguments"] = {"alternate-exchange": ae}
            steps.append(("exchange_declare", declare))
        if self._dead_letter:
            steps.append(("exchange_declare", {"exchange": self._dead_letter, "passive": True}))
        self._run_steps(steps)

    @property
    def _queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": self._queue_type}

    def _run_steps(self, steps: list[tuple[str, dict[str, Any]]]) -> None:
        if not steps:
            self._step = None
            self._set_ready()
            return
        channel = self._channel
        if channel is None:
            return
        self._step = steps[0]
        method, kwargs = steps[0]
        getattr(channel, method)(callback=lambda _frame: self._run_steps(steps[1:]), **kwargs)

    def _set_ready(self) -> None:
        self.ready = True
        self._on_ready()
        self._open_inspector()

    # -- the inspector channel ----------------------------------------------------------------
    def _open_inspector(self) -> None:
        """Open the channel ``count_unroutable`` asks on; reopened on demand after it closes."""
        connection = self._connection
        if not self._alternate or connection is None or not connection.is_open:
            return
        channel = connection.channel(on_open_callback=self._on_inspector_open)
        channel.add_on_close_callback(self._on_inspector_closed)
        self._inspector = channel

    def _on_inspector_open(self, channel: Channel) -> None:
        report, self._inspector_report = self._inspector_report, None
        if report is not None and channel is self._inspector:
            self._query_unroutable(channel, report)

    def _on_inspector_closed(self, channel: Channel, _reason: BaseException) -> None:
        # e.g. a passive declare of an .unroutable queue someone deleted; the next
        # count_unroutable opens a new one instead of the metric freezing for the session
        if channel is self._inspector:
            self._inspector = None
            self._inspector_report = None

    def count_unroutable(self, report: Callable[[str, int], None]) -> None:
        """Ask the broker how many events wait in each ``<exchange>.unroutable`` queue.

        A separate channel: a passive declare of a queue someone deleted closes its channel,
        which must not take the publishing channel with it. A closed inspector channel is
        reopened here, and asked as soon as it is open.
        """
        if not self.ready:
            return
        channel = self._inspector
        if channel is None:
            self._inspector_report = report
            self._open_inspector()
            return
        if channel.is_open:
            self._query_unroutable(channel, report)
        else:  # still opening: ask once it is
            self._inspector_report = report

    def _query_unroutable(self, channel: Channel, report: Callable[[str, int], None]) -> None:
        for ex in self._exchanges:
            if ex in self._without_alternate:
                continue
            queue = self.unroutable_name(ex)
            channel.queue_declare(
                queue=queue,
                passive=True,
                callback=lambda frame, q=queue: report(q, int(frame.method.message_count)),
            )

    # -- closes and refusals ------------------------------------------------------------------
    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return  # a channel replaced earlier (after the alternate-exchange retry)
        was_ready = self.ready
        self.ready = False
        self._channel = None
        if self._closing:
            return
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            # the connection under the channel went away: classified like the connection, and
            # the next connection starts at the following node (pika closes the channels before
            # it reports the connection closed, and by then the session is closing)
            self._brokers.lost()
            self._on_failure(connection_failure(reason))
            return
        code = int(reason.reply_code)
        text = str(reason.reply_text)
        if not was_ready and code == 406 and self._use_without_alternate(text):
            return
        if not was_ready and self._use_unroutable_queue_as_is(code, text):
            return
        self._on_failure(self._refusal(code, text, was_ready))

    def _use_without_alternate(self, text: str) -> bool:
        """The exchange exists without our alternate exchange: use it as it is (unroutable
        events then come back as mandatory returns and make the relay retry)."""
        if "alternate-exchange" not in text:
            return False
        name = next((ex for ex in self._exchanges if f"'{ex}'" in text), None)
        if name is None or name in self._without_alternate:
            return False
        self._without_alternate.add(name)
        log.warning(
            "exchange exists without an alternate exchange; unroutable events will "
            "be retried, not kept",
            extra={"exchange": name},
        )
        if self._connection is None or not self._connection.is_open:
            return False
        channel = self._connection.channel(on_open_callback=self._on_channel_open)
        self._channel = channel
        return True

    def _use_unroutable_queue_as_is(self, code: int, text: str) -> bool:
        """Our unroutable queue exists with another type (406, an upgrade from a classic one)
        or is unavailable (404: a classic queue whose node is down, which no other node may
        declare): go on without redeclaring it, and say what that means."""
        step = self._step
        if step is None or step[0] not in ("queue_declare", "queue_bind"):
            return False
        queue = str(step[1].get("queue", ""))
        if not queue.endswith(".unroutable"):
            return False
        if code == 406 and "x-queue-type" in text and queue not in self._queue_as_is:
            self._queue_as_is.add(queue)
            log.warning(
                "the unroutable queue exists with another queue type; used as it is (a classic "
                "queue is not replicated: move its messages and delete it to get the "
                "configured type)",
                extra={"queue": queue, "wanted": self._queue_type},
            )
        elif code == 404 and queue not in self._queue_unavailable:
            self._queue_unavailable.add(queue)
            log.warning(
                "the unroutable queue is unavailable (its node is down?); routable events "
                "flow, but the first event no binding matches is returned and retried (the "
                "slot waits there) until the queue is back",
                extra={"queue": queue, "reply": text[:200]},
            )
        else:
            return False
        if self._connection is None or not self._connection.is_open:
            return False
        self._channel = self._connection.channel(on_open_callback=self._on_channel_open)
        return True

    def _refusal(self, code: int, text: str, was_ready: bool) -> RelayError:
        """What a channel closed by the broker means, decided by reply code first."""
        said = parse_reply_text(text)
        if code == 404 and not was_ready and self._dead_letter and said.name == self._dead_letter:
            return BrokerRefused(
                f"dead_letter_exchange {self._dead_letter!r} does not exist: declare it "
                "(and bind a queue) or unset dead_letter_exchange"
            )
        if code == 403:
            what = (
                f"{said.kind} {said.name!r}"
                if said.name is not None
                else f"exchange {self._last_exchange!r}"
            )
            return BrokerRefused(
                f"RabbitMQ refused access to {what}: grant the relay's user "
                f"{self._permission(said, was_ready)} permission on it in this vhost ({text})"
            )
        if code == 406 and said.too_large:
            return BrokerRefused(
                f"broker refused a message as too large ({text}): set max_message_size to "
                "the broker's limit so such events go to dead_letter_exchange, or raise "
                "the broker's max_message_size"
            )
        if code == 406 and not was_ready:
            what = f"{said.kind or 'object'} {said.name!r}" if said.name else "the topology"
            if said.argument is not None:
                return BrokerRefused(
                    f"{what} already exists with a different {said.argument!r} than the relay "
                    f"declares ({text}): make the configuration match it (exchange_type, "
                    "alternate_exchange) or delete and let the relay declare it"
                )
            return BrokerRefused(f"RabbitMQ refused to declare {what}: {text}")
        if code == 406:
            return BrokerRefused(
                f"RabbitMQ refused a message published to exchange {self._last_exchange!r} "
                f"for its content ({text}); resending it would be refused again"
            )
        # 404 while publishing (the exchange was deleted mid-flight) and anything else:
        # redeclaring on reconnect may help
        return PublishFailed(f"broker closed the channel: ({code}) {text}")

    def _permission(self, said: ReplyText, was_ready: bool) -> str:
        """The vhost permission a 403 asks for, from what the relay was doing."""
        if was_ready or self._step is None:
            return "write"  # basic.publish needs write on the exchange
        method, kwargs = self._step
        if method == "queue_bind":
            return "write" if said.kind == "queue" else "read"
        if method == "exchange_declare" and "arguments" in kwargs:
            if said.name == kwargs["exchange"]:
                return "configure and read"  # declaring it with an alternate exchange
            return "write"  # the alternate exchange it names
        return "configure"

    def _on_ack_nack(self, frame: Any) -> None:
        method = frame.method
        self._on_confirm(
            int(method.delivery_tag), bool(method.multiple), isinstance(method, Basic.Ack)
        )

    def _on_return(
        self, _channel: Channel, method: Basic.Return, props: BasicProperties, _body: bytes
    ) -> None:
        # the body is never logged: payloads may hold personal data
        self._on_failure(
            Returned(
                f"broker returned an unroutable message ({method.reply_code} {method.reply_text})"
                f": no queue is bound for routing key {method.routing_key!r}",
                exchange=method.exchange,
                event_id=props.message_id,
            )
        )

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        log.warning("broker blocked publishing (resource alarm); holding the WAL position")

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        log.info("broker unblocked publishing")
