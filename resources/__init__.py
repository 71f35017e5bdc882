"""Dagster resources: configuration that builds engine objects (store, environments, compute)."""
from resources.compute import ComputeResource
from resources.environments import AlfWorldResource, SciWorldResource
from resources.store import StoreResource

__all__ = ["AlfWorldResource", "ComputeResource", "SciWorldResource", "StoreResource"]
