"""Suite-wide fixtures: one real PostgreSQL 15 and one real RabbitMQ node for the whole run.

They start only when an integration test asks for them, so ``pytest tests/unit`` needs no
servers. If they cannot start, the integration tests error out: they never skip silently.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings

from tests.integration.harness import Env, drop_database, dsn_for
from tests.sandbox import PostgresSandbox, RabbitSandbox

# The suite is what gates a change, so it draws the same examples on every run: a red CI run is
# reproducible here. HYPOTHESIS_PROFILE=explore draws fresh ones (and keeps failures in
# .hypothesis/) when you want to hunt.
settings.register_profile("suite", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture(scope="session")
def servers_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cdc-relay-tests-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def pg(servers_root: Path) -> Iterator[PostgresSandbox]:
    server = PostgresSandbox(servers_root / "postgres").start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def rabbit(servers_root: Path) -> Iterator[RabbitSandbox]:
    # the consistent-hash exchange ships with the broker; enabled at boot, it costs little
    server = RabbitSandbox(
        servers_root / "rabbitmq", plugins=["rabbitmq_consistent_hash_exchange"]
    ).start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def env(
    pg: PostgresSandbox, rabbit: RabbitSandbox, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Env]:
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    name = f"t_{name}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    e = Env(
        pg=pg,
        rabbit=rabbit,
        name=name,
        dbname=name,
        dsn=dsn_for(pg, name),
        exchange=f"ex.{name}",
        queue=f"q.{name}",
        tmp=tmp_path,
    )
    try:
        yield e
    finally:
        for relay in e.relays:
            relay.close()
        drop_database(pg, name)
