"""Training: TRL supervised finetuning, run in a child process launched through Dagster Pipes."""
