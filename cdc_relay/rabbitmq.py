"""The broker side: pika's SelectConnection in confirm mode, as a thin adapter.

SelectConnection is the adapter measured to reach the broker's ceiling with pipelined confirms
(AsyncioConnection ~25% slower, blocking confirms an order of magnitude slower), and its IOLoop
lets the replication socket share the same loop: one thread, no queue, no lock. Everything the
broker says (ack, nack, return, close, blocked) is turned into a callback on the owner; this
module never decides whether an event is safe — the checkpoint tracker does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from cdc_relay.amqp import encode_properties, encode_publish, string_headers
from cdc_relay.config import redact
from cdc_relay.errors import (
    AuthenticationFailed,
    BrokerRefused,
    ConnectionLost,
    Nacked,
    PublishFailed,
    RelayError,
)
from cdc_relay.messages import APP_ID, CONTENT_TYPE, OutgoingMessage

log = logging.getLogger(__name__)

OnConfirm = Callable[[int, bool, bool], None]  # (delivery_tag, multiple, ack)
OnFailure = Callable[[RelayError], None]


class _EncodedProperties(BasicProperties):  # type: ignore[misc]  # pika is untyped
    """Properties already encoded by ``cdc_relay.amqp``: pika only asks them to ``encode``."""

    def __init__(self, encoded: bytes) -> None:
        # no super().__init__(): pika reads publish properties only through encode(), and
        # setting its fourteen attributes per event would cost more than the encoding
        self._encoded = encoded

    def encode(self) -> list[bytes]:
        return [self._encoded]


class _CoalescingConnection(SelectConnection):  # type: ignore[misc]  # pika is untyped
    """A SelectConnection that sends the frames produced in one loop turn with one write.

    pika hands every frame (three per published message) to its transport separately, and the
    transport issues one send() per frame; at broker speed those syscalls cost more than the
    encoding. ``_adapter_emit_data`` is pika's documented seam between the protocol and its
    I/O adapter, so buffering there keeps frame order intact for everything pika sends.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._out_due = False
        super().__init__(*args, **kwargs)

    @property
    def frame_max(self) -> int:
        """The negotiated frame size (pika stores the tuned value in its parameters)."""
        return int(self.params.frame_max)

    def emit_frames(self, data: bytes) -> None:
        """Queue already-encoded frames behind everything pika has queued so far."""
        self._adapter_emit_data(data)

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
        url: str,
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
    ) -> None:
        try:
            self._params = pika.URLParameters(url)
        except Exception as exc:  # noqa: BLE001 - pika raises assorted types for bad URLs
            raise RelayError(f"amqp_url is not a valid AMQP URL: {redact(str(exc))}") from None
        self._params.heartbeat = heartbeat
        self._params.blocked_connection_timeout = None
        self._params.client_properties = {"connection_name": "cdc-relay"}
        self._exchanges = tuple(dict.fromkeys(exchanges))
        self._exchange_type = exchange_type
        self._declare = declare
        self._alternate = alternate_exchange
        self._dead_letter = dead_letter_exchange
        # exchanges found to exist without our alternate exchange: used as they are
        self._without_alternate: set[str] = set()
        self._inspector: Channel | None = None
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
    def publish(self, msg: OutgoingMessage) -> None:
        """Queue one persistent, mandatory message; its confirm arrives via ``on_confirm``."""
        channel = self._channel
        if channel is None or not self.ready:
            raise PublishFailed("broker channel is not open", event_id=msg.message_id)
        props: BasicProperties
        connection = self._connection
        if string_headers(msg.headers) and connection is not None:
            # the common case, framed here and handed to the same ordered write buffer pika
            # uses (pika's per-frame objects cost more than the rest of the event's path)
            connection.emit_frames(
                encode_publish(
                    channel.channel_number,
                    msg.exchange,
                    msg.routing_key,
                    True,
                    encode_properties(
                        CONTENT_TYPE,
                        msg.headers,
                        2,
                        msg.message_id,
                        msg.timestamp,
                        msg.type,
                        APP_ID,
                    ),
                    msg.body,
                    connection.frame_max,
                )
            )
            return
        else:
            props = BasicProperties(
                content_type=CONTENT_TYPE,
                delivery_mode=2,
                message_id=msg.message_id,
                type=msg.type,
                timestamp=msg.timestamp,
                app_id=APP_ID,
                headers=msg.headers,
            )
        channel.basic_publish(msg.exchange, msg.routing_key, msg.body, props, mandatory=True)

    # -- pika callbacks -----------------------------------------------------------------------
    def _on_connection_open(self, connection: Any) -> None:
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, _connection: Any, error: BaseException | str) -> None:
        text = redact(str(error) or type(error).__name__)
        if isinstance(
            error,
            pika.exceptions.ProbableAuthenticationError
            | pika.exceptions.AuthenticationError
            | pika.exceptions.ProbableAccessDeniedError,
        ):
            self._on_failure(AuthenticationFailed(f"RabbitMQ refused the credentials: {text}"))
        else:
            self._on_failure(ConnectionLost(f"cannot connect to RabbitMQ: {text}"))
        self._on_closed()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self.ready = False
        self._channel = None
        if not self._closing:
            self._on_failure(ConnectionLost(f"RabbitMQ connection lost: {redact(str(reason))}"))
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
                steps += [
                    (
                        "exchange_declare",
                        {"exchange": ae, "exchange_type": "fanout", "durable": True},
                    ),
                    ("queue_declare", {"queue": ae, "durable": True}),
                    ("queue_bind", {"queue": ae, "exchange": ae}),
                ]
                declare["arguments"] = {"alternate-exchange": ae}
            steps.append(("exchange_declare", declare))
        if self._dead_letter:
            steps.append(("exchange_declare", {"exchange": self._dead_letter, "passive": True}))
        self._run_steps(steps)

    def _run_steps(self, steps: list[tuple[str, dict[str, Any]]]) -> None:
        if not steps:
            self._set_ready()
            return
        channel = self._channel
        if channel is None:
            return
        method, kwargs = steps[0]
        getattr(channel, method)(callback=lambda _frame: self._run_steps(steps[1:]), **kwargs)

    def _set_ready(self) -> None:
        self.ready = True
        self._on_ready()
        if self._alternate and self._connection is not None:
            self._connection.channel(on_open_callback=self._on_inspector_open)

    def _on_inspector_open(self, channel: Channel) -> None:
        self._inspector = channel
        channel.add_on_close_callback(self._on_channel_closed)

    def count_unroutable(self, report: Callable[[str, int], None]) -> None:
        """Ask the broker how many events wait in each ``<exchange>.unroutable`` queue.

        A separate channel: a passive declare of a queue someone deleted closes its channel,
        which must not take the publishing channel with it.
        """
        channel = self._inspector
        if channel is None or not channel.is_open:
            return
        for ex in self._exchanges:
            if ex in self._without_alternate:
                continue
            queue = self.unroutable_name(ex)
            channel.queue_declare(
                queue=queue,
                passive=True,
                callback=lambda frame, q=queue: report(q, int(frame.method.message_count)),
            )

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is self._inspector:
            self._inspector = None
            return
        was_ready = self.ready
        self.ready = False
        self._channel = None
        if self._closing:
            return
        code = getattr(reason, "reply_code", 0)
        text = str(getattr(reason, "reply_text", reason))
        if not was_ready and code == 406 and "alternate-exchange" in text:
            # the exchange exists without our alternate exchange: use it as it is; unroutable
            # events then come back as mandatory returns and make the relay retry
            name = next((ex for ex in self._exchanges if f"'{ex}'" in text), None)
            if name is not None and name not in self._without_alternate:
                self._without_alternate.add(name)
                log.warning(
                    "exchange exists without an alternate exchange; unroutable events will "
                    "be retried, not kept",
                    extra={"exchange": name},
                )
                if self._connection is not None and self._connection.is_open:
                    self._connection.channel(on_open_callback=self._on_channel_open)
                    return
        if not was_ready and code == 404 and self._dead_letter and self._dead_letter in text:
            self._on_failure(
                BrokerRefused(
                    f"dead_letter_exchange {self._dead_letter!r} does not exist: declare it "
                    "(and bind a queue) or unset dead_letter_exchange"
                )
            )
            return
        if code == 406 and "max size" in text:
            self._on_failure(
                BrokerRefused(
                    f"broker refused a message as too large ({text}): set max_message_size to "
                    "the broker's limit so such events go to dead_letter_exchange, or raise "
                    "the broker's max_message_size"
                )
            )
            return
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self._on_failure(PublishFailed(f"broker closed the channel: {reason}"))
        else:  # the connection under the channel went away (heartbeat timeout, socket error)
            self._on_failure(ConnectionLost(f"RabbitMQ connection lost: {redact(str(reason))}"))

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
            Nacked(
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
