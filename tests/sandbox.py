"""Throwaway PostgreSQL and RabbitMQ servers for tests, the demo and the benchmarks.

One launcher serves all three so that what the tests prove, the demo shows and the benchmarks
measure run on servers configured the same way: PostgreSQL 15 with ``wal_level=logical`` and a
short ``wal_sender_timeout`` (keepalive paths get exercised), and a private RabbitMQ node with its
own data directory and ports, both bound to loopback only.

Run as a module to manage a long-lived sandbox (used by ``make demo`` and ``make bench``)::

    python -m tests.sandbox up --dir .sandbox     # prints CDC_RELAY_PG_DSN / CDC_RELAY_AMQP_URL
    python -m tests.sandbox down --dir .sandbox
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path(os.environ.get("CDC_RELAY_PG_BIN", "/usr/lib/postgresql/15/bin"))
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PG_PASSWORD = "sandbox-pw"  # only ever a loopback throwaway server

PG_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "wal_sender_timeout": "10s",
    "max_prepared_transactions": "20",
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class PostgresSandbox:
    """A PostgreSQL cluster in ``root``; initdb refuses root, so it runs as ``postgres`` then."""

    root: Path
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=lambda: dict(PG_SETTINGS))

    @property
    def data(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root / "pgsock"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user=postgres password={PG_PASSWORD} "
            "dbname=postgres connect_timeout=5"
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if _is_root():
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed ({out.returncode}): {out.stderr}")
        return out

    def chown(self, path: Path) -> None:
        """Give ``path`` to the server's user (when the suite runs as root, that is postgres)."""
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if _is_root():
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if _is_root():
            # the postgres user must be able to reach its data directory
            for p in (self.root, *self.root.parents):
                if p.stat().st_mode & 0o001 == 0:
                    p.chmod(p.stat().st_mode | 0o001)
        if (self.data / "PG_VERSION").exists():
            return
        for d in (self.data, self.socket_dir):
            d.mkdir(exist_ok=True)
            self._chown(d)
        self.logfile.touch()
        self._chown(self.logfile)
        pwfile = self.root / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        self._chown(pwfile)
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()

    def start(self) -> PostgresSandbox:
        self.init()
        opts = [f"-p {self.port}", f"-k {self.socket_dir}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            " ".join(opts),
            "-w",
            "-t",
            "60",
            "start",
        )
        _wait_port(self.port, 30)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop; ``mode="immediate"`` is a crash (no checkpoint, WAL replayed at start)."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class RabbitSandbox:
    """A private RabbitMQ node: own name, ports and directories; guest/guest on loopback."""

    root: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    extra_conf: dict[str, str] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)  # enabled at start (they ship with it)
    tls_port: int = 0  # a TLS listener's port, when extra_conf configures one

    @property
    def node(self) -> str:
        return f"cdcrelay{self.port}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def pidfile(self) -> Path:
        return self.root / "rabbit.pid"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pidfile),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout

    def start(self) -> RabbitSandbox:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        conf = {
            "listeners.tcp.1": f"127.0.0.1:{self.port}",
            "loopback_users.guest": "true",
            "log.console": "false",
            "log.file.level": "warning",
            **self.extra_conf,
        }
        (self.root / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self.pidfile.unlink(missing_ok=True)
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.ctl("wait", str(self.pidfile), "--timeout", "90", timeout=120)
        _wait_port(self.port, 30)
        return self

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        try:
            pid = int(self.pidfile.read_text().strip() or "0")
        except ValueError:
            pid = 0
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "stop", str(self.pidfile)],
            env=self._env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if pid:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, 9)
        self.pidfile.unlink(missing_ok=True)

    def block_publishers(self) -> None:
        """Raise a memory alarm: the broker stops reading from publishing connections."""
        self.ctl("set_vm_memory_high_watermark", "0")

    def unblock_publishers(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.4")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _state_file(root: Path) -> Path:
    return root / "sandbox.json"


def up(root: Path) -> dict[str, str]:
    """Start (or reuse) a sandbox under ``root``; returns the relay's environment for it."""
    root = root.resolve()
    state_path = _state_file(root)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    pg = PostgresSandbox(root / "postgres", port=state.get("pg_port") or free_port())
    rabbit = RabbitSandbox(
        root / "rabbitmq",
        port=state.get("amqp_port") or free_port(),
        dist_port=state.get("dist_port") or free_port(),
    )
    root.mkdir(parents=True, exist_ok=True)
    state_path.write_text(
        json.dumps({"pg_port": pg.port, "amqp_port": rabbit.port, "dist_port": rabbit.dist_port})
    )
    if not (pg.data / "postmaster.pid").exists():
        pg.start()
    if not rabbit.pidfile.exists():
        rabbit.start()
    return {"CDC_RELAY_PG_DSN": pg.url, "CDC_RELAY_AMQP_URL": rabbit.amqp_url}


def down(root: Path) -> None:
    root = root.resolve()
    state_path = _state_file(root)
    if not state_path.exists():
        return
    state = json.loads(state_path.read_text())
    PostgresSandbox(root / "postgres", port=state["pg_port"]).stop()
    RabbitSandbox(root / "rabbitmq", port=state["amqp_port"], dist_port=state["dist_port"]).stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sandbox", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".sandbox"))
    args = parser.parse_args(argv)
    if args.action == "up":
        for k, v in up(args.dir).items():
            print(f"export {k}='{v}'")
    else:
        down(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
