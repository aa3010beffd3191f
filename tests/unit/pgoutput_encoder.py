"""A pgoutput (protocol version 1) encoder for tests only.

The relay never sends pgoutput; this exists so property tests can state ``decode(encode(x)) == x``
for every message kind, and so the captured server bytes can be checked the other way round
(``encode(decode(raw)) == raw``), which keeps this encoder honest against the real wire format.
It is written independently of the decoder (plain ``struct.pack``, no shared helpers).
"""

from __future__ import annotations

import struct

from cdc_relay.pgoutput import (
    Begin,
    Binary,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleData,
    Type,
    UnchangedToast,
    Update,
)


def _string(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError(f"pgoutput strings cannot contain NUL: {text!r}")
    return data + b"\0"


def encode_tuple(values: TupleData) -> bytes:
    parts = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        elif isinstance(value, UnchangedToast):
            parts.append(b"u")
        elif isinstance(value, Binary):
            parts.append(b"b" + struct.pack("!I", len(value.data)) + value.data)
        else:
            parts.append(b"t" + struct.pack("!I", len(value)) + value)
    return b"".join(parts)


def encode(message: PgOutputMessage) -> bytes:
    """The bytes a version-1 pgoutput server would send for ``message``."""
    match message:
        case Begin(final_lsn=lsn, commit_time=time, xid=xid):
            return b"B" + struct.pack("!QqI", lsn, time, xid)
        case Commit(flags=flags, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=time):
            return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, time)
        case Origin(commit_lsn=lsn, name=name):
            return b"O" + struct.pack("!Q", lsn) + _string(name)
        case Relation():
            parts = [
                b"R",
                struct.pack("!I", message.oid),
                _string(message.namespace),
                _string(message.name),
                struct.pack("!BH", message.replica_identity, len(message.columns)),
            ]
            for column in message.columns:
                parts.append(struct.pack("!B", column.flags))
                parts.append(_string(column.name))
                parts.append(struct.pack("!Ii", column.type_oid, column.type_modifier))
            return b"".join(parts)
        case Type(oid=oid, namespace=namespace, name=name):
            return b"Y" + struct.pack("!I", oid) + _string(namespace) + _string(name)
        case Insert(relation_oid=oid, new=new):
            return b"I" + struct.pack("!I", oid) + b"N" + encode_tuple(new)
        case Update(relation_oid=oid, old=old, key=key, new=new):
            if old is not None and key is not None:
                raise ValueError("an Update carries an old row or an old key, not both")
            head = b"U" + struct.pack("!I", oid)
            if key is not None:
                head += b"K" + encode_tuple(key)
            elif old is not None:
                head += b"O" + encode_tuple(old)
            return head + b"N" + encode_tuple(new)
        case Delete(relation_oid=oid, old=old, key=key):
            if (old is None) == (key is None):
                raise ValueError("a Delete carries exactly one of an old row or an old key")
            if key is not None:
                return b"D" + struct.pack("!I", oid) + b"K" + encode_tuple(key)
            assert old is not None
            return b"D" + struct.pack("!I", oid) + b"O" + encode_tuple(old)
        case Truncate(options=options, relation_oids=oids):
            count = len(oids)
            return b"T" + struct.pack(f"!IB{count}I", count, options, *oids)
        case Message(transactional=transactional, lsn=lsn, prefix=prefix, content=content):
            flags = 1 if transactional else 0
            return (
                b"M"
                + struct.pack("!BQ", flags, lsn)
                + _string(prefix)
                + struct.pack("!I", len(content))
                + content
            )
    raise TypeError(f"not a pgoutput message: {message!r}")
