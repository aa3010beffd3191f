"""Child processes of a benchmark run: cdc-relay itself, the peers, the producer, the consumer.

Each is a real process (its own interpreter, no shared GIL with the harness), started with its
stdout and stderr going to files in the run directory. Helpers read the JSON lines the benchmark
children print and the relay's ``"streaming"`` log line (the moment it starts reading the WAL).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from benchmarks.probe import cpu_seconds, status_kb

REPO = Path(__file__).resolve().parents[1]


class ChildError(RuntimeError):
    pass


class Child:
    """A child process whose stdout carries one JSON object per line."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self._read_pos = 0
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, line: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def _read(self) -> None:
        with self.out_path.open("rb") as f:
            f.seek(self._read_pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._read_pos += end
        for line in data[:end].splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.events.append(obj)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for ``{"event": event, ...}`` on stdout."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            for obj in self.events:
                if obj.get("event") == event:
                    return obj
                if obj.get("event") == "error":
                    raise ChildError(f"{self.name}: {obj.get('error')}\n{self.stderr()}")
            if not self.alive():
                self._read()
                for obj in self.events:
                    if obj.get("event") == event:
                        return obj
                raise ChildError(
                    f"{self.name} exited {self.proc.returncode} before {event!r}:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name}: no {event!r} after {timeout:.0f}s\n{self.stderr()}")
            time.sleep(0.005)

    def stderr(self) -> str:
        text = self.err_path.read_text(errors="replace")
        return text[-3000:]

    def terminate(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildError(f"{self.name} still running after {timeout:.0f}s") from None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._out.close()
        self._err.close()

    # -- resource use, read while the process is alive ----------------------------------------
    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float:
        return status_kb(self.pid, "VmHWM") / 1024


def python_child(
    name: str, module: str, args: list[str], logdir: Path, stdin: bool = False
) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return Child(name, [sys.executable, "-m", module, *args], logdir, env=env, stdin=stdin)


def relay_env(dsn: str, amqp_url: str, slot: str, exchange: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_RELAY_")}
    env.update(
        CDC_RELAY_PG_DSN=dsn,
        CDC_RELAY_AMQP_URL=amqp_url,
        CDC_RELAY_SLOT=slot,
        CDC_RELAY_PUBLICATION=slot,
        CDC_RELAY_EXCHANGE=exchange,
        CDC_RELAY_LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"CDC_RELAY_{k.upper()}": v for k, v in extra.items()})
    return env


def relay_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    if out.returncode != 0:
        raise ChildError(f"cdc-relay {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out.stdout


class CdcProcess(Child):
    """A ``cdc-relay`` command that runs until stopped; its JSON logs go to stderr."""

    def log_time(self, msg: str, timeout: float = 60) -> float:
        """Unix time of the first log record whose message is ``msg``."""
        needle = f'"msg": "{msg}"'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.err_path.read_text(errors="replace").splitlines():
                if needle in line:
                    ts = json.loads(line)["ts"]
                    return dt.datetime.fromisoformat(ts).timestamp()
            if not self.alive():
                raise ChildError(f"{self.name} exited {self.proc.returncode}:\n{self.stderr()}")
            time.sleep(0.005)
        raise ChildError(f"{self.name}: no {msg!r} record after {timeout:.0f}s:\n{self.stderr()}")

    def log_problems(self, limit: int = 20) -> list[str]:
        """The warning and error records ("ts level msg: error"), oldest first."""
        out: list[str] = []
        for line in self.err_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("level") in ("warning", "error", "critical"):
                detail = f": {rec['error']}" if "error" in rec else ""
                out.append(f"{rec.get('ts')} {rec.get('level')} {rec.get('msg')}{detail}")
        return out[:limit]

    def stop(self, timeout: float = 60) -> int:
        code = self.terminate(timeout)
        if code != 0:
            raise ChildError(f"{self.name} exited {code} on SIGTERM:\n{self.stderr()}")
        return code


class CdcRelay(CdcProcess):
    """``python -m cdc_relay.cli run``."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path) -> None:
        super().__init__(name, [sys.executable, "-m", "cdc_relay.cli", "run"], logdir, env=env)

    def wait_streaming(self, timeout: float = 60) -> float:
        """Unix time of the relay's ``streaming`` log record (when it starts reading the WAL)."""
        return self.log_time("streaming", timeout)


class CdcConsumer(CdcProcess):
    """``python -m cdc_relay.cli consume --queue QUEUE --handler HANDLER``: the consumer kit,
    driven only through its command line and ``CDC_RELAY_*`` settings, as a user runs it."""

    def __init__(
        self, name: str, env: dict[str, str], logdir: Path, queue: str, handler: str
    ) -> None:
        argv = [sys.executable, "-m", "cdc_relay.cli", "consume", "--queue", queue]
        super().__init__(name, [*argv, "--handler", handler], logdir, env=env)

    def wait_consuming(self, timeout: float = 60) -> float:
        """Unix time of the kit's ``consuming`` log record (its channel is set up and it is
        about to take messages)."""
        return self.log_time("consuming", timeout)
