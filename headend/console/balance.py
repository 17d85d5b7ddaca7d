"""An account's balance path, from the ledger entries its gateway sent (pure).

Every ledger entry the gateway makes reaches central as a ``charge`` record
(``{"id", "account", "seq", "kind", "amount_micro", "time_ms", "body"}``).
The balance after each entry is the gateway's fold (docs/billing.md, "Ledger
and reconciliation"), recomputed here without the gateway's code:

* without a snapshot, the sum of every non-snapshot entry's amount;
* a snapshot with a higher ``central_seq`` than the one in force sets the
  balance to its amount as of local entry ``as_of_seq``; every non-snapshot
  entry after that, except those it lists in ``included_ids``, is added on top.

``tests/headend/console`` checks this against the gateway's
``gateway.billing.ledger.fold`` on generated ledgers. Entries that have not
arrived yet (the gateway is offline) leave gaps in ``seq``: the path is what
central holds, and :attr:`BalancePath.missing` says how many are missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    seq: int
    kind: str  # debit, fixed, credit, adjustment, snapshot
    amount_micro: int
    time_ms: int
    body: Mapping[str, Any]

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> LedgerEntry:
        """From a charge record's body; raises KeyError/ValueError/TypeError if malformed."""
        body = d.get("body") or {}
        if not isinstance(body, Mapping):
            raise TypeError("body is not an object")
        return cls(str(d["id"]), int(d["seq"]), str(d["kind"]), int(d["amount_micro"]), int(d["time_ms"]), body)


@dataclass(frozen=True)
class BalancePoint:
    seq: int
    time_ms: int
    kind: str
    amount_micro: int
    balance_micro: int
    counted: bool  # False: a snapshot already counted it (or an older snapshot, ignored)


@dataclass(frozen=True)
class BalancePath:
    points: tuple[BalancePoint, ...]
    missing: int  # entries with a seq below the highest one that central does not hold

    @property
    def balance_micro(self) -> int | None:
        return self.points[-1].balance_micro if self.points else None


def balance_path(entries: Iterable[LedgerEntry]) -> BalancePath:
    """The balance after each entry, in ``seq`` order (a repeated seq counts once)."""
    by_seq: dict[int, LedgerEntry] = {}
    for e in entries:
        by_seq.setdefault(e.seq, e)
    ordered = [by_seq[s] for s in sorted(by_seq)]
    points: list[BalancePoint] = []
    balance = 0
    snap_central: int | None = None
    included: frozenset[str] = frozenset()
    for i, e in enumerate(ordered):
        counted = True
        if e.kind == "snapshot":
            central = int(e.body.get("central_seq", 0))
            if snap_central is None or central > snap_central:
                as_of = int(e.body.get("as_of_seq", 0))
                included = frozenset(str(x) for x in e.body.get("included_ids", ()))
                snap_central = central
                balance = e.amount_micro + sum(
                    x.amount_micro
                    for x in ordered[:i]
                    if x.seq > as_of and x.kind != "snapshot" and x.entry_id not in included
                )
            else:
                counted = False
        elif e.entry_id in included:
            counted = False
        else:
            balance += e.amount_micro
        points.append(BalancePoint(e.seq, e.time_ms, e.kind, e.amount_micro, balance, counted))
    missing = (ordered[-1].seq - len(ordered)) if ordered and ordered[0].seq >= 1 else 0
    return BalancePath(tuple(points), max(0, missing))
