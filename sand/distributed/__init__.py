"""Running engine work on a cluster (Ray). Optional: install the project with the `ray` extra."""
