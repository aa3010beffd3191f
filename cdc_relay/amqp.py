"""AMQP 0-9-1 encoding for the relay's messages, sans-I/O: properties, field tables, frames.

pika encodes properties field by field in Python, which was the largest single cost per
published event, and it cannot encode every JSON value (floats, integers beyond 64 bits). So the
relay encodes everything it sends itself:

* ``encode_properties``: the relay's properties always have the same shape (content type,
  headers, delivery mode, message id, timestamp, type, app id), encoded with a few precompiled
  ``struct`` calls. Unit tests pin the output to pika's byte for byte.
* ``encode_table``: a field table for any JSON value, using only types RabbitMQ parses (its
  table types are ``t b B s u I l f d D S A T F V x``; the relay writes ``S t l d F A V``). A
  table whose values are all strings takes a fast path, because that is nearly every event.
* ``publish_frames``: the method, content-header and body frames of one ``basic.publish`` as a
  list of parts, so a large body is never copied to build its frame.

Anything AMQP cannot carry raises ``EncodeError`` naming the field, never a bare ``ValueError``
from deep inside, so the caller can tell the operator which column to fix.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import TypeGuard

# property flags, highest bit first (AMQP 0-9-1 basic class)
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3
_RELAY_FLAGS = (
    _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP | _TYPE | _APP_ID
)

_FLAGS = struct.Struct(">H")
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64_MAX = (1 << 64) - 1
_LONGSTR = struct.Struct(">cI")
_LONGLONG = struct.Struct(">cq")
_DOUBLE = struct.Struct(">cd")

SHORTSTR_MAX = 255
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# Nesting deeper than this is refused: the encoder recurses, and no sane header needs it.
MAX_DEPTH = 100
# What a content-header frame adds around ``encode_properties``' output (which starts with the
# 2-byte property flags): frame type, channel and size (7), class, weight and body size (12),
# frame end (1). The frame must fit the negotiated frame_max whole: unlike a body, a content
# header is never split.
CONTENT_HEADER_OVERHEAD = 7 + 12 + 1


class EncodeError(ValueError):
    """A value AMQP 0-9-1 cannot carry, with the property it was meant for.

    ``field`` is ``message_id``, ``type``, ``headers``, ``timestamp``, ``exchange``,
    ``routing_key``, ``content_type`` or ``app_id``; ``problem`` never quotes more than a short
    prefix of the value (values may be personal data).
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def _prefix(text: str) -> str:
    """At most 40 characters of a value, for an error that must say which one is meant."""
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def _shortstr(text: str, field: str) -> bytes:
    try:
        raw = text.encode()
    except UnicodeEncodeError:
        raise EncodeError(field, "text holds a lone surrogate, not valid Unicode") from None
    if len(raw) > SHORTSTR_MAX:
        raise EncodeError(
            field,
            f"{len(raw)} bytes of UTF-8 exceed AMQP's short-string limit of 255 "
            f"(starts {_prefix(text)})",
        )
    return _U8.pack(len(raw)) + raw


_KEYS: dict[object, bytes] = {}  # encoded table keys: header names repeat on every event
_KEYS_MAX = 4096


def _key(key: object) -> bytes:
    cached = _KEYS.get(key)
    if cached is not None:
        return cached
    if type(key) is not str:
        raise EncodeError("headers", f"table key of type {type(key).__name__} is not text")
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        raise EncodeError("headers", "header key holds a lone surrogate") from None
    if len(raw) > SHORTSTR_MAX:
        raise EncodeError(
            "headers",
            f"header key of {len(raw)} bytes exceeds AMQP's 255 (starts {_prefix(key)})",
        )
    encoded = _U8.pack(len(raw)) + raw
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[key] = encoded
    return encoded


def string_headers(headers: Mapping[str, object]) -> TypeGuard[Mapping[str, str]]:
    """True when every header value is a ``str`` (the fast path applies)."""
    return all(type(v) is str for v in headers.values())


def encode_string_table(headers: Mapping[str, str]) -> bytes:
    """A field table whose values are all long strings ('S')."""
    parts: list[bytes] = []
    size = _string_entries_into(parts, headers)
    return _U32.pack(size) + b"".join(parts)


def _string_entries_into(parts: list[bytes], headers: Mapping[str, str]) -> int:
    """The fast path: append entries whose values are all ``str``; return their size."""
    size = 0
    append = parts.append
    try:
        for key, value in headers.items():
            name = _KEYS.get(key) or _key(key)
            raw = value.encode()
            n = len(raw)
            append(name)
            append(_LONGSTR.pack(b"S", n))
            append(raw)
            size += len(name) + 5 + n
    except UnicodeEncodeError:
        raise EncodeError("headers", "header value holds a lone surrogate") from None
    return size


def encode_table(table: Mapping[str, object]) -> bytes:
    """A field table for JSON-shaped values, as RabbitMQ parses them.

    ``str`` → S, ``bool`` → t, ``int`` in signed 64 bits → l, any other ``int`` → S with its
    decimal text (JSON allows any integer, AMQP does not), finite ``float`` → d, ``None`` → V,
    mapping → F (nested table), list or tuple → A. Non-finite floats are refused: RabbitMQ
    (Erlang) cannot parse NaN or infinity and would close the connection.
    """
    parts: list[bytes] = []
    size = _entries_into(parts, table, None)
    return _U32.pack(size) + b"".join(parts)


def _entries_into(parts: list[bytes], table: Mapping[str, object], strings: bool | None) -> int:
    if strings if strings is not None else string_headers(table):
        return _string_entries_into(parts, table)  # type: ignore[arg-type]
    return _table_into(parts, table, 0)


def _table_into(parts: list[bytes], table: Mapping[str, object], depth: int) -> int:
    """Append a table's entries (without its length) to ``parts``; return their size."""
    size = 0
    for key, value in table.items():
        raw = _key(key)
        parts.append(raw)
        size += len(raw) + _value_into(parts, value, depth)
    return size


def _value_into(parts: list[bytes], value: object, depth: int) -> int:
    """Append one typed field value; return its encoded size."""
    if isinstance(value, str):
        try:
            raw = value.encode()
        except UnicodeEncodeError:
            raise EncodeError("headers", "header value holds a lone surrogate") from None
        parts.append(_LONGSTR.pack(b"S", len(raw)))
        parts.append(raw)
        return 5 + len(raw)
    if isinstance(value, bool):
        parts.append(b"t\x01" if value else b"t\x00")
        return 2
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            parts.append(_LONGLONG.pack(b"l", value))
            return 9
        return _value_into(parts, _decimal_text(value), depth)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncodeError("headers", "header value is not a finite number")
        parts.append(_DOUBLE.pack(b"d", value))
        return 9
    if value is None:
        parts.append(b"V")
        return 1
    if depth >= MAX_DEPTH:
        raise EncodeError("headers", f"header value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        at = len(parts)
        parts.append(b"")
        size = _table_into(parts, value, depth + 1)
        parts[at] = b"F" + _U32.pack(size)
        return 5 + size
    if isinstance(value, list | tuple):
        at = len(parts)
        parts.append(b"")
        size = 0
        for item in value:
            size += _value_into(parts, item, depth + 1)
        parts[at] = _LONGSTR.pack(b"A", size)
        return 5 + size
    raise EncodeError("headers", f"header value of type {type(value).__name__} has no AMQP form")


def _decimal_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        raise EncodeError("headers", "integer header value too large to write out") from None


_HEADS: dict[str, bytes] = {}  # flags + content type, per content type
_TAILS: dict[str, bytes] = {}  # app id, per app id


def encode_properties(
    content_type: str,
    headers: Mapping[str, object],
    delivery_mode: int,
    message_id: str,
    timestamp: int,
    type_: str,
    app_id: str,
    *,
    strings: bool | None = None,
) -> bytes:
    """The property list of a content header frame, exactly as pika would encode it.

    (pika writes small integers as 'I' where this writes 'l'; both decode to the same value.)
    ``strings=True`` promises every header value is a ``str`` (the caller knows, so the check
    is skipped); ``None`` checks.
    """
    try:
        stamp = _U64.pack(timestamp)
    except struct.error:
        raise EncodeError("timestamp", "not an unsigned 64-bit number of seconds") from None
    head = _HEADS.get(content_type)
    if head is None:
        head = _HEADS[content_type] = _FLAGS.pack(_RELAY_FLAGS) + _shortstr(
            content_type, "content_type"
        )
    tail = _TAILS.get(app_id)
    if tail is None:
        tail = _TAILS[app_id] = _shortstr(app_id, "app_id")
    parts = [head, b""]
    parts[1] = _U32.pack(_entries_into(parts, headers, strings))
    parts += (
        _U8.pack(delivery_mode),
        _shortstr(message_id, "message_id"),
        stamp,
        _shortstr(type_, "type"),
        tail,
    )
    return b"".join(parts)


_U32_PACK = _U32.pack
_U8_PACK = _U8.pack
_U64_PACK = _U64.pack
# table keys of the relay's own headers, each with its value's type tag ('S', long string)
_EVENT_KEYS = tuple(
    _U8.pack(len(k)) + k + b"S"
    for k in (b"aggregate_type", b"aggregate_id", b"source_lsn", b"traceparent")
)
_EVENT_TABLE_FIXED = sum(len(k) + 4 for k in _EVENT_KEYS[:3])


def encode_event_properties(
    content_type: str,
    aggregate_type: str,
    aggregate_id: str,
    source_lsn: str,
    traceparent: str | None,
    delivery_mode: int,
    message_id: str,
    timestamp: int,
    type_: str,
    app_id: str,
) -> bytes:
    """``encode_properties`` for the relay's own header table, the shape of nearly every event.

    The same bytes as ``encode_properties`` with headers ``{aggregate_type, aggregate_id,
    source_lsn[, traceparent]}`` in that order, built in one join without a dict walk: this is
    paid once per event. Anything unusual (a value that is not valid Unicode, an id or type
    over 255 bytes, a timestamp out of range) goes the general way, which names the problem.
    """
    try:
        at = aggregate_type.encode()
        ai = aggregate_id.encode()
        lsn = source_lsn.encode()
        mid = message_id.encode()
        ty = type_.encode()
        tp = traceparent.encode() if traceparent else None
    except UnicodeEncodeError:
        mid = None
    head = _HEADS.get(content_type)
    tail = _TAILS.get(app_id)
    if (
        mid is None
        or head is None  # the first event fills the caches the general way
        or tail is None
        or len(mid) > SHORTSTR_MAX
        or len(ty) > SHORTSTR_MAX
        or not 0 <= timestamp <= _U64_MAX
    ):
        headers: dict[str, object] = {
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "source_lsn": source_lsn,
        }
        if traceparent:
            headers["traceparent"] = traceparent
        return encode_properties(
            content_type, headers, delivery_mode, message_id, timestamp, type_, app_id
        )
    k_at, k_ai, k_lsn, k_tp = _EVENT_KEYS
    size = _EVENT_TABLE_FIXED + len(at) + len(ai) + len(lsn)
    trace: tuple[bytes, ...] = ()
    if tp is not None:
        trace = (k_tp, _U32_PACK(len(tp)), tp)
        size += len(k_tp) + 4 + len(tp)
    return b"".join(
        (
            head,
            _U32_PACK(size),
            k_at, _U32_PACK(len(at)), at,
            k_ai, _U32_PACK(len(ai)), ai,
            k_lsn, _U32_PACK(len(lsn)), lsn,
            *trace,
            _U8_PACK(delivery_mode),
            _U8_PACK(len(mid)), mid,
            _U64_PACK(timestamp),
            _U8_PACK(len(ty)), ty,
            tail,
        )
    )  # fmt: skip


def content_header_size(properties: bytes) -> int:
    """Bytes the content-header frame carrying ``properties`` takes on the wire."""
    return CONTENT_HEADER_OVERHEAD + len(properties)


# frame layout: type (octet), channel (short), size (long), payload, frame-end 0xCE
_FRAME_HEAD = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_PUBLISH_HEAD = struct.Struct(">HHH")  # class 60 basic, method 40 publish, reserved ticket 0
_CONTENT_HEAD = struct.Struct(">HHQ")  # class 60, weight 0, body size: 12 bytes


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: bytes,
    body: bytes,
    frame_max: int,
) -> list[bytes | memoryview]:
    """The frames of one ``basic.publish`` as parts to write in order, never joined here.

    ``properties`` comes from ``encode_properties``. The body (and the properties, which can
    be large too) stay separate parts, and bodies larger than a frame are split at
    ``frame_max - 8`` into memoryview slices: the only copy is the writer's single join of a
    whole loop turn's output.
    """
    method = b"".join(
        (
            _PUBLISH_HEAD.pack(60, 40, 0),
            _shortstr(exchange, "exchange"),
            _shortstr(routing_key, "routing_key"),
            b"\x01" if mandatory else b"\x00",
        )
    )
    size = len(body)
    parts: list[bytes | memoryview] = [
        b"".join(
            (
                _FRAME_HEAD.pack(_METHOD, channel, len(method)),
                method,
                _FRAME_END,
                _FRAME_HEAD.pack(_HEADER, channel, 12 + len(properties)),
                _CONTENT_HEAD.pack(60, 0, size),
            )
        ),
        properties,
    ]
    chunk = frame_max - 8
    if size <= chunk:
        if size:
            parts += (_FRAME_END + _FRAME_HEAD.pack(_BODY, channel, size), body, _FRAME_END)
        else:
            parts.append(_FRAME_END)
        return parts
    parts.append(_FRAME_END)
    view = memoryview(body)
    for start in range(0, size, chunk):
        piece = view[start : start + chunk]
        parts += (_FRAME_HEAD.pack(_BODY, channel, len(piece)), piece, _FRAME_END)
    return parts


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: bytes,
    body: bytes,
    frame_max: int,
) -> bytes:
    """``publish_frames`` joined into one buffer (for tests and one-off writers)."""
    return b"".join(
        publish_frames(channel, exchange, routing_key, mandatory, properties, body, frame_max)
    )
