"""How fast the pgoutput decoder is on real bytes: the relay decodes once per WAL change.

Decodes the captured stream (tests/unit/captured/*.hex, every message kind) repeatedly for about
two seconds, then the outbox Insert alone, each both from ``bytes`` and from a ``memoryview`` of a
'w' frame (the way the daemon receives it from psycopg), and prints messages per second.

    .venv/bin/python benchmarks/bench_decoder.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cdc_relay.pgoutput import Insert, decode
from cdc_relay.replication import XLogData, parse_copy_data

CAPTURED = Path(__file__).resolve().parent.parent / "tests" / "unit" / "captured"


def load_stream(pattern: str = "*.hex") -> list[bytes]:
    """Captured pgoutput messages in file order (the raw frames file is not pgoutput)."""
    messages: list[bytes] = []
    for path in sorted(CAPTURED.glob(pattern)):
        if path.name == "stream_frames.hex":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#"):
                messages.append(bytes.fromhex(line))
    return messages


def as_frame_payloads(messages: Sequence[bytes]) -> list[memoryview | bytes]:
    """The same messages as XLogData payloads: views into 'w' CopyData frames."""
    header = b"w" + struct.pack("!QQq", 1, 1, 0)
    payloads: list[memoryview | bytes] = []
    for message in messages:
        parsed = parse_copy_data(memoryview(header + message))
        assert isinstance(parsed, XLogData)
        payloads.append(parsed.payload)
    return payloads


def rate(label: str, batch: Sequence[bytes | memoryview], seconds: float) -> float:
    run: Callable[[bytes | memoryview], object] = decode
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for item in batch:
            run(item)
        done += len(batch)
        now = time.perf_counter()
        if now >= deadline:
            break
    per_second = done / (now - start)
    print(f"{label:<42} {per_second:>12,.0f} msg/s  {1e9 / per_second:>7,.0f} ns/msg")
    return per_second


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgoutput decoder throughput")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args(argv)
    stream = load_stream()
    if not stream:
        print(f"no captures under {CAPTURED}", file=sys.stderr)
        return 1
    outbox_insert = next(
        m
        for m in load_stream("insert.hex")
        if isinstance(msg := decode(m), Insert) and all(type(v) is bytes for v in msg.new)
    )
    kinds = "".join(sorted({chr(m[0]) for m in stream}))
    print(f"python {sys.version.split()[0]}; {len(stream)} captured messages, kinds {kinds}")
    print(f"outbox Insert: {len(outbox_insert)} bytes, 8 text columns (captured/insert.hex)")
    rate("captured stream, bytes", stream, args.seconds)
    rate("captured stream, memoryview payloads", as_frame_payloads(stream), args.seconds)
    inserts = [outbox_insert] * 100
    rate("outbox Insert, bytes", inserts, args.seconds)
    rate("outbox Insert, memoryview payload", as_frame_payloads(inserts), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
