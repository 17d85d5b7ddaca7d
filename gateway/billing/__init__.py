"""Prepaid billing: tariffs, rating, ledger, top-ups, reconciliation, cutoff, risk.

Pure cores (no I/O, time passed in) except :mod:`gateway.billing.ledger_store`,
which persists the ledger inside a transaction owned by the caller. The
integration sequence for the daemon is in docs/billing.md ("Integration").
"""

from gateway.billing.cutoff import (
    Action,
    Contact,
    CutoffConfig,
    CutoffDecision,
    CutoffEvent,
    CutoffState,
    Level,
    evaluate,
)
from gateway.billing.ledger import Entry, EntryKind, Ledger, LedgerConflict, LedgerView
from gateway.billing.rating import (
    IntervalCharge,
    MeterReplacement,
    RatingAnomaly,
    RatingResult,
    RegisterReading,
    TierState,
    rate_interval,
)
from gateway.billing.reconcile import CentralSnapshot, SnapshotStatus
from gateway.billing.tariff import Tariff, TariffBook, TariffError
from gateway.billing.tariff_file import load_book, load_tariff
from gateway.billing.topup import Authorization, Channel, Source, TopUp, TopUpPolicy, TopUpStatus

__all__ = [
    "Action",
    "Authorization",
    "CentralSnapshot",
    "Channel",
    "Contact",
    "CutoffConfig",
    "CutoffDecision",
    "CutoffEvent",
    "CutoffState",
    "Entry",
    "EntryKind",
    "IntervalCharge",
    "Ledger",
    "LedgerConflict",
    "LedgerView",
    "Level",
    "MeterReplacement",
    "RatingAnomaly",
    "RatingResult",
    "RegisterReading",
    "SnapshotStatus",
    "Source",
    "Tariff",
    "TariffBook",
    "TariffError",
    "TierState",
    "TopUp",
    "TopUpPolicy",
    "TopUpStatus",
    "evaluate",
    "load_book",
    "load_tariff",
    "rate_interval",
]
