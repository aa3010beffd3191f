"""Named failpoints for fault tests: ``CDC_RELAY_FAILPOINTS="loop.wedge=3"``.

A failpoint does nothing unless the environment names it, and then only what its name says
(``wedge``: sleep inside the event loop for N seconds, once; ``crash``: exit like kill -9 on the
Nth call). Tests use them to prove that health checks notice a stuck loop and that a consumer
killed between its commit and its ack applies nothing twice; operators never set them.
"""

from __future__ import annotations

import os
import time

_fired: set[str] = set()
_calls: dict[str, int] = {}


def _configured() -> dict[str, float]:
    spec = os.environ.get("CDC_RELAY_FAILPOINTS", "")
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            out[name] = float(value or "1")
        except ValueError:
            continue
    return out


def wedge(name: str) -> None:
    """Block the calling thread once for the configured seconds, if ``name`` is enabled."""
    seconds = _configured().get(name)
    if seconds and name not in _fired:
        _fired.add(name)
        time.sleep(seconds)


def crash(name: str) -> None:
    """Exit the process at once (no cleanup, like kill -9) on the Nth call, if ``name=N``."""
    nth = _configured().get(name)
    if not nth:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] >= nth:
        os._exit(137)
