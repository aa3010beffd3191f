"""Structured logs: one JSON object (or logfmt line) per record.

Context such as slot, LSN and event id travels as ``extra={...}`` so log pipelines can index it;
payloads and credentials are never passed to the logger in the first place.

A record with ``exc_info`` (``log.exception``) carries ``error_type`` and ``traceback``: the
formatted stack, chained causes included. Frames show file, line, function and source line,
never local variables, so no row data gets in; the text is still passed through ``redact`` in
case an exception message echoes a connection string.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any

from cdc_relay.config import redact

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value if isinstance(value, int | float | bool | None) else str(value)
    if record.exc_info and record.exc_info[1] is not None:
        out["error_type"] = type(record.exc_info[1]).__name__
        out["traceback"] = _traceback(record.exc_info[1])
    if record.stack_info:
        out["stack"] = redact(record.stack_info)
    return out


def _traceback(exc: BaseException) -> str:
    """``Traceback (most recent call last): ...`` as Python prints it, without the last newline."""
    return redact("".join(traceback.format_exception(exc)).rstrip("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in '="\\' or c.isspace() or not c.isprintable() for c in text):
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{key}={text}")
        return " ".join(parts)


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika narrates every connection step at INFO, and logs each failed attempt at ERROR with a
    # traceback before it tells the relay, which then reports it once, classified; keep only
    # what pika alone knows about (its CRITICAL records)
    logging.getLogger("pika").setLevel(max(logging.CRITICAL, root.level))
