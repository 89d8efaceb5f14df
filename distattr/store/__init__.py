"""Zarr stores of dataset-wide attributions: the layout (:mod:`.layout`), writing (:mod:`.io`), reading
(:mod:`.reader`), the driver's lease (:mod:`.lease`) and storage faults (:mod:`.faults`)."""

from .errors import StorageFatal, StoreBusy, StoreError
from .io import SlotFailure, save_outputs
from .layout import Schema
from .reader import Store, open_store

__all__ = ["Schema", "SlotFailure", "StorageFatal", "Store", "StoreBusy", "StoreError", "open_store", "save_outputs"]
