"""Publishing a bounded stream of messages with confirms, for commands that read the table.

Backfill, recover and replay publish rows they read from the outbox table, not from a
replication stream, so they have no slot to checkpoint: what they must know is which prefix of
what they sent the broker has confirmed (a backfill records it to resume after a crash; a replay
exits non-zero unless everything was). ``ConfirmedPublisher`` drives the same ``Publisher`` the
daemon uses on a loop of its own: ``publish`` queues, ``wait_room`` runs the loop until the
window has room again, ``wait_all`` until every message is confirmed. The first nack, return or
lost connection ends the run with a typed error: the caller's record of the confirmed prefix
is all it needs to continue.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from pika.adapters.select_connection import IOLoop

from cdc_relay.brokers import Brokers
from cdc_relay.config import Config
from cdc_relay.errors import RABBITMQ, ConnectionLost, Nacked, RelayError
from cdc_relay.messages import OutgoingMessage
from cdc_relay.rabbitmq import Publisher
from cdc_relay.signals import StopSignal

K = TypeVar("K")
CONNECT_TIMEOUT = 30.0  # seconds to a confirm-mode channel with the exchanges declared


class ConfirmedPrefix(Generic[K]):
    """Which prefix of the messages sent is confirmed, from acks that may come in any order.

    Tags are the channel's delivery tags (1, 2, 3, ... in publish order); ``multiple`` acks
    cover every earlier tag. Pure logic, so it is tested without a broker.
    """

    def __init__(self) -> None:
        self._sent = 0
        self._pending: collections.deque[tuple[int, K]] = collections.deque()
        self._early: set[int] = set()  # acked while an older message was not
        self.confirmed = 0  # messages confirmed, in order
        self.confirmed_key: K | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def sent(self, key: K) -> int:
        self._sent += 1
        self._pending.append((self._sent, key))
        return self._sent

    def ack(self, tag: int, multiple: bool) -> None:
        pending = self._pending
        if multiple:
            while pending and pending[0][0] <= tag:
                self._confirm(pending.popleft()[1])
        elif pending and tag >= pending[0][0]:
            self._early.add(tag)
        early = self._early
        while pending and pending[0][0] in early:
            early.discard(pending[0][0])
            self._confirm(pending.popleft()[1])
        if not pending:
            early.clear()

    def _confirm(self, key: K) -> None:
        self.confirmed += 1
        self.confirmed_key = key


class ConfirmedPublisher(Generic[K]):
    """Publishes messages, each with a caller's key, and knows the key of the confirmed prefix.

    ``confirmed_key`` is the key of the newest message such that it and every message before it
    were acked: the point a restart may continue after.
    """

    def __init__(self, cfg: Config, stop: StopSignal | None = None) -> None:
        self.cfg = cfg
        self._stop = stop
        self._ioloop = IOLoop()
        routes = [cfg.route(schema, name)[0] for schema, name in cfg.tables]
        self._publisher = Publisher(
            Brokers(cfg.amqp_url, cfg.amqp_shuffle),
            [cfg.exchange, *routes],
            cfg.exchange_type,
            cfg.declare_exchange,
            cfg.amqp_heartbeat,
            self._ioloop,
            on_ready=self._wake,
            on_confirm=self._on_confirm,
            on_failure=self._on_failure,
            on_closed=self._on_closed,
            alternate_exchange=cfg.alternate_exchange,
            unroutable_queue_type=cfg.unroutable_queue_type,
            dead_letter_exchange=cfg.dead_letter_exchange,
        )
        self._window = max(1, cfg.max_in_flight)
        self._prefix: ConfirmedPrefix[K] = ConfirmedPrefix()
        self._error: RelayError | None = None
        self._closed = False
        self._condition: Callable[[], bool] = lambda: True  # what the loop runs until

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ConfirmedPublisher[K]:
        self._publisher.connect()
        if not self._run(lambda: self._publisher.ready, CONNECT_TIMEOUT):
            raise ConnectionLost(
                f"RabbitMQ did not open a confirm channel within {CONNECT_TIMEOUT:.0f} s",
                side=RABBITMQ,
            )
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._publisher.close()
            deadline = time.monotonic() + 5.0
            while not self._closed and time.monotonic() < deadline:
                self._ioloop.call_later(0.05, self._ioloop.stop)
                self._ioloop.start()
        self._ioloop.close()

    @property
    def frame_max(self) -> int:
        return self._publisher.frame_max

    @property
    def in_flight(self) -> int:
        return self._prefix.in_flight

    @property
    def confirmed(self) -> int:
        return self._prefix.confirmed

    @property
    def confirmed_key(self) -> K | None:
        return self._prefix.confirmed_key

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, msg: OutgoingMessage, key: K) -> None:
        """Queue one message; it is written when the loop next runs (``wait_room``)."""
        self._raise_if_failed()
        self._publisher.publish(msg)
        self._prefix.sent(key)

    def wait_room(self) -> None:
        """Run the loop until fewer than the window are unconfirmed (flushes what was queued),
        or a stop is requested."""
        self._run(lambda: self._prefix.in_flight < self._window, None, stoppable=True)

    def wait_all(self, timeout: float | None = None) -> bool:
        """Run the loop until every message is confirmed; False if ``timeout`` passed first."""
        return self._run(lambda: not self._prefix.in_flight, timeout)

    # -- the loop -----------------------------------------------------------------------------
    def _run(
        self, done: Callable[[], bool], timeout: float | None, *, stoppable: bool = False
    ) -> bool:
        """Run the loop until ``done()`` (True), ``timeout`` or, if ``stoppable``, a stop
        request (False); a failure the broker reported is raised."""
        self._raise_if_failed()
        if done():
            # still let queued frames go out: the loop writes them
            timer = self._ioloop.call_later(0, self._ioloop.stop)
            self._ioloop.start()
            self._ioloop.remove_timeout(timer)
            self._raise_if_failed()
            return True
        self._condition = done
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            timer = self._ioloop.call_later(0.5, self._ioloop.stop)  # look at stop, deadline
            self._ioloop.start()
            self._ioloop.remove_timeout(timer)
            self._raise_if_failed()
            if done():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if stoppable and self._stop is not None and self._stop.requested:
                return False

    def _wake(self) -> None:
        if self._condition():
            self._ioloop.stop()

    def _on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        if not ack:
            self._fail(
                Nacked(
                    f"broker nacked delivery {tag}"
                    + (" and every earlier unconfirmed one" if multiple else "")
                )
            )
            return
        self._prefix.ack(tag, multiple)
        self._wake()

    def _on_failure(self, err: RelayError) -> None:
        self._fail(err)

    def _fail(self, err: RelayError) -> None:
        if self._error is None:
            self._error = err
        self._ioloop.stop()

    def _on_closed(self) -> None:
        self._closed = True
        if self._error is None and self._prefix.in_flight and not self._publisher.ready:
            self._error = ConnectionLost("RabbitMQ connection closed", side=RABBITMQ)
        self._ioloop.stop()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
