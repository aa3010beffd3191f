"""SIGTERM/SIGINT as something both the event loop and a backoff sleep can wait on."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from types import FrameType


class StopSignal:
    """The handler only sets a flag; ``signal.set_wakeup_fd`` makes the kernel-level wakeup
    visible on a socket the loop watches, so nothing lock-taking ever runs inside a handler."""

    def __init__(self) -> None:
        self.requested = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def install(self) -> None:
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            # a second Ctrl-C: the operator wants out now
            os._exit(130)
        self.requested = True

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> None:
        try:
            while self._r.recv(512):
                pass
        except BlockingIOError:
            pass

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking at once on a stop request."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._r], [], [], left)
            self.drain()
