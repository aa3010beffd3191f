"""The partitioned outbox: one logical outbox split by hash of the aggregate id, so that several
relays share it while every aggregate keeps its order.

A relay keeps order within its slot, never across slots. Hash partitioning on the aggregate id
puts all of an aggregate's rows in one partition, and a relay whose publication covers some
partitions streams exactly those, so an aggregate goes through one relay: relays side by side,
each with its own slot and publication, keep per-aggregate order with no coordinator. Writers
insert into the root; PostgreSQL routes each row, and (without ``publish_via_partition_root``)
publishes it under its partition's name, which is what a member relay lists in
``outbox_table``.

What this module guards against is the silent part of getting that wrong. A relay drops rows
of relations it was not configured for, so a partition that its publication covers but its
``outbox_table`` does not list, or a root whose ``publish_via_partition_root`` renames every
partition's rows, loses events without an error; two relays covering one partition send its
events twice and no longer in one order. Each is refused with the statement that fixes it.
Overlap with another relay is found through the publication comments cdc-relay writes (the
slot marker), so it is seen only where the relay's role may write them.

Partitions are named ``<table>_p<k>``: ``init --partitions N`` creates them, derives the root of
a member's ``outbox_table`` from those names, and prints a split over relays (round robin, so
growing from M to 2M relays moves partitions off each old relay to exactly one new one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import psycopg
from psycopg import sql

from cdc_relay.errors import ConfigError, SetupError
from cdc_relay.postgres import quote_ident

Conn: TypeAlias = "psycopg.Connection[tuple[object, ...]]"

MAX_PARTITIONS = 1024
_IDENT_BYTES = 63  # PostgreSQL truncates longer names: a partition must keep its full name
_PARTITION_RE = re.compile(r"^(?P<root>.+)_p(?P<index>0|[1-9][0-9]*)$")
_HASH_BOUND_RE = re.compile(r"^FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)$")
# serialises `init --partitions` of several relays started at once (one creates, others check)
_CREATE_LOCK = "cdc-relay partitioned outbox"

Table = tuple[str, str]  # (schema, name)


# -- names and the split (no server) ---------------------------------------------------------------
def partition_name(root: str, index: int) -> str:
    """The name of partition ``index`` of ``root``; refused if PostgreSQL would truncate it."""
    name = f"{root}_p{index}"
    if len(name.encode()) > _IDENT_BYTES:
        raise ConfigError(
            "outbox_table",
            f"partition name {name!r} is longer than {_IDENT_BYTES} bytes: PostgreSQL would "
            "truncate it; use a shorter table name",
        )
    return name


def parse_partition(name: str) -> tuple[str, int] | None:
    """``"outbox_p3"`` → ``("outbox", 3)``; None for a name that is not a partition's."""
    m = _PARTITION_RE.match(name)
    return None if m is None else (m["root"], int(m["index"]))


def check_count(count: int, relays: int) -> None:
    if not 1 <= count <= MAX_PARTITIONS:
        raise ConfigError("partitions", f"must be between 1 and {MAX_PARTITIONS}, not {count}")
    if not 1 <= relays <= count:
        raise ConfigError(
            "relays", f"must be between 1 and the number of partitions ({count}), not {relays}"
        )


def roots(tables: Sequence[Table], count: int) -> list[Table]:
    """The roots ``init --partitions count`` creates for ``outbox_table``, in order.

    A listed ``<root>_p<k>`` names partition k of ``<root>`` (a member relay's list); any other
    name is a root itself (one relay over every partition).
    """
    found: list[Table] = []
    for schema, name in tables:
        parsed = parse_partition(name)
        if parsed is None:
            root = (schema, name)
        else:
            root = (schema, parsed[0])
            if parsed[1] >= count:
                raise ConfigError(
                    "outbox_table",
                    f"{schema}.{name} is not one of the {count} partitions "
                    f"{schema}.{partition_name(parsed[0], 0)} .. "
                    f"{partition_name(parsed[0], count - 1)} that --partitions {count} makes",
                )
        if root not in found:
            found.append(root)
    return found


def split(count: int, relays: int) -> list[list[int]]:
    """Partition indexes for each relay, round robin: relay i takes every k with k % relays == i.

    Round robin rather than ranges: growing from M relays to 2M, every old relay hands some of
    its partitions to exactly one new relay.
    """
    return [list(range(i, count, relays)) for i in range(relays)]


def plan(schema: str, root: str, count: int, relays: int) -> list[str]:
    """What ``init --partitions`` prints: how to give the partitions to ``relays`` relays."""
    lines = [
        f"to run {relays} relays side by side, give each its own slot, publication and "
        "http_address, and these partitions (then run `cdc-relay init` with each config):"
    ]
    for i, indexes in enumerate(split(count, relays)):
        names = ",".join(f"{schema}.{partition_name(root, k)}" for k in indexes)
        lines.append(f'  relay {i}: outbox_table = "{names}"')
    return lines


def parse_hash_bound(bound: str | None) -> tuple[int, int] | None:
    """``FOR VALUES WITH (modulus 4, remainder 1)`` (``pg_get_expr`` of a bound) → (4, 1)."""
    m = _HASH_BOUND_RE.match((bound or "").strip())
    return None if m is None else (int(m[1]), int(m[2]))


@dataclass(frozen=True, slots=True)
class Existing:
    """An existing root as the catalog describes it."""

    key_text: str | None  # pg_get_partkeydef, e.g. "HASH (aggregateid)"; None: not partitioned
    strategy: str = ""  # pg_partitioned_table.partstrat: h(ash), l(ist), r(ange)
    key_columns: tuple[str, ...] = ()  # "" for an expression
    partitions: tuple[tuple[str, str, str | None], ...] = ()  # (schema, name, bound expression)


def missing_partitions(root: Table, column: str, count: int, existing: Existing) -> list[int]:
    """Indexes of partitions still to create under an existing root; raises if its shape differs.

    The one shape accepted is ``PARTITION BY HASH (column)`` with partitions ``<root>_p<k>``
    bound ``(MODULUS count, REMAINDER k)``: anything else would route aggregates differently
    from what the relays' configurations assume, so it is refused, never adjusted.
    """
    schema, name = root
    table = f"{schema}.{name}"
    wanted_key = f"HASH ({column})"
    wanted = f"partitioned by {wanted_key} into {count} partitions {name}_p0 .. {name}_p{count - 1}"
    if existing.key_text is None:
        raise SetupError(
            f"outbox table {table} exists and is not partitioned, so --partitions {count} "
            f"cannot make it {wanted}: create the partitioned outbox under another name (rows "
            "are moved by INSERT … SELECT), or leave out --partitions"
        )
    if existing.strategy != "h" or existing.key_columns != (column,):
        raise SetupError(
            f"outbox table {table} is partitioned by {existing.key_text}, not "
            f"{wanted_key}: rows of one aggregate could land in different partitions and reach "
            "different relays, out of order; a relay split needs the outbox partitioned by "
            "hash of the aggregate id (column_aggregate_id)"
        )
    have: set[int] = set()
    for p_schema, p_name, bound in existing.partitions:
        parsed = parse_partition(p_name)
        expected = None if parsed is None or parsed[0] != name else parsed[1]
        if p_schema != schema or expected is None or parse_hash_bound(bound) != (count, expected):
            raise SetupError(
                f"outbox table {table} has partition {p_schema}.{p_name} ({bound or 'no bound'}) "
                f"that --partitions {count} would not make ({wanted}): the existing split "
                "differs; run init with the --partitions it was made with, or repartition by hand"
            )
        have.add(expected)
    return [k for k in range(count) if k not in have]


# -- the catalog ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Member:
    """One table of ``outbox_table`` as the catalog places it in a partition tree."""

    table: str  # "schema.name"
    ancestors: tuple[str, ...] = ()  # parent first, root last; () if not a partition
    descendants: tuple[str, ...] = ()  # its partitions (and theirs), for a partitioned table

    @property
    def in_tree(self) -> bool:
        return bool(self.ancestors or self.descendants)

    @property
    def root(self) -> str:
        return self.ancestors[-1] if self.ancestors else self.table


def mixed(members: Sequence[Member]) -> str | None:
    """Why ``outbox_table`` may not list a table together with a partition of it, or None."""
    listed = {m.table for m in members}
    for m in members:
        for ancestor in m.ancestors:
            if ancestor in listed:
                return (
                    f"outbox_table lists {ancestor} and its partition {m.table}: list the root "
                    "(one relay streams every partition) or some partitions (one of several "
                    "relays side by side, each with its own slot and publication), not both"
                )
    return None


def publication_problem(
    publication: str, members: Sequence[Member], published: Iterable[tuple[str, str]]
) -> str | None:
    """What is wrong with a member relay's publication, or None.

    ``published``: (table, root) for every table the publication lists (as
    ``pg_publication_tables`` expands it). A root there either renames its partitions' rows
    (``publish_via_partition_root``) or covers every partition; a sibling partition there is
    one whose rows this relay would read and drop.
    """
    own = [m for m in members if m.ancestors]
    if not own:
        return None
    listed = {m.table for m in members}
    ancestors = {a: m.table for m in own for a in m.ancestors}
    roots = {m.root for m in own}
    fix = f"ALTER PUBLICATION {quote_ident(publication)} SET TABLE " + ", ".join(
        _sql_name(t) for t in sorted(listed)
    )
    for table, root in published:
        if table in ancestors:
            return (
                f"publication {publication} covers {table}, and outbox_table lists its partition "
                f"{ancestors[table]}: PostgreSQL then publishes either every partition's rows or "
                "all of them under the root's name, and this relay would drop rows it does not "
                f"stream; {fix}"
            )
        if root in roots and table not in listed:
            return (
                f"publication {publication} covers {table}, a partition of {root} that "
                "outbox_table does not list: this relay would read its rows and drop them (is "
                f"it another relay's publication? each relay needs its own); {fix}"
            )
    return None


def overlaps(members: Sequence[Member], others: Iterable[tuple[str, str]]) -> list[str]:
    """Other relays' publications covering the partition trees this relay streams from.

    ``others``: (publication, table) of other cdc-relay publications, as
    ``pg_publication_tables`` expands them. A publication covers a partition when it lists the
    partition, one of its ancestors or (expanded) its leaves.
    """
    covered: dict[str, list[str]] = {}
    for m in (m for m in members if m.in_tree):
        for name in (m.table, *m.ancestors, *m.descendants):
            covered.setdefault(name, []).append(m.table)
    found = [
        f"publication {pub} covers {table}"
        + ("" if table == mine else f" (and this relay's {mine} is in its tree)")
        for pub, table in others
        for mine in covered.get(table, ())
    ]
    return sorted(set(found))


def _sql_name(display: str) -> str:
    schema, _, name = display.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def index_order(display: str) -> tuple[str, int, str]:
    """Sort key putting ``outbox_p2`` before ``outbox_p10``."""
    parsed = parse_partition(display)
    return ("", -1, display) if parsed is None else (parsed[0], parsed[1], display)


_MEMBERS = (
    "SELECT t.schema || '.' || t.name, "
    "ARRAY(SELECT an.nspname || '.' || ac.relname FROM pg_partition_ancestors(c.oid) "
    "WITH ORDINALITY AS a(relid, depth) JOIN pg_class ac ON ac.oid = a.relid "
    "JOIN pg_namespace an ON an.oid = ac.relnamespace WHERE a.relid <> c.oid "
    "ORDER BY a.depth), "
    "ARRAY(SELECT dn.nspname || '.' || dc.relname FROM pg_partition_tree(c.oid) d "
    "JOIN pg_class dc ON dc.oid = d.relid JOIN pg_namespace dn ON dn.oid = dc.relnamespace "
    "WHERE d.relid <> c.oid ORDER BY 1) "
    "FROM unnest(%s::text[], %s::text[]) AS t(schema, name) "
    "JOIN pg_namespace n ON n.nspname = t.schema "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name"
)
# every table a publication lists (as expanded for subscribers), with its partition root
_PUBLISHED = (
    "SELECT t.schemaname || '.' || t.tablename, "
    "coalesce(rn.nspname || '.' || r.relname, t.schemaname || '.' || t.tablename) "
    "FROM pg_publication_tables t JOIN pg_namespace n ON n.nspname = t.schemaname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename "
    "LEFT JOIN pg_class r ON r.oid = pg_partition_root(c.oid) "
    "LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace WHERE t.pubname = %s"
)
# the tables of other publications cdc-relay wrote a slot marker into: other relays'
_OTHER_RELAYS = (
    "SELECT t.pubname::text, t.schemaname || '.' || t.tablename FROM pg_publication_tables t "
    "JOIN pg_publication p ON p.pubname = t.pubname WHERE t.pubname <> %s "
    "AND obj_description(p.oid, 'pg_publication') ~ '(^|\\n)cdc-relay: slot '"
)
# leaves of a root that no publication covers, directly or through an ancestor
_UNCOVERED = (
    "SELECT n.nspname || '.' || c.relname FROM pg_partition_tree(%s::regclass) pt "
    "JOIN pg_class c ON c.oid = pt.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE pt.isleaf AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(pt.relid) a "
    "JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace "
    "JOIN pg_publication_tables t ON t.schemaname = an.nspname AND t.tablename = ac.relname)"
)


def members(conn: Conn, tables: Sequence[Table]) -> list[Member]:
    """The listed tables that exist, placed in their partition trees."""
    rows = conn.execute(_MEMBERS, ([s for s, _ in tables], [n for _, n in tables])).fetchall()
    return [Member(str(r[0]), _names(r[1]), _names(r[2])) for r in rows]


def _names(value: object) -> tuple[str, ...]:
    return tuple(str(a) for a in cast("list[object]", value))


def check_members(conn: Conn, publication: str, tables: Sequence[Table]) -> None:
    """``outbox_table`` mixes no root with its partitions, and no other relay covers ours."""
    found = members(conn, tables)
    problem = mixed(found)
    if problem is not None:
        raise SetupError(problem)
    if not any(m.in_tree for m in found):
        return
    others = [(str(r[0]), str(r[1])) for r in conn.execute(_OTHER_RELAYS, (publication,))]
    clash = overlaps(found, others)
    if clash:
        raise SetupError(
            f"{'; '.join(clash)}: another relay streams these partitions already, so their "
            "events would be sent twice and no longer in one order per aggregate. Give each "
            "partition to one relay: drop it from one of the publications (ALTER PUBLICATION "
            "… DROP TABLE …) and from that relay's outbox_table, or DROP PUBLICATION one no "
            f"relay uses (publication {publication} is this relay's)",
            publication=publication,
        )


def check_publication(conn: Conn, publication: str, tables: Sequence[Table]) -> None:
    """A member relay's publication covers its partitions and nothing else of their roots."""
    found = members(conn, tables)
    if not any(m.ancestors for m in found):
        return
    published = [(str(r[0]), str(r[1])) for r in conn.execute(_PUBLISHED, (publication,))]
    problem = publication_problem(publication, found, published)
    if problem is not None:
        raise SetupError(problem, publication=publication)


def uncovered(conn: Conn, tables: Sequence[Table]) -> list[str]:
    """Partitions of the listed tables' roots that no publication covers: nobody streams them."""
    roots = sorted({m.root for m in members(conn, tables) if m.ancestors})
    out: list[str] = []
    for root in roots:
        out += [str(r[0]) for r in conn.execute(_UNCOVERED, (_sql_name(root),))]
    return sorted(out, key=index_order)


def missing_partition(conn: Conn, schema: str, name: str) -> str | None:
    """For an outbox table that does not exist: why creating it as a plain table is wrong."""
    parsed = parse_partition(name)
    if parsed is None:
        return None
    row = conn.execute(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, parsed[0]),
    ).fetchone()
    if row is None or row[0] != "p":
        return None
    root = f"{schema}.{parsed[0]}"
    return (
        f"outbox table {schema}.{name} does not exist, and {root} is partitioned: writers "
        f"insert into {root}, so an ordinary table {name} would never receive a row. List "
        f"partitions of {root} that exist in outbox_table (`cdc-relay init --create-outbox "
        "--partitions N` creates them)"
    )


def create(
    conn: Conn,
    tables: Sequence[Table],
    count: int,
    column: str,
    root_ddl: Callable[[str, str], sql.Composed],
) -> list[str]:
    """Create each root of ``tables`` partitioned by hash of the aggregate id ``column`` (with
    ``root_ddl(schema, name)``), and its ``count`` partitions; idempotent. Returns what was done.

    One transaction under an advisory lock: relays initialised at the same moment see the
    whole tree or none of it, and one of them creates it.
    """
    done: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_CREATE_LOCK,))
        for schema, name in roots(tables, count):
            for k in range(count):
                partition_name(name, k)  # refuse a name PostgreSQL would truncate, up front
            existing = _existing(conn, schema, name)
            if existing is None:
                conn.execute(root_ddl(schema, name))
                todo = list(range(count))
            else:
                todo = missing_partitions((schema, name), column, count, existing)
            for k in todo:
                child = partition_name(name, k)
                if _exists(conn, schema, child):
                    raise SetupError(
                        f"{schema}.{child} exists but is not a partition of {schema}.{name}: "
                        "rename or drop it, then run init again"
                    )
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, REMAINDER {})"
                    ).format(
                        sql.Identifier(schema, child),
                        sql.Identifier(schema, name),
                        sql.Literal(count),
                        sql.Literal(k),
                    )
                )
            if existing is None:
                done.append(
                    f"created table {schema}.{name} partitioned by hash of {column} into "
                    f"{count} partitions {schema}.{partition_name(name, 0)} .. "
                    f"{partition_name(name, count - 1)}"
                )
            elif todo:
                done.append(
                    f"created partitions {', '.join(partition_name(name, k) for k in todo)} "
                    f"of {schema}.{name}"
                )
    return done


def _exists(conn: Conn, schema: str, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (schema, name),
        ).fetchone()
        is not None
    )


def _existing(conn: Conn, schema: str, name: str) -> Existing | None:
    row = conn.execute(
        "SELECT c.oid, pg_get_partkeydef(c.oid), coalesce(pt.partstrat::text, ''), "
        "ARRAY(SELECT coalesce(a.attname::text, '') FROM unnest(pt.partattrs::int2[]) "
        "WITH ORDINALITY AS k(attnum, i) LEFT JOIN pg_attribute a ON a.attrelid = c.oid "
        "AND a.attnum = k.attnum ORDER BY k.i) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    if row is None:
        return None
    parts = conn.execute(
        "SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE i.inhparent = %s ORDER BY c.relname",
        (row[0],),
    ).fetchall()
    return Existing(
        None if row[1] is None else str(row[1]),
        str(row[2]),
        tuple(str(c) for c in cast("list[object]", row[3])),
        tuple((str(s), str(n), None if b is None else str(b)) for s, n, b in parts),
    )
