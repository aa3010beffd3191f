"""Three private RabbitMQ nodes on this machine, joined into one cluster, for the cluster fault
tests and the scale benchmark.

Each node is a ``RabbitSandbox`` (its own node name, AMQP port, data and log directories) with
three additions a cluster needs:

- **one Erlang cookie of its own**, in the cluster's directory, given to every node and to every
  ``rabbitmqctl`` through ``HOME``: the nodes can talk to each other and to their CLI, and to no
  other RabbitMQ on the machine (other suites' nodes use the user's own cookie);
- **distribution ports that cannot collide**: AMQP ports are drawn below the kernel's ephemeral
  range and each node's distribution port is its AMQP port + 20000, still below it. The three
  distribution ports differ because the AMQP ports do, none can equal an AMQP port of ours
  (those are all under 20000 + the lowest), and no other sandbox can be handed one by
  ``free_port()`` (the kernel only hands out ephemeral ports);
- **``cluster_partition_handling = pause_minority``**: a node cut off from the other two stops
  serving clients until it sees them again, so a partition never leaves two sides accepting
  writes; a modest memory watermark keeps three nodes from each believing 40% of the machine
  is theirs.

The nodes boot in parallel (boot is most of the start-up time); nodes 2 and 3 then leave their
fresh single-node clusters in parallel (``stop_app``, ``reset``), join node 1 one after the
other (concurrent joins race on the schema), and start their apps in parallel.

Faults a test can inflict: ``kill()`` (kill -9 of the node's VM), ``stop()``/``start()``,
``stop_app()``/``start_app()``, and ``partition()``/``heal()``. A partition is made on the
partitioned node itself: it switches the cookie it uses for each peer to a wrong one and drops
its connections to them, so every reconnection attempt (in either direction) fails the Erlang
handshake until ``heal()`` puts the right cookie back and pings them. The CLI keeps working
(its own connection uses the node's default cookie, which does not change).

The nodes run as the user running the suite (root in CI: unlike ``initdb``, RabbitMQ does not
refuse it), and the cookie is that user's file, mode 0400, as Erlang requires.

``destroy()`` stops every node, kills what did not stop, and then sweeps ``/proc`` for any VM
still carrying one of this cluster's node names (a node restarted by a test that failed
half-way): after it no beam of ours is left.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tests.sandbox import RabbitSandbox, _alive

SIZE = 3
DIST_OFFSET = 20_000  # RabbitMQ's own convention: distribution port = AMQP port + 20000
# AMQP ports come from here: the distribution ports (+20000) stay below the ephemeral range
# (32768 on Linux), so no free_port() of another sandbox can ever be one of them
PORT_LOW, PORT_HIGH = 5_000, 12_000
PARTITION_COOKIE = "cdc-relay-partitioned"

CLUSTER_CONF: dict[str, str] = {
    "cluster_partition_handling": "pause_minority",
    "vm_memory_high_watermark.absolute": "1536MiB",
}

T = TypeVar("T")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int = SIZE, rng: random.Random | None = None) -> list[int]:
    """``n`` AMQP ports under ``PORT_HIGH`` whose distribution ports (+20000) are free too."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(PORT_LOW, PORT_HIGH)
        if port in chosen or not (_bindable(port) and _bindable(port + DIST_OFFSET)):
            continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"no {n} free port pairs in {PORT_LOW}..{PORT_HIGH} (+{DIST_OFFSET})")


def parallel(fn: Callable[[T], Any], items: Iterable[T]) -> None:
    """Run ``fn`` on every item at once; the first exception is raised after all finished."""
    todo = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for future in [pool.submit(fn, item) for item in todo]:
            future.result()


@dataclass
class ClusterNode(RabbitSandbox):
    """A ``RabbitSandbox`` that uses the cluster's cookie (``HOME``) and can be killed."""

    home: Path = field(default_factory=Path)

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["HOME"] = str(self.home)  # $HOME/.erlang.cookie: the server and its CLI read it
        return env

    @property
    def pid(self) -> int | None:
        """The VM's pid while it runs (from its pid file)."""
        try:
            pid = int(self.pidfile.read_text().strip() or "0")
        except (OSError, ValueError):
            return None
        return pid if pid and _alive(pid) else None

    def kill(self) -> None:
        """kill -9 of the node's VM: no goodbye to clients or peers."""
        pid = self.pid
        assert pid is not None, f"{self.node} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)

    def leave(self) -> None:
        """Forget the single-node cluster this node booted into, before it joins another."""
        self.stop_app()
        self.ctl("reset")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app", timeout=180)

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).strip()


class RabbitCluster:
    """Three ``ClusterNode``\\ s joined into one cluster; see the module docstring."""

    def __init__(
        self,
        root: Path,
        size: int = SIZE,
        extra_conf: dict[str, str] | None = None,
        ports: list[int] | None = None,
    ) -> None:
        """``ports``: the AMQP ports of a cluster already running under ``root``."""
        self.root = root
        conf = {**CLUSTER_CONF, **(extra_conf or {})}
        self.nodes = [
            ClusterNode(
                root / f"node{i + 1}",
                port=port,
                dist_port=port + DIST_OFFSET,
                extra_conf=dict(conf),
                home=root,
            )
            for i, port in enumerate(ports or pick_ports(size))
        ]
        self.names = {n.node for n in self.nodes}

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> RabbitCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        cookie = self.root / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        try:
            parallel(lambda n: n.start(), self.nodes)
            first, others = self.nodes[0], self.nodes[1:]
            parallel(ClusterNode.leave, others)
            for node in others:
                node.ctl("join_cluster", first.node)
            parallel(lambda n: n.start_app(), others)
            self.wait_healthy()
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Stop every node; kill what did not stop; leave no VM of ours running."""
        parallel(lambda n: n.stop(), self.nodes)
        for pid in self.stray_pids():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.stray_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.stray_pids()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"RabbitMQ VMs of the cluster still running: {left}"

    def stray_pids(self) -> list[int]:
        """Live Erlang VMs started as one of this cluster's nodes (found by their
        environment: the node name is not on a RabbitMQ VM's command line)."""
        found: list[int] = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if not (proc / "cmdline").read_bytes().split(b"\0", 1)[0].endswith(b"beam.smp"):
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for var in environ:
                if var.startswith(b"RABBITMQ_NODENAME="):
                    name = var.split(b"=", 1)[1].decode(errors="replace")
                    if name in self.names and _alive(int(proc.name)):
                        found.append(int(proc.name))
        return found

    # -- addresses ------------------------------------------------------------------------------
    @property
    def amqp_url(self) -> str:
        """Every node, comma-separated, in node order: what ``amqp_url`` takes."""
        return ", ".join(n.amqp_url for n in self.nodes)

    def url_from(self, first: ClusterNode) -> str:
        """``amqp_url`` listing ``first`` first, then the others in node order (so a client
        connects there when it is up)."""
        rest = [n for n in self.nodes if n is not first]
        return ", ".join(n.amqp_url for n in [first, *rest])

    def node_at(self, url: str) -> ClusterNode:
        """The node an AMQP URL (or a relay's ``broker`` field) points at."""
        port = urlsplit(url).port
        return next(n for n in self.nodes if n.port == port)

    def node_named(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.node == name)

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.pid is not None]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` against the first node that answers."""
        errors: list[str] = []
        for node in self.running():
            try:
                return node.ctl(*args, timeout=timeout)
            except subprocess.CalledProcessError as exc:
                errors.append(f"{node.node}: {exc.stderr.strip()[:200]}")
        raise RuntimeError(f"no node answered rabbitmqctl {' '.join(args)}: {errors}")

    # -- state ----------------------------------------------------------------------------------
    def status(self, node: ClusterNode) -> dict[str, Any]:
        """``cluster_status`` as ``node`` sees it."""
        return dict(json.loads(node.ctl("cluster_status", "--formatter", "json")))

    def healthy(self) -> bool:
        """Every node runs its app, sees all three running, and records no partition.

        Asked in one ``eval`` that calls every node (each ``rabbitmqctl`` boots a VM of its
        own, about a second on this machine, so one question instead of six)."""
        alive = self.running()
        if len(alive) != len(self.nodes):
            return False
        names = ", ".join(f"'{n}'" for n in sorted(self.names))
        expression = (
            f"Ns = [{names}], "
            "{Up, Down} = rpc:multicall(Ns, rabbit, is_running, [], 10000), "
            "{Seen, _} = rpc:multicall(Ns, rabbit_nodes, all_running, [], 10000), "
            "{Parts, _} = rpc:multicall(Ns, rabbit_node_monitor, partitions, [], 10000), "
            "Down =:= [] andalso Up =:= [true || _ <- Ns] "
            "andalso [lists:sort(S) || S <- Seen, is_list(S)] =:= [Ns || _ <- Ns] "
            "andalso Parts =:= [[] || _ <- Ns]."
        )
        try:
            return alive[0].eval(expression) == "true"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False

    def wait_healthy(self, timeout: float = 120) -> float:
        """Wait until ``healthy()``; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster not healthy after {timeout}s: {self.describe()}")
            time.sleep(0.5)
        return time.monotonic() - start

    def repair(self, timeout: float = 180) -> None:
        """Undo whatever a test left behind (a dead node, a stopped app, a partition), so the
        next test starts on three healthy nodes; does nothing to a healthy cluster."""
        if self.healthy():
            return
        parallel(lambda n: n.start(), [n for n in self.nodes if n.pid is None])
        for node in self.nodes:
            self.heal(node)
        for node in self.nodes:
            if node.eval("rabbit:is_running().") != "true":
                time.sleep(2)  # a node paused by pause_minority resumes on its own once healed
                if node.eval("rabbit:is_running().") != "true":
                    node.start_app()
        self.wait_healthy(timeout)

    def describe(self) -> str:
        """What each running node says about the cluster, for failure messages."""
        out = []
        for node in self.nodes:
            if node.pid is None:
                out.append(f"{node.node}: not running")
                continue
            try:
                s = self.status(node)
                out.append(
                    f"{node.node}: running={s.get('running_nodes')} "
                    f"partitions={s.get('partitions')}"
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as exc:
                out.append(f"{node.node}: {exc}")
        return "; ".join(out)

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the default vhost with its type, messages, leader and members."""
        out = self.ctl(
            "list_queues",
            "name",
            "type",
            "messages",
            "leader",
            "members",
            "--formatter",
            "json",
        )
        return {str(q["name"]): dict(q) for q in json.loads(out)}

    def leader(self, queue: str) -> ClusterNode:
        """The node holding a quorum queue's leader."""
        info = self.queues()[queue]
        assert info.get("leader"), f"{queue} has no leader: {info}"
        return self.node_named(str(info["leader"]))

    def home(self, queue: str) -> ClusterNode:
        """The node a classic queue lives on (the node part of its process id)."""
        out = self.ctl("list_queues", "name", "pid", "--no-table-headers", "-q")
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == queue:
                return self.node_named(parts[1].lstrip("<").rsplit(".", 3)[0])
        raise AssertionError(f"no queue {queue}: {out}")

    # -- partitions -----------------------------------------------------------------------------
    def partition(self, node: ClusterNode) -> None:
        """Cut ``node`` off from its peers: a wrong cookie for each, then disconnect."""
        peers = ", ".join(f"'{n.node}'" for n in self.nodes if n is not node)
        node.eval(
            f"[begin erlang:set_cookie(P, '{PARTITION_COOKIE}'), erlang:disconnect_node(P) end "
            f"|| P <- [{peers}]], ok."
        )

    def heal(self, node: ClusterNode) -> None:
        """Give ``node`` the right cookie for its peers again and make it reach them."""
        peers = ", ".join(f"'{n.node}'" for n in self.nodes if n is not node)
        node.eval(
            f"[begin erlang:set_cookie(P, erlang:get_cookie()), net_adm:ping(P) end "
            f"|| P <- [{peers}]], ok."
        )
