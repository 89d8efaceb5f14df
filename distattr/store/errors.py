"""The errors of distattr stores, below every other store module (so that none of them imports another for them)."""

from __future__ import annotations


class StoreError(ValueError):
    """A store that cannot be used as asked: not a distattr store, written by another job, incomplete."""


class StoreBusy(StoreError):
    """Another live driver holds the store's lease (:mod:`distattr.store.lease`)."""


class StorageFatal(StoreError):
    """A storage error that retrying cannot fix (disk full, read-only, permission denied, no such bucket); the
    message is one line that says what to do (:mod:`distattr.store.faults`)."""
