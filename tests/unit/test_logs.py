"""Structured logs: one JSON object or one logfmt line per record, context from ``extra``."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cdc_relay import logs
from cdc_relay.logs import JsonFormatter, LogfmtFormatter

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    pika = logging.getLogger("pika")
    saved = (root.handlers[:], root.level, pika.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pika.setLevel(saved[2])


def emit(
    formatter: logging.Formatter,
    msg: str,
    *args: object,
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc: bool = False,
    raiser: Callable[[], object] | None = None,
    **kwargs: Any,
) -> str:
    """Log one record through ``formatter`` on an isolated logger; return the raw output.

    ``exc``: log with ``logger.exception`` while handling ``KeyError("boom")``, or whatever
    ``raiser`` raises."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("cdc_relay.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        if exc or raiser is not None:
            try:
                if raiser is not None:
                    raiser()
                raise KeyError("boom")
            except Exception:
                logger.exception(msg, *args, extra=extra, **kwargs)
        else:
            logger.log(level, msg, *args, extra=extra, **kwargs)
    finally:
        logger.handlers.clear()
        logger.propagate = True
    return stream.getvalue()


def one_json(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    assert len(lines) == 1, text
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def logfmt_pairs(line: str) -> dict[str, str]:
    """Parse one logfmt line (values bare or JSON-quoted)."""
    pairs: dict[str, str] = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        value = m.group(2)
        pairs[m.group(1)] = json.loads(value) if value.startswith('"') else value
    return pairs


# --- JSON ----------------------------------------------------------------------------------------


def test_json_record_has_standard_fields() -> None:
    obj = one_json(emit(JsonFormatter(), "relay %s", "started", level=logging.WARNING))
    assert obj["level"] == "warning"
    assert obj["logger"] == "cdc_relay.test_logs"
    assert obj["msg"] == "relay started"
    assert TS_RE.match(obj["ts"]), obj["ts"]
    assert list(obj)[:4] == ["ts", "level", "logger", "msg"]


def test_json_record_carries_extra_fields() -> None:
    extra = {
        "slot": "cdc_relay",
        "lsn": "16/B374D848",
        "event_id": "0b6f7d4e-0c5a-4d8e-9b1e-6f0f3a1c2d3e",
        "in_flight": 12,
        "retryable": True,
        "ratio": 0.5,
        "nothing": None,
    }
    obj = one_json(emit(JsonFormatter(), "published", extra=extra))
    for key, value in extra.items():
        assert obj[key] == value
        assert type(obj[key]) is type(value)


def test_json_non_scalar_extras_become_strings() -> None:
    obj = one_json(emit(JsonFormatter(), "x", extra={"tags": ["a", "b"], "obj": object()}))
    assert obj["tags"] == "['a', 'b']"
    assert isinstance(obj["obj"], str)


def test_json_does_not_leak_standard_record_attributes() -> None:
    obj = one_json(emit(JsonFormatter(), "x"))
    for internal in ("args", "pathname", "lineno", "thread", "exc_info", "msecs", "levelno"):
        assert internal not in obj


def test_json_one_object_per_record_even_with_newlines() -> None:
    out = emit(JsonFormatter(), "line one\nline two", extra={"detail": "a\nb"})
    obj = one_json(out)
    assert obj["msg"] == "line one\nline two"
    assert obj["detail"] == "a\nb"


def test_json_keeps_non_ascii() -> None:
    out = emit(JsonFormatter(), "Zoë 東京")
    assert "Zoë 東京" in out
    assert one_json(out)["msg"] == "Zoë 東京"


def test_json_exception_records_name_the_error_type() -> None:
    obj = one_json(emit(JsonFormatter(), "internal error", level=logging.ERROR, exc=True))
    assert obj["error_type"] == "KeyError"
    assert obj["level"] == "error"


# --- tracebacks (review 7.2) ---------------------------------------------------------------------


def _decode_row(row_payload: str) -> None:
    """Fails deep inside with a local holding row data, like a mapper would."""
    payload = {"secret": row_payload}
    _inner(payload)


def _inner(payload: dict[str, str]) -> None:
    raise ValueError(f"cannot map a row with {len(payload)} keys")


def _fails_with_cause() -> None:
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as err:
        raise RuntimeError("wrapper failed") from err


def test_json_exception_records_carry_the_whole_traceback() -> None:
    secret = f"row-data-{uuid.uuid4()}"
    obj = one_json(emit(JsonFormatter(), "internal error", raiser=lambda: _decode_row(secret)))
    tb = obj["traceback"]
    assert isinstance(tb, str)
    assert obj["error_type"] == "ValueError"
    assert obj["msg"] == "internal error"
    lines = tb.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: cannot map a row with 1 keys"
    assert not tb.endswith("\n")
    # every frame from the handler down to the raise, with file, line, function and code
    assert f'File "{__file__}"' in tb
    assert tb.index("in emit") < tb.index("in _decode_row") < tb.index("in _inner")
    assert "_inner(payload)" in tb
    assert 'raise ValueError(f"cannot map a row with {len(payload)} keys")' in tb
    # frames hold code, not data: the local variables (the row's payload) are never printed
    assert secret not in tb
    assert secret not in json.dumps(obj)


def test_json_traceback_includes_the_chained_cause() -> None:
    obj = one_json(emit(JsonFormatter(), "internal error", raiser=_fails_with_cause))
    tb = obj["traceback"]
    assert obj["error_type"] == "RuntimeError"
    assert "KeyError: 'missing'" in tb
    assert "The above exception was the direct cause of the following exception:" in tb
    assert tb.endswith("RuntimeError: wrapper failed")
    assert tb.count("Traceback (most recent call last):") == 2


def test_traceback_redacts_credentials_in_exception_messages() -> None:
    def fail() -> None:
        raise ConnectionError("cannot reach amqp://relay:p@ss:w0rd@mq:5672/%2F (password=hunter22)")

    for formatter in (JsonFormatter(), LogfmtFormatter()):
        out = emit(formatter, "connect failed", raiser=fail)
        assert "p@ss" not in out
        assert "w0rd" not in out
        assert "hunter22" not in out
        assert "amqp://relay:***@mq:5672/%2F" in out


def test_records_without_an_exception_have_no_traceback() -> None:
    plain = one_json(emit(JsonFormatter(), "fine"))
    assert "traceback" not in plain
    assert "error_type" not in plain
    # exc_info=True outside an except block: logging stores (None, None, None)
    outside = one_json(emit(JsonFormatter(), "no error here", level=logging.ERROR, exc_info=True))
    assert "traceback" not in outside
    assert "error_type" not in outside
    line = emit(LogfmtFormatter(), "fine")
    assert "traceback=" not in line


def test_stack_info_is_kept_when_asked_for() -> None:
    obj = one_json(emit(JsonFormatter(), "where am I", stack_info=True))
    assert obj["stack"].startswith("Stack (most recent call last):")
    assert "in emit" in obj["stack"]
    assert "traceback" not in obj


def test_json_multiple_records_are_separate_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cdc_relay.test_logs.multi")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("one", extra={"n": 1})
        logger.info("two", extra={"n": 2})
    finally:
        logger.handlers.clear()
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2]


# --- logfmt --------------------------------------------------------------------------------------


def test_logfmt_simple_values_are_bare() -> None:
    out = emit(LogfmtFormatter(), "started", extra={"slot": "cdc_relay", "lsn": "16/B374D848"})
    line = out.rstrip("\n")
    assert "level=info" in line
    assert "logger=cdc_relay.test_logs" in line
    assert "msg=started" in line
    assert "slot=cdc_relay" in line
    assert "lsn=16/B374D848" in line
    assert line.startswith("ts=")


def test_logfmt_quotes_values_with_spaces_equals_quotes_or_nothing() -> None:
    extra = {"reason": "broker went away", "expr": "a=b", "quoted": 'say "hi"', "empty": ""}
    line = emit(LogfmtFormatter(), "relay stopped now", extra=extra).rstrip("\n")
    assert 'msg="relay stopped now"' in line
    assert 'reason="broker went away"' in line
    assert 'expr="a=b"' in line
    assert 'quoted="say \\"hi\\""' in line
    assert 'empty=""' in line
    pairs = logfmt_pairs(line)
    assert pairs["msg"] == "relay stopped now"
    assert pairs["reason"] == "broker went away"
    assert pairs["expr"] == "a=b"
    assert pairs["quoted"] == 'say "hi"'
    assert pairs["empty"] == ""


def test_logfmt_scalars() -> None:
    line = emit(LogfmtFormatter(), "x", extra={"n": 3, "ok": True, "none": None}).rstrip("\n")
    assert "n=3" in line
    assert "ok=True" in line
    assert "none=None" in line


def test_logfmt_keeps_non_ascii() -> None:
    line = emit(LogfmtFormatter(), "Zoë 東京").rstrip("\n")
    assert 'msg="Zoë 東京"' in line


def test_logfmt_one_line_per_record_even_with_newlines() -> None:
    # PostgreSQL errors are multi-line ("ERROR: ...\nDETAIL: ..."); a logfmt record must stay one
    # line or log shippers split it into fragments without level, logger or context
    out = emit(
        LogfmtFormatter(),
        "replication failed: ERROR:  boom\nDETAIL:  more",
        extra={"detail": "a\nb", "slot": "cdc_relay"},
    )
    assert out.count("\n") == 1
    assert out.endswith("\n")
    pairs = logfmt_pairs(out.rstrip("\n"))
    assert pairs["msg"] == "replication failed: ERROR:  boom\nDETAIL:  more"
    assert pairs["detail"] == "a\nb"
    assert pairs["slot"] == "cdc_relay"


def test_logfmt_traceback_is_one_quoted_value_on_the_record_line() -> None:
    secret = f"row-data-{uuid.uuid4()}"
    out = emit(LogfmtFormatter(), "internal error", raiser=lambda: _decode_row(secret))
    assert out.count("\n") == 1, "a traceback must not split the record into several lines"
    pairs = logfmt_pairs(out.rstrip("\n"))
    assert pairs["error_type"] == "ValueError"
    assert pairs["level"] == "error"
    tb = pairs["traceback"]
    assert tb.startswith("Traceback (most recent call last):\n")
    assert tb.endswith("ValueError: cannot map a row with 1 keys")
    assert "in _inner" in tb
    assert secret not in out
    # the same text as the JSON formatter gives, apart from the line numbers of the emit call
    json_tb = one_json(emit(JsonFormatter(), "x", raiser=lambda: _decode_row(secret)))["traceback"]
    assert tb.splitlines()[0] == json_tb.splitlines()[0]
    assert tb.splitlines()[-3:] == json_tb.splitlines()[-3:]


# --- setup ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_setup_installs_exactly_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    root.addHandler(logging.NullHandler())
    root.addHandler(logging.NullHandler())
    logs.setup("info", "json")
    assert len(root.handlers) == 1
    logs.setup("debug", "json")
    assert len(root.handlers) == 1
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, JsonFormatter)
    assert root.level == logging.DEBUG
    logging.getLogger("test_logs_setup").debug("hello", extra={"slot": "s"})
    obj = one_json(capsys.readouterr().err)
    assert obj["msg"] == "hello"
    assert obj["slot"] == "s"


@pytest.mark.usefixtures("restore_logging")
def test_setup_logfmt_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("warning", "logfmt")
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, LogfmtFormatter)
    assert root.level == logging.WARNING
    log = logging.getLogger("test_logs_setup")
    log.info("hidden")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "msg=shown" in err
    assert "level=warning" in err


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("level", "pika_level"),
    [("debug", logging.CRITICAL), ("info", logging.CRITICAL), ("error", logging.CRITICAL)],
)
def test_setup_quiets_pika(level: str, pika_level: int) -> None:
    """pika logs each failed connection attempt at ERROR (with a traceback) before the relay
    hears of it and reports it once, classified: only its CRITICAL records pass."""
    logs.setup(level, "json")
    assert logging.getLogger("pika").level == pika_level
