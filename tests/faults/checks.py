"""The one verdict every fault scenario ends with, checked from an independent consumer.

- lost = 0: every committed event arrived at least once;
- nothing arrived that was never committed (rolled back, or not an event of this test);
- every duplicate carries the same message_id as its original (guaranteed by construction:
  ids are compared) and belongs to a transaction at or after the slot position the relay had
  reported before the fault (``flushed_before``), i.e. duplicates are bounded by the checkpoint;
- per-aggregate order of first deliveries follows commit order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cdc_relay.lsn import Lsn
from tests.integration.harness import Delivery


@dataclass
class Verdict:
    expected: int
    delivered: int
    lost: int
    duplicates: int
    unexpected: int

    def __str__(self) -> str:
        return (
            f"expected={self.expected} delivered={self.delivered} lost={self.lost} "
            f"duplicates={self.duplicates} unexpected={self.unexpected}"
        )


def verify(
    expected_ids: list[str],
    deliveries: list[Delivery],
    flushed_before: int | None = None,
    forbidden_ids: set[str] | None = None,
    uncertain_ids: set[str] | None = None,
) -> Verdict:
    """Assert the delivery promise; return the counts for the test's report.

    ``expected_ids`` in commit order. ``uncertain_ids``: commits whose outcome the writer never
    learned (connection lost at COMMIT); they may arrive or not. ``flushed_before``: the slot's
    confirmed_flush_lsn (as an int) observed before the last fault; duplicates must come from
    transactions whose commit LSN is at or after it.
    """
    want = set(expected_ids)
    counts = Counter(d.message_id for d in deliveries)
    got = set(counts)
    lost = want - got
    unexpected = got - want - (uncertain_ids or set())
    assert not lost, f"{len(lost)} committed events lost, e.g. {sorted(lost)[:3]}"
    assert not unexpected, f"{len(unexpected)} events that were never committed arrived"
    if forbidden_ids:
        assert not (got & forbidden_ids), "rolled-back events were published"
    dups = [d for d in deliveries if counts[d.message_id] > 1]
    if flushed_before is not None:
        seen: set[str] = set()
        for d in dups:
            if d.message_id in seen:
                commit = int(Lsn.parse(d.body["source"]["commit_lsn"]))
                assert commit >= flushed_before, (
                    f"duplicate {d.message_id} from commit {d.body['source']['commit_lsn']} "
                    f"is older than the reported flush {Lsn(flushed_before)}"
                )
            seen.add(d.message_id)
    position = {eid: i for i, eid in enumerate(expected_ids)}
    last: dict[str, int] = {}
    first_seen: set[str] = set()
    for d in deliveries:
        if d.message_id in first_seen:
            continue
        first_seen.add(d.message_id)
        if d.message_id not in position:
            continue  # an uncertain commit that did happen: no order to compare with
        agg = d.body["aggregate_id"]
        pos = position[d.message_id]
        assert pos > last.get(agg, -1), f"aggregate {agg} reordered at {d.message_id}"
        last[agg] = pos
    return Verdict(
        expected=len(want),
        delivered=len(deliveries),
        lost=len(lost),
        duplicates=sum(c - 1 for c in counts.values()),
        unexpected=len(unexpected),
    )
