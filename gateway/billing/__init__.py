"""Prepaid billing: tariffs, rating, ledger, top-ups, reconciliation, cutoff, risk.

Pure cores (no I/O, time passed in) except :mod:`gateway.billing.ledger_store`,
which persists the ledger inside a transaction owned by the caller.
"""
