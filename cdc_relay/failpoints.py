"""Named failpoints for fault tests: ``CDC_RELAY_FAILPOINTS="loop.wedge=3"``.

A failpoint does nothing unless the environment names it, and then only what its name says
(``wedge``: sleep inside the event loop for N seconds, once; ``crash``: exit like kill -9 on the
Nth call; ``enabled``: a switch, such as ``status.no_flush``, which keeps the slot where it is
so that a restart streams everything confirmed again). Tests use them to prove that health
checks notice a stuck loop, that a consumer killed between its commit and its ack applies
nothing twice, and that the ledger counts a transaction streamed twice once; operators never
set them.
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


def enabled(name: str) -> bool:
    """Whether the environment names ``name`` (read once per process)."""
    if name not in _switches:
        _switches[name] = bool(_configured().get(name))
    return _switches[name]


_switches: dict[str, bool] = {}
