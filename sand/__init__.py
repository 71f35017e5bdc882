"""SAND engine: plain Python, no Dagster. Environments, trajectories, storage, models, training."""
