"""A small TCP proxy the fault tests own, to break connections on purpose.

It listens on a loopback port and forwards every accepted connection to a target port, so a test
can point the relay at it and then misbehave like a network would:

- ``cut()`` closes every current connection in both directions (both peers see the connection
  end) and keeps listening, so reconnects go through again;
- ``blackhole()`` stops moving bytes in both directions on every current connection without
  closing anything: each peer sees a silent, half-open connection (its writes pile up in socket
  buffers, nothing arrives). Connections accepted afterwards are forwarded normally, so a client
  that gives up on the dead connection can reconnect. ``restore()`` lets stalled connections move
  again (no byte is dropped: a stall, like a healed partition);
- ``start()`` may be deferred (``TcpProxy(target, start=False)``): the port is bound (reserved,
  known as ``.port``) but nothing listens, so connecting is refused, as if the server were not up
  yet; ``start()`` begins listening on it.

One daemon thread runs a selector loop per proxy; the public methods hand commands to it and wait
(bounded) for them to run, so no socket is touched from two threads. Buffers are bounded per
direction (the proxy stops reading a sender whose bytes the receiver does not take), and
``close()`` closes every socket and joins the thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

HOST = "127.0.0.1"
CHUNK = 65536
HIGH_WATER = 1 << 20  # bytes buffered towards one peer before the proxy stops reading the other
COMMAND_TIMEOUT = 10.0
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

T = TypeVar("T")


class _Pipe:
    """One proxied connection: the accepted client socket and the socket to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connected = False  # the upstream connect() finished
        self.stalled = False  # blackholed: no byte moves either way
        self.closed = False
        # bytes waiting to be written *to* the key socket
        self.pending: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.eof: set[socket.socket] = set()  # sockets whose peer finished sending
        self.shut: set[socket.socket] = set()  # sockets we already shut down for writing

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``; see the module docstring."""

    def __init__(self, target_port: int, *, port: int = 0, start: bool = True) -> None:
        self.target_port = target_port
        # bound at once (so the port is reserved) but listening only from start(): until then a
        # connection attempt is refused, exactly as if no server were there
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, port))
        self._listener.setblocking(False)
        self._port = int(self._listener.getsockname()[1])
        self._listening = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, READ, None)
        self._interest: dict[socket.socket, int] = {}
        self._pipes: list[_Pipe] = []
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._running = False
        self._closed = False
        self.accepted = 0  # connections accepted since start
        self._thread = threading.Thread(
            target=self._run, name=f"tcp-proxy->{target_port}", daemon=True
        )
        if start:
            self.start()

    # -- public API (any thread) ---------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port clients connect to (reserved from construction on, even before ``start()``)."""
        return self._port

    def start(self) -> TcpProxy:
        """Listen; from now on connections are forwarded."""
        if self._closed:
            raise RuntimeError("proxy is closed")
        if self._listening:
            return self
        self._listening = True
        listener = self._listener
        listener.listen(64)
        if self._thread.is_alive():
            self._call(lambda: self._sel.register(listener, READ, None))
        else:
            self._sel.register(listener, READ, None)
            self._running = True
            self._thread.start()
        return self

    @property
    def active(self) -> int:
        """Connections currently open through the proxy."""
        return self._call(lambda: len(self._pipes))

    def cut(self, reset: bool = False) -> int:
        """Close every current connection both ways (RST instead of FIN if ``reset``); keep
        listening. Returns how many connections were cut."""

        def do() -> int:
            pipes = list(self._pipes)
            for pipe in pipes:
                self._close_pipe(pipe, reset=reset)
            return len(pipes)

        return self._call(do)

    def blackhole(self) -> int:
        """Stall every current connection in both directions without closing it; returns how
        many. New connections are forwarded normally."""

        def do() -> int:
            for pipe in self._pipes:
                pipe.stalled = True
                self._update(pipe)
            return len(self._pipes)

        return self._call(do)

    def restore(self) -> int:
        """Let stalled connections move bytes again; returns how many were stalled."""

        def do() -> int:
            stalled = [p for p in self._pipes if p.stalled]
            for pipe in stalled:
                pipe.stalled = False
                for sock in (pipe.client, pipe.upstream):
                    if not self._flush(pipe, sock):
                        break
                if not pipe.closed:
                    self._update(pipe)
            return len(stalled)

        return self._call(do)

    def close(self) -> None:
        """Close every connection and the listener; stop and join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                self._call(self._stop_loop)
            self._thread.join(COMMAND_TIMEOUT)
        else:
            self._teardown()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread (or inline when the loop is not running)."""
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list[T] = []
        errors: list[BaseException] = []

        def command() -> None:
            try:
                box.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        self._commands.append(command)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(COMMAND_TIMEOUT):
            raise TimeoutError("proxy loop did not answer")
        if errors:
            raise errors[0]
        return box[0]

    # -- the loop (proxy thread only) ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._running:
                for key, mask in self._sel.select(timeout=0.5):
                    if key.fileobj is self._wake_r:
                        self._run_commands()
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        pipe = key.data
                        assert isinstance(pipe, _Pipe)
                        assert isinstance(key.fileobj, socket.socket)
                        if not pipe.closed:
                            self._io(pipe, key.fileobj, mask)
                    if not self._running:
                        break
        finally:
            self._teardown()

    def _stop_loop(self) -> None:
        self._running = False

    def _run_commands(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(512):
                pass
        while self._commands:
            self._commands.popleft()()

    def _teardown(self) -> None:
        for pipe in list(self._pipes):
            self._close_pipe(pipe, reset=False)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        with contextlib.suppress(OSError):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        # anything still waiting gets its answer rather than a timeout
        while self._commands:
            self._commands.popleft()()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex((HOST, self.target_port))
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                # the target refuses: the client sees its connection reset
                _linger_zero(client)
                client.close()
                upstream.close()
                continue
            pipe = _Pipe(client, upstream)
            pipe.connected = err == 0
            self._pipes.append(pipe)
            self._update(pipe)

    def _io(self, pipe: _Pipe, sock: socket.socket, mask: int) -> None:
        if mask & WRITE:
            if sock is pipe.upstream and not pipe.connected:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    self._close_pipe(pipe, reset=True)
                    return
                pipe.connected = True
            elif not self._flush(pipe, sock):
                return
        if mask & READ and not pipe.stalled:
            try:
                data = sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._close_pipe(pipe, reset=True)
                return
            if data is not None:
                peer = pipe.peer(sock)
                if data:
                    pipe.pending[peer] += data
                    if not self._flush(pipe, peer):
                        return
                else:
                    pipe.eof.add(sock)
        self._finish_half_closes(pipe)
        if not pipe.closed:
            self._update(pipe)

    def _flush(self, pipe: _Pipe, sock: socket.socket) -> bool:
        """Write what is pending towards ``sock``; False if the pipe had to be closed."""
        buf = pipe.pending[sock]
        while buf and not pipe.stalled:
            try:
                sent = sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close_pipe(pipe, reset=True)
                return False
            del buf[:sent]
        return True

    def _finish_half_closes(self, pipe: _Pipe) -> None:
        """Pass an EOF on once everything before it was delivered; close when both sides are
        done."""
        for sock in list(pipe.eof):
            peer = pipe.peer(sock)
            if peer not in pipe.shut and not pipe.pending[peer]:
                pipe.shut.add(peer)
                try:
                    peer.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close_pipe(pipe, reset=True)
                    return
        if len(pipe.eof) == 2 and len(pipe.shut) == 2:
            self._close_pipe(pipe, reset=False)

    def _update(self, pipe: _Pipe) -> None:
        """Register exactly the events each socket of the pipe can act on now."""
        for sock in (pipe.client, pipe.upstream):
            peer = pipe.peer(sock)
            events = 0
            if sock is pipe.upstream and not pipe.connected:
                events = WRITE
            elif pipe.connected and not pipe.stalled:
                if sock not in pipe.eof and len(pipe.pending[peer]) < HIGH_WATER:
                    events |= READ
                if pipe.pending[sock]:
                    events |= WRITE
            self._set_interest(sock, events, pipe)

    def _set_interest(self, sock: socket.socket, events: int, pipe: _Pipe) -> None:
        current = self._interest.get(sock, 0)
        if events == current:
            return
        if not events:
            self._sel.unregister(sock)
            del self._interest[sock]
        elif not current:
            self._sel.register(sock, events, pipe)
            self._interest[sock] = events
        else:
            self._sel.modify(sock, events, pipe)
            self._interest[sock] = events

    def _close_pipe(self, pipe: _Pipe, reset: bool) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        for sock in (pipe.client, pipe.upstream):
            if self._interest.pop(sock, 0):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(sock)
            if reset:
                _linger_zero(sock)
            sock.close()
        with contextlib.suppress(ValueError):
            self._pipes.remove(pipe)


def _linger_zero(sock: socket.socket) -> None:
    """Make ``close()`` send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
