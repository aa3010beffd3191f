"""The partitioned outbox without a server: names, the split over relays, the shape an existing
root must have, and the refusals that keep a member relay from dropping or doubling events."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay import catalog, partitions
from cdc_relay.errors import ConfigError, SetupError
from cdc_relay.partitions import Existing, Member

SQL_FILE = Path(__file__).resolve().parents[2] / "sql" / "outbox_partitioned.sql"


# -- names -----------------------------------------------------------------------------------------
def test_partition_names_round_trip() -> None:
    assert partitions.partition_name("outbox", 3) == "outbox_p3"
    assert partitions.parse_partition("outbox_p3") == ("outbox", 3)
    assert partitions.parse_partition("sales_outbox_p10") == ("sales_outbox", 10)
    for not_a_partition in ("outbox", "outbox_p", "outbox_p03", "_p1x", "outbox_px"):
        assert partitions.parse_partition(not_a_partition) is None


def test_a_name_postgresql_would_truncate_is_refused() -> None:
    root = "o" * 60
    assert partitions.partition_name(root, 9) == root + "_p9"  # 63 bytes: kept whole
    with pytest.raises(ConfigError, match="longer than 63 bytes"):
        partitions.partition_name(root, 10)


def test_partition_order_is_by_index() -> None:
    names = ["public.outbox_p10", "public.outbox_p2", "public.outbox_p1"]
    assert sorted(names, key=partitions.index_order) == [
        "public.outbox_p1",
        "public.outbox_p2",
        "public.outbox_p10",
    ]


@pytest.mark.parametrize(("count", "relays"), [(0, 1), (1025, 2), (4, 0), (4, 5)])
def test_counts_out_of_range_are_configuration_errors(count: int, relays: int) -> None:
    with pytest.raises(ConfigError):
        partitions.check_count(count, relays)


# -- roots of outbox_table -------------------------------------------------------------------------
def test_roots_come_from_member_lists_and_from_roots_themselves() -> None:
    member = [("public", "outbox_p0"), ("public", "outbox_p2"), ("billing", "outbox_p1")]
    assert partitions.roots(member, 4) == [("public", "outbox"), ("billing", "outbox")]
    assert partitions.roots([("public", "outbox")], 4) == [("public", "outbox")]


def test_a_partition_beyond_the_count_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"public\.outbox_p4 is not one of the 4 partitions"):
        partitions.roots([("public", "outbox_p4")], 4)


# -- the split -------------------------------------------------------------------------------------
def test_split_is_round_robin() -> None:
    assert partitions.split(4, 2) == [[0, 2], [1, 3]]
    assert partitions.split(5, 2) == [[0, 2, 4], [1, 3]]
    assert partitions.split(3, 3) == [[0], [1], [2]]


@given(st.integers(1, 200), st.data())
def test_split_gives_every_partition_to_exactly_one_relay(count: int, data: st.DataObject) -> None:
    relays = data.draw(st.integers(1, count))
    shares = partitions.split(count, relays)
    assert len(shares) == relays
    assert sorted(k for share in shares for k in share) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced


@given(st.integers(1, 64), st.data())
def test_doubling_the_relays_moves_each_partition_off_one_old_relay(
    count: int, data: st.DataObject
) -> None:
    relays = data.draw(st.integers(1, max(1, count // 2)))
    before = {k: i for i, share in enumerate(partitions.split(count, relays)) for k in share}
    after = partitions.split(count, 2 * relays)
    for share in after:  # a new relay's partitions all come from the same old relay
        assert len({before[k] for k in share}) <= 1


def test_plan_prints_one_config_line_per_relay() -> None:
    assert partitions.plan("public", "outbox", 4, 2)[1:] == [
        '  relay 0: outbox_table = "public.outbox_p0,public.outbox_p2"',
        '  relay 1: outbox_table = "public.outbox_p1,public.outbox_p3"',
    ]


# -- the shape of an existing root -----------------------------------------------------------------
def _hash_root(count: int, indexes: list[int], column: str = "aggregateid") -> Existing:
    bounds = tuple(
        ("public", f"outbox_p{k}", f"FOR VALUES WITH (modulus {count}, remainder {k})")
        for k in indexes
    )
    return Existing(f"HASH ({column})", "h", (column,), bounds)


def test_bounds_are_read_from_postgresql_text() -> None:
    assert partitions.parse_hash_bound("FOR VALUES WITH (modulus 4, remainder 1)") == (4, 1)
    assert partitions.parse_hash_bound("FOR VALUES IN ('a')") is None
    assert partitions.parse_hash_bound(None) is None


def test_the_right_shape_needs_nothing_or_only_the_missing_partitions() -> None:
    root = ("public", "outbox")
    assert partitions.missing_partitions(root, "aggregateid", 4, _hash_root(4, [0, 1, 2, 3])) == []
    assert partitions.missing_partitions(root, "aggregateid", 4, _hash_root(4, [])) == [0, 1, 2, 3]
    assert partitions.missing_partitions(root, "aggregateid", 4, _hash_root(4, [0, 2])) == [1, 3]


@pytest.mark.parametrize(
    ("existing", "says"),
    [
        (Existing(None), "exists and is not partitioned"),
        (Existing("LIST (aggregateid)", "l", ("aggregateid",)), "partitioned by LIST"),
        (Existing("HASH (id)", "h", ("id",)), "not HASH (aggregateid)"),
        (_hash_root(8, [0, 1]), "(modulus 8, remainder 0)"),
        (
            Existing(
                "HASH (aggregateid)",
                "h",
                ("aggregateid",),
                (("public", "outbox_a", "FOR VALUES WITH (modulus 4, remainder 0)"),),
            ),
            "partition public.outbox_a",
        ),
        (
            Existing(
                "HASH (aggregateid)",
                "h",
                ("aggregateid",),
                (("public", "outbox_p1", "FOR VALUES WITH (modulus 4, remainder 0)"),),
            ),
            "partition public.outbox_p1",
        ),
    ],
)
def test_another_shape_is_refused_never_adjusted(existing: Existing, says: str) -> None:
    with pytest.raises(SetupError) as info:
        partitions.missing_partitions(("public", "outbox"), "aggregateid", 4, existing)
    assert says in info.value.message


# -- what a member relay's configuration and publication may hold ---------------------------------
P0 = Member("public.outbox_p0", ("public.outbox",))
P1 = Member("public.outbox_p1", ("public.outbox",))
P2 = Member("public.outbox_p2", ("public.outbox",))
ROOT = Member("public.outbox")


def test_a_root_and_its_partition_in_one_outbox_table_are_refused() -> None:
    text = partitions.mixed([ROOT, P0])
    assert text is not None
    assert "lists public.outbox and its partition public.outbox_p0" in text
    assert partitions.mixed([P0, P2]) is None
    assert partitions.mixed([ROOT, Member("public.other")]) is None


def test_a_members_publication_with_only_its_partitions_passes() -> None:
    published = [("public.outbox_p0", "public.outbox"), ("public.outbox_p2", "public.outbox")]
    assert partitions.publication_problem("pub", [P0, P2], published) is None
    # other tables are no business of the partition checks (the relay ignores their rows)
    assert (
        partitions.publication_problem("pub", [P0], [("public.shipments", "public.shipments")])
        is None
    )


def test_a_sibling_partition_in_the_publication_is_refused_with_the_fix() -> None:
    published = [("public.outbox_p0", "public.outbox"), ("public.outbox_p1", "public.outbox")]
    text = partitions.publication_problem("pub", [P0], published)
    assert text is not None
    assert "covers public.outbox_p1, a partition of public.outbox that outbox_table does" in text
    assert text.endswith('ALTER PUBLICATION "pub" SET TABLE "public"."outbox_p0"')


def test_the_root_in_a_members_publication_is_refused() -> None:
    # publish_via_partition_root = true: pg_publication_tables lists the root itself
    text = partitions.publication_problem("pub", [P0], [("public.outbox", "public.outbox")])
    assert text is not None
    assert "covers public.outbox, and outbox_table lists its partition" in text


def test_a_relay_over_a_root_is_no_member() -> None:
    assert (
        partitions.publication_problem("pub", [ROOT], [("public.outbox", "public.outbox")]) is None
    )


def test_overlap_with_another_relay_is_named_by_publication() -> None:
    others = [
        ("relay_b", "public.outbox_p1"),
        ("relay_b", "public.outbox_p2"),
        ("relay_root", "public.outbox"),
        ("relay_c", "public.unrelated"),
    ]
    assert partitions.overlaps([P0, P2], others) == [
        "publication relay_b covers public.outbox_p2",
        "publication relay_root covers public.outbox (and this relay's public.outbox_p0 is in "
        "its tree)",
        "publication relay_root covers public.outbox (and this relay's public.outbox_p2 is in "
        "its tree)",
    ]


def test_a_relay_over_the_root_overlaps_any_member() -> None:
    root = Member("public.outbox", (), ("public.outbox_p0", "public.outbox_p1"))
    assert partitions.overlaps([root], [("member", "public.outbox_p1")]) == [
        "publication member covers public.outbox_p1 (and this relay's public.outbox is in its tree)"
    ]
    # two relays over one plain table are not a split: not this check's business
    assert partitions.overlaps([Member("public.outbox")], [("b", "public.outbox")]) == []


# -- the DDL ---------------------------------------------------------------------------------------
def test_default_partitioned_ddl_is_the_sql_file() -> None:
    text = catalog.partitioned_outbox_ddl()
    assert text in SQL_FILE.read_text()
    assert "    id            uuid        NOT NULL,\n" in text
    assert "    PRIMARY KEY (id, aggregateid)\n) PARTITION BY HASH (aggregateid);\n" in text
    assert text.count("PARTITION OF") == 4
    assert (
        'CREATE TABLE IF NOT EXISTS "public"."outbox_p3" PARTITION OF "public"."outbox"\n' in text
    )
    assert "    FOR VALUES WITH (MODULUS 4, REMAINDER 3);\n" in text


def test_executed_partitioned_ddl_composes_identifiers() -> None:
    composed = catalog._partitioned_ddl_sql("Sales$", 'O"ut', {"aggregate_id": "agg id"})
    text = composed.as_string()
    assert text.startswith('CREATE TABLE IF NOT EXISTS "Sales$"."O""ut" (\n')
    assert '    "id" uuid        NOT NULL,\n' in text
    assert '    PRIMARY KEY ("id", "agg id")\n) PARTITION BY HASH ("agg id")' in text
