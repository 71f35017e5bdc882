"""Dagster asset definitions: thin wiring from engine calls to versioned assets."""
