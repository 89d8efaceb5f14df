"""Zarr stores of dataset-wide attributions: the layout (:mod:`.layout`), writing (:mod:`.io`) and reading
(:mod:`.reader`)."""

from .io import StoreError, save_outputs
from .layout import Schema
from .reader import Store, open_store

__all__ = ["Schema", "Store", "StoreError", "open_store", "save_outputs"]
