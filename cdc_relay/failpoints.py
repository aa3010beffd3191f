"""Named failpoints for fault tests: ``CDC_RELAY_FAILPOINTS="loop.wedge=3"``.

A failpoint does nothing unless the environment names it, and then only what its name says
(here: sleep inside the event loop for N seconds, once). Tests use it to prove that health
checks notice a stuck loop; operators never set it.
"""

from __future__ import annotations

import os
import time

_fired: set[str] = set()


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
