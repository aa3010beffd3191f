"""Several RabbitMQ nodes in ``amqp_url``: which to try first, and which next after a loss.

A cluster is reached through any of its nodes, so ``amqp_url`` may list several (comma-separated
URLs, as other RabbitMQ clients take them, or a TOML list). A connection tries them in order from
the current one and stays on the first that answers; when an established connection is lost,
the next attempt starts at the node after it, so a relay leaves a dead node at once instead of
waiting for it. ``amqp_shuffle`` shuffles the list once at start, to spread relays over nodes.
Every URL is checked (TLS files included) when the configuration is loaded.
"""

from __future__ import annotations

import random
import re

import pika

from cdc_relay import broker_url
from cdc_relay.errors import ConfigError

_SEPARATOR = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def split(url: str) -> list[str]:
    """The URLs of ``amqp_url``: a comma counts as a separator only before a scheme (``…://``),
    so a comma inside a URL (a query value) is left alone, and a wrong scheme is named."""
    urls = [u for u in (p.strip() for p in _SEPARATOR.split(url.strip())) if u]
    if not urls:
        raise ConfigError(broker_url.SETTING, "is empty")
    return urls


class Brokers:
    """The nodes of ``amqp_url`` and the rotation over them; shared by successive sessions."""

    def __init__(self, url: str, shuffle: bool = False, rng: random.Random | None = None) -> None:
        self.candidates: list[pika.URLParameters] = [broker_url.parameters(u) for u in split(url)]
        if shuffle:
            (rng or random.Random()).shuffle(self.candidates)  # noqa: S311 - spreading load
        self.names = [broker_url.describe(p) for p in self.candidates]
        self._first = 0
        self.current: int | None = None

    def __len__(self) -> int:
        return len(self.candidates)

    def order(self) -> list[int]:
        """Indexes to try for one connection, starting where the rotation stands."""
        n = len(self.candidates)
        return [(self._first + i) % n for i in range(n)]

    def connected(self, index: int) -> None:
        self.current = index
        self._first = index

    def lost(self) -> None:
        """The established connection broke: start the next attempt at the following node."""
        if self.current is not None:
            self._first = (self.current + 1) % len(self.candidates)
            self.current = None

    @property
    def in_use(self) -> str | None:
        return None if self.current is None else self.names[self.current]
