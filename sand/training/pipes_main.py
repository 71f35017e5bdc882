"""Child-process entry of a training run launched through Dagster Pipes.

`python -m sand.training.pipes_main` (one process) or `accelerate launch ... -m sand.training.pipes_main`
(DeepSpeed / FSDP / multi-GPU). Every rank reads the TrainSpec from SAND_TRAIN_SPEC; rank 0 alone
talks to Dagster: progress as log lines, the final metrics as a custom message.
"""
from __future__ import annotations

import json
import os

from dagster_pipes import open_dagster_pipes

from sand.training.sft import TrainSpec, train


def main() -> None:
    spec = TrainSpec.from_json(os.environ["SAND_TRAIN_SPEC"])
    if int(os.environ.get("RANK", "0")) != 0:
        train(spec)
        return
    with open_dagster_pipes() as pipes:
        metrics = train(spec, log=lambda record: pipes.log.info(json.dumps(record)))
        pipes.report_custom_message(metrics)


if __name__ == "__main__":
    main()
