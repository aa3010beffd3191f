"""AMQP 0-9-1 basic-properties encoding for the relay's messages, sans-I/O.

pika encodes properties field by field in Python, which was the largest single cost per
published event. The relay's properties always have the same shape (content type, headers,
delivery mode, message id, timestamp, type, app id), so encoding them with a few precompiled
``struct`` calls is several times faster. Only string-valued headers take this path; anything
else (numbers, nested objects from an outbox ``headers`` column) is left to pika's general
encoder. Unit tests pin the output to pika's byte for byte.
"""

from __future__ import annotations

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

_FLAGS = struct.Struct(">H")
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LONGSTR = struct.Struct(">cI")


def _shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {text[:40]!r}...")
    return _U8.pack(len(raw)) + raw


def string_headers(headers: Mapping[str, object]) -> TypeGuard[Mapping[str, str]]:
    """True when every header value is a ``str`` (the fast path applies)."""
    return all(type(v) is str for v in headers.values())


def encode_string_table(headers: Mapping[str, str]) -> bytes:
    """A field table whose values are all long strings ('S')."""
    parts = []
    for key, value in headers.items():
        raw = value.encode()
        parts.append(_shortstr(key))
        parts.append(_LONGSTR.pack(b"S", len(raw)))
        parts.append(raw)
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def encode_properties(
    content_type: str,
    headers: Mapping[str, str],
    delivery_mode: int,
    message_id: str,
    timestamp: int,
    type_: str,
    app_id: str,
) -> bytes:
    """The property list of a content header frame, exactly as pika would encode it."""
    return b"".join(
        (
            _FLAGS.pack(
                _CONTENT_TYPE
                | _HEADERS
                | _DELIVERY_MODE
                | _MESSAGE_ID
                | _TIMESTAMP
                | _TYPE
                | _APP_ID
            ),
            _shortstr(content_type),
            encode_string_table(headers),
            _U8.pack(delivery_mode),
            _shortstr(message_id),
            _U64.pack(timestamp),
            _shortstr(type_),
            _shortstr(app_id),
        )
    )


# frame layout: type (octet), channel (short), size (long), payload, frame-end 0xCE
_FRAME_HEAD = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_PUBLISH_HEAD = struct.Struct(">HHH")  # class 60 basic, method 40 publish, reserved ticket 0
_CONTENT_HEAD = struct.Struct(">HHQ")  # class 60, weight 0, body size


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: bytes,
    body: bytes,
    frame_max: int,
) -> bytes:
    """The method, content-header and body frames of one ``basic.publish``, ready to write.

    ``properties`` comes from ``encode_properties``; bodies larger than a frame are split at
    ``frame_max - 8`` like every AMQP client must.
    """
    method = b"".join(
        (
            _PUBLISH_HEAD.pack(60, 40, 0),
            _shortstr(exchange),
            _shortstr(routing_key),
            _U8.pack(1 if mandatory else 0),
        )
    )
    header = _CONTENT_HEAD.pack(60, 0, len(body)) + properties
    parts = [
        _FRAME_HEAD.pack(_METHOD, channel, len(method)),
        method,
        _FRAME_END,
        _FRAME_HEAD.pack(_HEADER, channel, len(header)),
        header,
        _FRAME_END,
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += (_FRAME_HEAD.pack(_BODY, channel, len(piece)), piece, _FRAME_END)
    return b"".join(parts)
